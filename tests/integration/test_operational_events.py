"""Operational events: the relay tells a tenant about its own targets and deliveries.

Real `relay worker` processes and receivers on 127.0.0.1: a target of kind
"operational" receives Target disabled / circuit_opened / circuit_closed /
recovered / key_blocked and Delivery dead, signed like any delivery (verified
with the `standardwebhooks` library), filtered by its filter; its own failures
cause none; a change rolled back causes none. GET /v1/operational-events lists
them, a tenant's own only.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import asyncpg
import standardwebhooks
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Tenant, assert_error, make_tenant
from tests.integration.test_ingest import SOFTLEDGER, make_source, make_target, post_token
from tests.stack import Receiver, Workers, eventually, fail_then_succeed, fetch, status

ENVELOPE = ["uuid", "date", "objectType", "action", "objectId", "tenantId", "data"]


async def _operational(
    gateway: Any, tenant: Tenant, receiver: Receiver, path: str, **kw: Any
) -> Any:
    return await make_target(gateway, tenant, url=receiver.url(path), kind="operational", **kw)


def _bodies(receiver: Receiver, path: str, secret: str) -> list[dict[str, Any]]:
    """What ``path`` received, each verified as Standard Webhooks with ``secret``."""
    out = []
    for got in receiver.at(path):
        verified = standardwebhooks.Webhook(secret).verify(got.body, got.headers)
        assert verified == json.loads(got.body)
        out.append(verified)
    return out


async def _received(
    receiver: Receiver, path: str, secret: str, object_type: str, action: str, timeout: float = 30
) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]]:
        return [
            b
            for b in _bodies(receiver, path, secret)
            if b["objectType"] == object_type and b["action"] == action
        ]

    found: list[dict[str, Any]] = await eventually(check, timeout=timeout, every=0.1)
    return found


async def _listed(gateway: Any, tenant: Tenant, query: str = "") -> list[dict[str, Any]]:
    resp = await gateway.get(f"/v1/operational-events{query}", headers=tenant.auth)
    assert resp.status == 200, await resp.text()
    data: list[dict[str, Any]] = (await resp.json())["data"]
    return data


async def test_kind_is_validated_shown_and_set_at_creation(
    gateway: Any, receiver: Receiver
) -> None:
    tenant = await make_tenant(gateway)
    resp = await gateway.post(
        "/v1/targets", json={"url": receiver.url("/x"), "kind": "alerts"}, headers=tenant.auth
    )
    body = await assert_error(resp, 422, "validation_error")
    assert "kind" in json.dumps(body["details"])
    # an operational target is not ordered and names no sources
    resp = await gateway.post(
        "/v1/targets",
        json={"url": receiver.url("/x"), "kind": "operational", "ordering": "object"},
        headers=tenant.auth,
    )
    await assert_error(resp, 422, "validation_error")
    plain = await make_target(gateway, tenant, url=receiver.url("/plain"))
    assert plain["kind"] == "events"
    ops = await _operational(gateway, tenant, receiver, "/ops")
    assert ops["kind"] == "operational"
    shown = await (await gateway.get(f"/v1/targets/{ops['id']}", headers=tenant.auth)).json()
    assert shown["kind"] == "operational"
    # a different kind by PATCH is refused (set at creation); its own kind changes nothing
    resp = await gateway.patch(
        f"/v1/targets/{ops['id']}", json={"kind": "events"}, headers=tenant.auth
    )
    body = await assert_error(resp, 422, "validation_error")
    assert "kind" in json.dumps(body["details"])
    resp = await gateway.patch(
        f"/v1/targets/{ops['id']}",
        json={"kind": "operational", "description": "ops"},
        headers=tenant.auth,
    )
    assert resp.status == 200
    assert (await resp.json())["kind"] == "operational"
    resp = await gateway.patch(
        f"/v1/targets/{ops['id']}", json={"ordering": "object"}, headers=tenant.auth
    )
    await assert_error(resp, 422, "validation_error")


async def test_a_410_produces_target_disabled_signed_at_the_operational_target(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    tenant = await make_tenant(gateway)
    other = await make_tenant(gateway, "Other")
    source = await make_source(gateway, tenant)
    ops = await _operational(gateway, tenant, receiver, "/ops")
    other_ops = await _operational(gateway, other, receiver, "/other-ops")
    gone = await make_target(gateway, tenant, url=receiver.on("/gone", status(410)))
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]

    [told] = await _received(receiver, "/ops", ops["secret"], "Target", "disabled")
    assert list(told) == ENVELOPE
    assert told["objectId"] == gone["id"] and told["tenantId"] == tenant.id
    assert told["data"]["url"] == gone["url"] and "410" in told["data"]["reason"]
    # that delivery is dead too
    [dead] = await _received(receiver, "/ops", ops["secret"], "Delivery", "dead")
    [delivery] = await fetch(
        database_url, "SELECT id FROM deliveries WHERE event_id = $1", event_id
    )
    assert dead["objectId"] == delivery["id"] and dead["data"]["event_id"] == event_id
    # the operational target received no upstream event, and its webhook-id is the event id
    assert all(
        b["objectType"] in ("Target", "Delivery") for b in _bodies(receiver, "/ops", ops["secret"])
    )
    listed = await _listed(gateway, tenant)
    by_uuid = {e["uuid"]: e for e in listed}
    assert by_uuid[told["uuid"]]["object_id"] == gone["id"]
    ids = {r.headers["webhook-id"] for r in receiver.at("/ops")}
    assert ids == {e["id"] for e in listed}
    # another tenant hears nothing of it, and lists nothing
    assert receiver.at("/other-ops") == [] and other_ops["kind"] == "operational"
    assert await _listed(gateway, other) == []


async def test_refused_connections_open_the_circuit_and_the_receiver_back_closes_it(
    workers: Workers, gateway: Any, receiver: Receiver
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    ops = await _operational(gateway, tenant, receiver, "/ops", filter={"objectType": ["target"]})
    target = await make_target(gateway, tenant, url=f"http://127.0.0.1:{port}/back")
    workers.start(
        RELAY_BREAKER_THRESHOLD="5",
        RELAY_BREAKER_OPEN_S="1",
        RELAY_BREAKER_MAX_OPEN_S="2",
        RELAY_RETRY_SCHEDULE="0,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    )
    # 5 refused connections in a row
    assert (await post_token(gateway, source, [{"uuid": f"r-{i}"} for i in range(5)])).status == 202
    [opened] = await _received(receiver, "/ops", ops["secret"], "Target", "circuit_opened")
    assert opened["objectId"] == target["id"] and opened["data"]["url"] == target["url"]
    assert "until" in opened["data"] and opened["data"]["reason"]
    # the receiver comes back: the next probe succeeds and the breaker closes
    app = web.Application()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_route("*", "/{tail:.*}", ok)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    try:
        [closed] = await _received(receiver, "/ops", ops["secret"], "Target", "circuit_closed")
    finally:
        await server.close()
    assert closed["objectId"] == target["id"]
    # its filter (objectType Target) kept the deaths out: none was sent
    kinds = {b["objectType"] for b in _bodies(receiver, "/ops", ops["secret"])}
    assert kinds == {"Target"}


async def test_a_last_attempt_produces_delivery_dead_with_the_right_ids(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    ops = await _operational(gateway, tenant, receiver, "/ops", filter={"action": ["DEAD"]})
    down = await make_target(gateway, tenant, url=receiver.on("/down", status(500)))
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]
    [told] = await _received(receiver, "/ops", ops["secret"], "Delivery", "dead")
    [row] = await fetch(
        database_url,
        "SELECT id, attempt_count, last_error FROM deliveries WHERE event_id = $1",
        event_id,
    )
    assert told["objectId"] == row["id"] and told["tenantId"] == tenant.id
    assert told["data"] == {
        "event_id": event_id,
        "target_id": down["id"],
        "attempts": 3,
        "last_status_code": 500,
        "last_error": row["last_error"],
    }
    [listed] = await _listed(gateway, tenant, "?object_type=delivery")
    assert listed["object_id"] == row["id"] and listed["data"] == told["data"]
    assert await _listed(gateway, tenant, "?object_type=Target") == []


async def test_an_operational_target_that_fails_produces_nothing_about_itself(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    gone = await make_target(
        gateway, tenant, url=receiver.on("/gone", status(410)), kind="operational"
    )
    broken = await make_target(
        gateway, tenant, url=receiver.on("/broken", status(500)), kind="operational"
    )
    good = await _operational(gateway, tenant, receiver, "/good")
    down = await make_target(gateway, tenant, url=receiver.on("/down", status(500)))
    assert (await post_token(gateway, source, SOFTLEDGER)).status == 202
    # the events target's death reaches all three; the two failing ones die of it
    await _received(receiver, "/good", good["secret"], "Delivery", "dead")

    async def ops_deliveries_ended() -> bool:
        rows = await fetch(
            database_url,
            "SELECT status FROM deliveries WHERE target_id = ANY($1::text[])",
            [gone["id"], broken["id"]],
        )
        return len(rows) == 2 and all(r["status"] == "dead" for r in rows)

    await eventually(ops_deliveries_ended, timeout=30)
    shown = await (await gateway.get(f"/v1/targets/{gone['id']}", headers=tenant.auth)).json()
    assert shown["enabled"] is False  # disabled by its 410, and nobody told
    await worker_settled(gateway, tenant)
    listed = await _listed(gateway, tenant)
    about = {(e["object_type"], e["action"], e["object_id"]) for e in listed}
    [death] = await fetch(
        database_url, "SELECT id FROM deliveries WHERE target_id = $1", down["id"]
    )
    assert about == {("Delivery", "dead", death["id"])}
    assert len(_bodies(receiver, "/good", good["secret"])) == 1


async def worker_settled(gateway: Any, tenant: Tenant) -> None:
    """Let the sweeper and the worker finish what they would still do (a second or two)."""
    import asyncio

    await asyncio.sleep(2)


async def test_a_rolled_back_change_produces_nothing(
    gateway: Any, receiver: Receiver, database_url: str
) -> None:
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    await _operational(gateway, tenant, receiver, "/ops")
    target = await make_target(gateway, tenant, url=receiver.url("/t"))
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]
    conn = await asyncpg.connect(database_url)
    kill = """
        UPDATE deliveries SET status = 'dead', next_attempt_at = NULL, last_error = 'x'
        WHERE event_id = $1
    """
    opened = """
        INSERT INTO target_health (target_id, breaker, open_until, reason)
        VALUES ($1, 'open', now() + interval '1 minute', 'test')
    """
    told = "SELECT count(*) FROM events WHERE operational AND tenant_id = $1"
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(kill, event_id)
        await conn.execute(opened, target["id"])
        # inside the transaction, the events are there with their deliveries...
        assert await conn.fetchval(told, tenant.id) == 2
        await tx.rollback()
        # ...and rolled back with it
        assert await conn.fetchval(told, tenant.id) == 0
        assert await _listed(gateway, tenant) == []
        # committed, the same changes are told
        await conn.execute(kill, event_id)
        await conn.execute(opened, target["id"])
    finally:
        await conn.close()
    listed = await _listed(gateway, tenant)
    assert sorted(e["action"] for e in listed) == ["circuit_opened", "dead"]
    assert await fetch(
        database_url,
        "SELECT 1 FROM deliveries d JOIN events e ON e.id = d.event_id "
        "WHERE e.operational AND e.tenant_id = $1",
        tenant.id,
    )


async def test_recovered_after_failing_long_enough(
    workers: Workers, gateway: Any, receiver: Receiver
) -> None:
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    ops = await _operational(gateway, tenant, receiver, "/ops")
    flaky = await make_target(gateway, tenant, url=receiver.on("/flaky", fail_then_succeed(2)))
    workers.start(RELAY_RETRY_SCHEDULE="0,1,1", RELAY_RECOVERED_AFTER_S="1")
    assert (await post_token(gateway, source, SOFTLEDGER)).status == 202
    [told] = await _received(receiver, "/ops", ops["secret"], "Target", "recovered")
    assert told["objectId"] == flaky["id"]
    assert told["data"]["url"] == flaky["url"] and told["data"]["failing_since"].endswith("Z")


async def test_an_ordered_target_blocking_on_dead_tells_key_blocked(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    ops = await _operational(gateway, tenant, receiver, "/ops")
    ordered = await make_target(
        gateway,
        tenant,
        url=receiver.on("/ordered", status(500)),
        ordering="object",
        on_dead="block",
    )
    event = {"uuid": "k-1", "objectType": "Bill", "objectId": "B-7", "action": "paid"}
    [event_id] = (await (await post_token(gateway, source, event)).json())["event_ids"]
    [told] = await _received(receiver, "/ops", ops["secret"], "Target", "key_blocked")
    [row] = await fetch(
        database_url, "SELECT id, order_key FROM deliveries WHERE event_id = $1", event_id
    )
    assert told["objectId"] == ordered["id"]
    assert told["data"] == {"key": row["order_key"], "delivery_id": row["id"]}


async def test_the_list_pages_filters_and_refuses_bad_input(
    gateway: Any, receiver: Receiver, database_url: str
) -> None:
    tenant = await make_tenant(gateway)
    target = await make_target(gateway, tenant, url=receiver.url("/t"))
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(3):
            await conn.execute(
                "SELECT emit_operational($1, 'Target', 'circuit_closed', $2, "
                "jsonb_build_object('url', 'u'))",
                tenant.id,
                target["id"],
            )
        await conn.execute(
            "SELECT emit_operational($1, 'Delivery', 'dead', 'dlv_x', '{}'::jsonb)", tenant.id
        )
    finally:
        await conn.close()
    everything = await _listed(gateway, tenant)
    assert [e["object_type"] for e in everything] == ["Delivery", "Target", "Target", "Target"]
    assert [e["id"] for e in everything] == sorted((e["id"] for e in everything), reverse=True)
    resp = await gateway.get("/v1/operational-events?limit=2", headers=tenant.auth)
    first = await resp.json()
    assert len(first["data"]) == 2 and first["next_cursor"]
    resp = await gateway.get(
        f"/v1/operational-events?limit=2&cursor={first['next_cursor']}", headers=tenant.auth
    )
    second = await resp.json()
    assert [e["id"] for e in first["data"] + second["data"]] == [e["id"] for e in everything]
    assert second["next_cursor"] is None
    assert len(await _listed(gateway, tenant, "?object_type=target")) == 3
    assert await _listed(gateway, tenant, "?since=2999-01-01T00:00:00Z") == []
    assert len(await _listed(gateway, tenant, "?since=2000-01-01T00:00:00Z")) == 4
    # they are not upstream events
    events = await (await gateway.get("/v1/events", headers=tenant.auth)).json()
    assert events["data"] == []
    await assert_error(
        await gateway.get("/v1/operational-events?limit=0", headers=tenant.auth),
        422,
        "validation_error",
    )
    await assert_error(
        await gateway.get("/v1/operational-events?since=yesterday", headers=tenant.auth),
        422,
        "validation_error",
    )
    await assert_error(await gateway.get("/v1/operational-events"), 401, "unauthorized")


async def test_the_console_shows_a_tenants_own_on_the_overview_and_the_targets_page(
    client: Any, tenant: Tenant, other_tenant: Tenant, database_url: str
) -> None:
    from tests.conftest import ADMIN_TOKEN
    from tests.integration.test_console import make_dead, sign_in, tenant_objects

    mine = await tenant_objects(client, tenant)
    theirs = await tenant_objects(client, other_tenant)
    await make_dead(database_url, [mine["delivery"], theirs["delivery"]])
    await sign_in(client, tenant.api_key)
    overview = await (await client.get("/console/")).text()
    assert "Operational events" in overview
    assert "Delivery dead" in overview and mine["delivery"] in overview
    assert "dead after 3 attempts (HTTP 500)" in overview
    assert theirs["delivery"] not in overview
    page = await (await client.get(f"/console/targets/{mine['target']}")).text()
    assert mine["delivery"] in page and "Delivery dead" in page
    # an operator sees every tenant's
    client.session.cookie_jar.clear()
    await sign_in(client, ADMIN_TOKEN)
    overview = await (await client.get("/console/")).text()
    assert mine["delivery"] in overview and theirs["delivery"] in overview


async def test_a_burst_of_deaths_makes_one_delivery_dead_each_and_a_deletion_none(
    gateway: Any, receiver: Receiver, database_url: str
) -> None:
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    ops = await _operational(gateway, tenant, receiver, "/ops", max_in_flight=3)
    target = await make_target(gateway, tenant, url=receiver.url("/t"))
    doomed = await make_target(gateway, tenant, url=receiver.url("/doomed"))
    batch = [{"uuid": f"burst-{i}"} for i in range(500)]
    assert (await post_token(gateway, source, batch)).status == 202
    kill = """
        UPDATE deliveries SET status = 'dead', next_attempt_at = NULL, last_error = 'x'
        WHERE target_id = $1
    """
    conn = await asyncpg.connect(database_url)
    try:
        # 500 deaths in one statement: one Delivery dead each, and one delivery of each
        await conn.execute(kill, target["id"])
        # (the same rows "dying" again change nothing)
        await conn.execute(kill, target["id"])
        rows = await conn.fetch(
            """
            SELECT e.object_id, count(d.id) AS sent, min(d.target_id) AS to
            FROM events e LEFT JOIN deliveries d ON d.event_id = e.id
            WHERE e.tenant_id = $1 AND e.operational GROUP BY e.id, e.object_id
            """,
            tenant.id,
        )
        dead = await conn.fetch("SELECT id FROM deliveries WHERE target_id = $1", target["id"])
        assert sorted(r["object_id"] for r in rows) == sorted(r["id"] for r in dead)
        assert {(r["sent"], r["to"]) for r in rows} == {(1, ops["id"])}
        # a deleted target's deliveries die without telling (the tenant did it)
        resp = await gateway.delete(f"/v1/targets/{doomed['id']}", headers=tenant.auth)
        assert resp.status == 204
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM deliveries WHERE target_id = $1 AND status = 'dead'",
                doomed["id"],
            )
            == 500
        )
        told = "SELECT count(*) FROM events WHERE tenant_id = $1 AND operational"
        assert await conn.fetchval(told, tenant.id) == 500
    finally:
        await conn.close()


async def test_a_target_failing_for_disable_after_s_is_told_disabled(
    workers: Workers, gateway: Any, receiver: Receiver
) -> None:
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    ops = await _operational(gateway, tenant, receiver, "/ops", filter={"action": ["disabled"]})
    down = await make_target(gateway, tenant, url=receiver.on("/down", status(503)))
    workers.start(RELAY_RETRY_SCHEDULE="0,1,1,1,1,1", RELAY_DISABLE_AFTER_S="1")
    assert (await post_token(gateway, source, SOFTLEDGER)).status == 202
    [told] = await _received(receiver, "/ops", ops["secret"], "Target", "disabled")
    assert told["objectId"] == down["id"]
    shown = await (await gateway.get(f"/v1/targets/{down['id']}", headers=tenant.auth)).json()
    assert shown["enabled"] is False
    assert told["data"] == {"url": down["url"], "reason": shown["disabled_reason"]}
    assert "410" not in told["data"]["reason"]


async def test_an_operational_event_replays_to_the_operational_targets_only(
    gateway: Any, receiver: Receiver, database_url: str
) -> None:
    tenant = await make_tenant(gateway)
    ops = await _operational(gateway, tenant, receiver, "/ops")
    plain = await make_target(gateway, tenant, url=receiver.url("/plain"))
    conn = await asyncpg.connect(database_url)
    try:
        event_id = await conn.fetchval(
            "SELECT emit_operational($1, 'Target', 'circuit_closed', $2, '{}'::jsonb)",
            tenant.id,
            plain["id"],
        )
    finally:
        await conn.close()
    shown = await (await gateway.get(f"/v1/events/{event_id}", headers=tenant.auth)).json()
    assert shown["source_id"] is None and shown["payload"]["objectType"] == "Target"
    assert [d["target_id"] for d in shown["deliveries"]] == [ops["id"]]
    resp = await gateway.post(f"/v1/events/{event_id}/replay", headers=tenant.auth)
    assert resp.status == 202
    [again] = (await resp.json())["delivery_ids"]
    [row] = await fetch(database_url, "SELECT target_id FROM deliveries WHERE id = $1", again)
    assert row["target_id"] == ops["id"]
    resp = await gateway.post(
        f"/v1/events/{event_id}/replay", json={"target_ids": [plain["id"]]}, headers=tenant.auth
    )
    await assert_error(resp, 422, "validation_error")


async def test_the_sweepers_disabling_is_told_in_its_statement(
    gateway: Any, receiver: Receiver, database_url: str
) -> None:
    from relay.store.housekeeping import disable_failing_targets

    tenant = await make_tenant(gateway)
    ops = await _operational(gateway, tenant, receiver, "/ops")
    stale = await make_target(gateway, tenant, url=receiver.url("/stale"))
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE targets SET failing_since = now() - interval '1 hour' "
            "WHERE id = ANY($1::text[])",
            [stale["id"], ops["id"]],
        )
        disabled = await disable_failing_targets(conn, 60)
        assert {stale["id"], ops["id"]} <= set(disabled)
    finally:
        await conn.close()
    [told] = await _listed(gateway, tenant)
    assert (told["object_type"], told["action"], told["object_id"]) == (
        "Target",
        "disabled",
        stale["id"],
    )
    assert told["data"]["reason"].startswith("every attempt failed since")


def _slow_counting(seconds: float, peak: list[int]) -> Any:
    """Answer 200 after ``seconds``; ``peak[0]`` is the most requests held at once."""
    import asyncio

    held = [0]

    async def answer(request: web.Request, count: int) -> web.StreamResponse:
        held[0] += 1
        peak[0] = max(peak[0], held[0])
        try:
            await asyncio.sleep(seconds)
        finally:
            held[0] -= 1
        return web.Response(status=200)

    return answer


async def test_a_burst_reaches_an_operational_target_within_its_max_in_flight(
    workers: Workers, gateway: Any, receiver: Receiver
) -> None:
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    peak = [0]
    ops = await make_target(
        gateway,
        tenant,
        url=receiver.on("/ops", _slow_counting(0.3, peak)),
        kind="operational",
        max_in_flight=2,
    )
    down = await make_target(gateway, tenant, url=receiver.on("/down", status(500)))
    # one attempt each: every delivery to /down dies at its first 500, all at once
    workers.start(processes=2, RELAY_RETRY_SCHEDULE="0")
    batch = [{"uuid": f"burst-{i}"} for i in range(20)]
    assert (await post_token(gateway, source, batch)).status == 202

    async def all_told() -> list[dict[str, Any]]:
        got = _bodies(receiver, "/ops", ops["secret"])
        return got if len(got) >= 20 else []

    told = await eventually(all_told, timeout=30)
    assert len(told) == 20
    assert {(b["objectType"], b["action"]) for b in told} == {("Delivery", "dead")}
    assert len({b["objectId"] for b in told}) == 20
    assert {b["data"]["target_id"] for b in told} == {down["id"]}
    # the burst waited its turn: never more than max_in_flight at the receiver at once
    assert 1 <= peak[0] <= 2, peak


async def test_an_operational_target_refusing_connections_opens_its_own_breaker_silently(
    workers: Workers, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    ops = await make_target(gateway, tenant, url=f"http://127.0.0.1:{port}/ops", kind="operational")
    listening = await _operational(gateway, tenant, receiver, "/listening")
    down = await make_target(gateway, tenant, url=receiver.on("/down", status(500)))
    workers.start(
        RELAY_RETRY_SCHEDULE="0",
        RELAY_BREAKER_THRESHOLD="3",
        RELAY_BREAKER_OPEN_S="30",
        RELAY_BREAKER_MAX_OPEN_S="30",
    )
    # 5 deaths at /down (whose own breaker opens too): a Delivery dead each, and a
    # circuit_opened, to both operational targets; /ops refuses every one
    batch = [{"uuid": f"refused-{i}"} for i in range(5)]
    assert (await post_token(gateway, source, batch)).status == 202

    async def opened() -> dict[str, Any] | None:
        resp = await gateway.get(f"/v1/targets/{ops['id']}", headers=tenant.auth)
        shown: dict[str, Any] = await resp.json()
        return shown if shown["circuit"]["state"] == "open" else None

    shown = await eventually(opened, timeout=15)
    assert shown["circuit"]["until"] and shown["enabled"] is True

    async def told_and_ended() -> list[dict[str, Any]]:
        listed = await _listed(gateway, tenant)
        rows = await fetch(
            database_url, "SELECT status FROM deliveries WHERE target_id = $1", ops["id"]
        )
        heard = _bodies(receiver, "/listening", listening["secret"])
        ended = all(r["status"] == "dead" for r in rows)
        if len(listed) >= 5 and len(rows) == len(heard) == len(listed) and ended:
            return listed
        return []

    listed = await eventually(told_and_ended, timeout=15)
    # the operational events are about /down only: nothing names the operational
    # target, neither its breaker opening nor its deliveries dying
    assert ops["id"] not in json.dumps(listed), listed
    about = {e["object_id"] for e in listed if e["object_type"] == "Target"}
    assert about <= {down["id"]}
    dead = [e for e in listed if e["object_type"] == "Delivery"]
    assert len(dead) == 5 and {e["data"]["target_id"] for e in dead} == {down["id"]}
