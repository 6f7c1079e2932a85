"""A delivery that is due but held says what holds it: ``waiting_for``.

API.md: ``"circuit"`` (its target's breaker is open; ``next_attempt_at`` is then
the breaker's ``until``), ``"disabled"``, ``"rate_limit"`` or ``"key"`` (with
``blocked_by``); in every answer that shows a delivery, and in the console.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Any

import asyncpg

from relay.delivery.outcome import Breaker
from relay.store import claims
from tests.conftest import Tenant, make_tenant
from tests.integration.test_console import sign_in
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Receiver, Workers, eventually


async def _get(client: Any, tenant: Tenant, path: str) -> Any:
    resp = await client.get(path, headers=tenant.auth)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def _shown_everywhere(client: Any, tenant: Tenant, delivery_id: str) -> list[dict[str, Any]]:
    """The delivery as GET /v1/deliveries/{id}, /v1/deliveries and /v1/events/{id} show it."""
    one = await _get(client, tenant, f"/v1/deliveries/{delivery_id}")
    listed = [
        d for d in (await _get(client, tenant, "/v1/deliveries"))["data"] if d["id"] == delivery_id
    ]
    event = await _get(client, tenant, f"/v1/events/{one['event_id']}")
    in_event = [d for d in event["deliveries"] if d["id"] == delivery_id]
    return [one, *listed, *in_event]


async def _deliveries_of(client: Any, tenant: Tenant, target_id: str) -> list[dict[str, Any]]:
    body = await _get(client, tenant, f"/v1/deliveries?target_id={target_id}")
    rows: list[dict[str, Any]] = body["data"]
    return rows


async def _console_text(client: Any, path: str) -> str:
    resp = await client.get(path)
    assert resp.status == 200, (path, resp.status)
    text = await resp.text()
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


async def test_a_delivery_behind_an_open_breaker_waits_for_the_circuit_until_its_end(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a target whose breaker is open for a minute, and an event for it
    source = await make_source(client, tenant)
    target = await make_target(client, tenant)
    conn = await asyncpg.connect(database_url)
    try:
        await claims.save_breaker(
            conn, target["id"], Breaker("open", 5, 1, "5 failures in a row", open_for_s=60)
        )
    finally:
        await conn.close()
    assert (await post_token(client, source, {"uuid": "held"})).status == 202
    [delivery] = await _deliveries_of(client, tenant, target["id"])
    until = (await _get(client, tenant, f"/v1/targets/{target['id']}"))["circuit"]["until"]
    # Then every answer that shows it says it waits for the circuit, until the breaker's end
    for shown in await _shown_everywhere(client, tenant, delivery["id"]):
        assert shown["waiting_for"] == "circuit", shown
        assert shown["next_attempt_at"] == until
        assert "blocked_by" not in shown
    # and so does the console, on its page and in its event's list
    await sign_in(client, tenant.api_key)
    page = await _console_text(client, f"/console/deliveries/{delivery['id']}")
    assert "circuit breaker is open until" in page
    listing = await _console_text(client, f"/console/events/{delivery['event_id']}")
    assert "circuit open" in listing
    target_page = await _console_text(client, f"/console/targets/{target['id']}")
    assert "circuit open" in target_page


async def test_a_delivery_of_a_disabled_target_waits_for_it(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given an event for a target that is then disabled (and whose breaker is open too)
    source = await make_source(client, tenant)
    target = await make_target(client, tenant)
    assert (await post_token(client, source, {"uuid": "off"})).status == 202
    resp = await client.patch(
        f"/v1/targets/{target['id']}", json={"enabled": False}, headers=tenant.auth
    )
    assert resp.status == 200
    conn = await asyncpg.connect(database_url)
    try:
        await claims.save_breaker(
            conn, target["id"], Breaker("open", 5, 1, "5 failures in a row", open_for_s=60)
        )
    finally:
        await conn.close()
    [delivery] = await _deliveries_of(client, tenant, target["id"])
    # Then it waits for the target (being enabled again comes first), at its own time
    for shown in await _shown_everywhere(client, tenant, delivery["id"]):
        assert shown["waiting_for"] == "disabled", shown
        assert shown["next_attempt_at"] == delivery["next_attempt_at"]
    await sign_in(client, tenant.api_key)
    page = await _console_text(client, f"/console/deliveries/{delivery['id']}")
    assert "its target is disabled" in page


async def test_an_ordered_delivery_behind_another_waits_for_its_key(
    client: Any, tenant: Tenant
) -> None:
    # Given an ordered target and two events of one Bill
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, ordering="object")
    bill = {"objectType": "Bill", "objectId": 7}
    assert (await post_token(client, source, [{**bill, "n": 1}, {**bill, "n": 2}])).status == 202
    rows = await _deliveries_of(client, tenant, target["id"])
    [second] = [d for d in rows if d.get("blocked_by")]
    [first] = [d for d in rows if d["id"] != second["id"]]
    # Then the second waits for its key, behind the first; the first waits for nothing
    for shown in await _shown_everywhere(client, tenant, second["id"]):
        assert shown["waiting_for"] == "key" and shown["blocked_by"] == first["id"]
        assert shown["next_attempt_at"] is None
    for shown in await _shown_everywhere(client, tenant, first["id"]):
        assert "waiting_for" not in shown and "blocked_by" not in shown
    await sign_in(client, tenant.api_key)
    page = await _console_text(client, f"/console/deliveries/{second['id']}")
    assert f"waits behind {first['id']}" in page
    listing = await _console_text(client, f"/console/events/{second['event_id']}")
    assert "behind another delivery of its key" in listing


async def test_a_rate_limited_backlog_waits_for_the_rate_limit(
    workers: Workers, gateway: Any, receiver: Receiver
) -> None:
    # Given a target limited to 1 delivery a second and 30 due to it, drained by a worker
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    target = await make_target(gateway, tenant, url=receiver.url("/limited"), rate_limit=1)
    await post_token(gateway, source, [{"uuid": f"rl-{i}"} for i in range(30)])
    workers.start()

    # Then the deliveries still due say they wait for the rate limit
    async def limited() -> list[dict[str, Any]]:
        rows = await _deliveries_of(gateway, tenant, target["id"])
        return [d for d in rows if d.get("waiting_for") == "rate_limit"]

    waiting = await eventually(limited, timeout=20, every=0.2)
    assert all(d["status"] == "pending" for d in waiting)
    assert all(
        datetime.fromisoformat(d["next_attempt_at"]) <= datetime.now().astimezone() for d in waiting
    )
    # and a delivery that went out does not
    await asyncio.sleep(0.5)
    done = [
        d for d in await _deliveries_of(gateway, tenant, target["id"]) if d["status"] == "succeeded"
    ]
    assert done and all("waiting_for" not in d for d in done)


async def test_a_due_delivery_that_nothing_holds_and_a_dead_letter_wait_for_nothing(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a due delivery of a healthy target (no worker runs) and a dead letter
    source = await make_source(client, tenant)
    target = await make_target(client, tenant)
    assert (await post_token(client, source, [{"uuid": "a"}, {"uuid": "b"}])).status == 202
    rows = await _deliveries_of(client, tenant, target["id"])
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE deliveries SET status = 'dead', next_attempt_at = NULL WHERE id = $1",
            rows[0]["id"],
        )
    finally:
        await conn.close()
    # Then neither says it waits for anything, in any list
    for shown in await _shown_everywhere(client, tenant, rows[1]["id"]):
        assert "waiting_for" not in shown
    dead = (await _get(client, tenant, "/v1/dead-letters"))["data"]
    assert [d["id"] for d in dead] == [rows[0]["id"]]
    assert "waiting_for" not in dead[0]
