"""The circuit breaker saves attempts but never lengthens a delivery's retry window.

Real `relay worker` processes, a receiver that always fails, a short schedule
and a long open period: the deliveries the open breaker holds become dead
letters when their window (the schedule's total from their creation or last
replay) ends, not when probes 60 s, 120 s… apart get round to them, one per
probe. The breaker's openings and closings are logged by the process that
made them.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from relay.delivery.outcome import Breaker
from relay.store import claims
from tests.conftest import Tenant, make_tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Receiver, Workers, eventually, fetch

#: The schedule: three attempts, the window 2 s from creation.
SCHEDULE = "0,1,1"
WINDOW_S = 2.0
#: What API.md allows past the window: the sweeper runs each second, and the test
#: shares two cores with Postgres, the gateway and the workers.
SLACK_S = 5.0


async def _target(gateway: Any, tenant: Tenant, target_id: str) -> dict[str, Any]:
    resp = await gateway.get(f"/v1/targets/{target_id}", headers=tenant.auth)
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def _deliveries(database_url: str, target_id: str) -> list[Any]:
    return await fetch(
        database_url,
        "SELECT id, status, attempt_count, last_error, created_at, updated_at FROM deliveries "
        "WHERE target_id = $1 ORDER BY id",
        target_id,
    )


def _log_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            lines.append(parsed)
    return lines


async def test_deliveries_behind_an_open_breaker_become_dead_letters_when_their_window_ends(
    workers: Workers, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given a target that always answers 503, a breaker that opens after 2 failures
    # for a minute, and a schedule of 3 attempts within 2 s
    async def down(request: web.Request, count: int) -> web.StreamResponse:
        return web.Response(status=503)

    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    target = await make_target(gateway, tenant, url=receiver.on("/down", down))
    worker = workers.start(
        RELAY_RETRY_SCHEDULE=SCHEDULE,
        RELAY_BREAKER_THRESHOLD="2",
        RELAY_BREAKER_OPEN_S="60",
        RELAY_BREAKER_MAX_OPEN_S="600",
    )
    # When 5 events fail their first attempt and open the breaker
    assert (await post_token(gateway, source, [{"uuid": f"w-{i}"} for i in range(5)])).status == 202

    async def opened() -> dict[str, Any] | None:
        shown = await _target(gateway, tenant, target["id"])
        return shown if shown["circuit"]["state"] == "open" else None

    shown = await eventually(opened, timeout=30, every=0.05)
    until = datetime.fromisoformat(shown["circuit"]["until"])
    sent_before = len(receiver.at("/down"))
    # and 5 more arrive while it is open
    assert (await post_token(gateway, source, [{"uuid": f"x-{i}"} for i in range(5)])).status == 202

    # Then every delivery becomes a dead letter when its window ends, long before the
    # breaker's open period does (no probe is needed for it)
    async def all_dead() -> list[Any] | None:
        rows = await _deliveries(database_url, target["id"])
        return rows if len(rows) == 10 and all(r["status"] == "dead" for r in rows) else None

    rows = await eventually(all_dead, timeout=25, every=0.2)
    for row in rows:
        lived = (row["updated_at"] - row["created_at"]).total_seconds()
        assert lived <= WINDOW_S + SLACK_S, (row["id"], lived)
        assert row["updated_at"] < until
        # saying that the circuit was open
        assert "circuit open" in row["last_error"], row["last_error"]
    # and no attempt went out on the wire while the breaker was open
    assert len(receiver.at("/down")) == sent_before
    attempts = await fetch(
        database_url,
        "SELECT a.error FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
        "WHERE d.target_id = $1",
        target["id"],
    )
    assert len(attempts) == sent_before
    # and the ones that arrived while it was open were never attempted
    late = [r for r in rows if r["created_at"] > until - timedelta(seconds=60)]
    assert late and all(r["attempt_count"] == 0 for r in late)

    # And the worker said once, at WARNING, that the breaker opened: target, tenant, reason, until
    opened_lines = [
        line
        for line in _log_lines(worker.log())
        if line.get("msg") == "circuit breaker opened" and line.get("target_id") == target["id"]
    ]
    assert len(opened_lines) == 1, opened_lines
    line = opened_lines[0]
    assert line["level"] == "warning"
    assert line["tenant_id"] == tenant.id
    assert "2 failures in a row" in line["reason"]
    # (the API shows milliseconds)
    assert abs((datetime.fromisoformat(line["until"]) - until).total_seconds()) < 0.001


async def _row(conn: Any, delivery_id: str) -> Any:
    return await conn.fetchrow(
        "SELECT status, next_attempt_at, last_error, attempt_count FROM deliveries WHERE id = $1",
        delivery_id,
    )


async def test_the_window_spares_the_probe_lets_the_key_go_on_and_restarts_on_retry(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given an ordered target whose breaker is open, with two events of one Bill and one
    # of another, whose windows (2 s) ended long ago
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, ordering="object")
    events = [
        {"objectType": "Bill", "objectId": 1, "n": 1},
        {"objectType": "Bill", "objectId": 1, "n": 2},
        {"objectType": "Bill", "objectId": 2, "n": 1},
    ]
    assert (await post_token(client, source, events)).status == 202
    conn = await asyncpg.connect(database_url)
    try:
        ids = [
            r["id"]
            for r in await conn.fetch(
                "SELECT d.id FROM deliveries d JOIN events e ON e.id = d.event_id "
                "WHERE d.target_id = $1 ORDER BY e.id",
                target["id"],
            )
        ]
        head, parked, probe = ids
        await claims.save_breaker(
            conn, target["id"], Breaker("open", 5, 1, "5 failures in a row", open_for_s=60)
        )
        await conn.execute(
            "UPDATE deliveries SET created_at = created_at - interval '10 seconds' "
            "WHERE target_id = $1",
            target["id"],
        )
        # and the other Bill's delivery is the probe in flight (leased)
        await conn.execute(
            "UPDATE deliveries SET locked_until = now() + interval '1 minute' WHERE id = $1", probe
        )
        # When the sweeper ends what the breaker holds past its window
        ended, promoted = await claims.end_past_window(conn, window_s=2, limit=100, grace_s=30)
        # Then the first Bill's head is dead, saying the circuit was open, with no attempt
        assert [e.id for e in ended] == [head]
        row = await _row(conn, head)
        assert row["status"] == "dead" and row["attempt_count"] == 0
        assert row["last_error"].startswith("circuit open")
        assert "5 failures in a row" in row["last_error"]
        # and the next of its key goes on, with a window of its own from now
        assert [p.id for p in promoted] == [parked]
        again, _ = await claims.end_past_window(conn, window_s=2, limit=100, grace_s=30)
        assert again == []
        assert (await _row(conn, parked))["status"] == "pending"
        # and the probe is left to its record
        assert (await _row(conn, probe))["status"] == "pending"
        # When the dead one is retried, its window starts again
        resp = await client.post(f"/v1/deliveries/{head}/retry", headers=tenant.auth)
        assert resp.status == 202
        ended, _ = await claims.end_past_window(conn, window_s=2, limit=100, grace_s=30)
        assert ended == []
        # and a disabled target's deliveries wait for it, whatever its breaker says
        await conn.execute(
            "UPDATE deliveries SET round_started_at = now() - interval '1 minute', "
            "created_at = now() - interval '1 minute' WHERE target_id = $1",
            target["id"],
        )
        resp = await client.patch(
            f"/v1/targets/{target['id']}", json={"enabled": False}, headers=tenant.auth
        )
        assert resp.status == 200
        ended, _ = await claims.end_past_window(conn, window_s=2, limit=100, grace_s=30)
        assert ended == []
    finally:
        await conn.close()


async def test_enabling_a_target_again_logs_that_its_breaker_closed(
    client: Any, tenant: Tenant, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a disabled target whose breaker is open
    target = await make_target(client, tenant, enabled=False)
    conn = await asyncpg.connect(database_url)
    try:
        await claims.save_breaker(
            conn, target["id"], Breaker("open", 5, 1, "5 failures in a row", open_for_s=60)
        )
    finally:
        await conn.close()
    # When it is enabled again
    caplog.set_level(logging.INFO, logger="relay.breaker")
    resp = await client.patch(
        f"/v1/targets/{target['id']}", json={"enabled": True}, headers=tenant.auth
    )
    assert resp.status == 200
    assert (await resp.json())["circuit"]["state"] == "closed"
    # Then the gateway said, once, at INFO, that its breaker closed
    closed = [r for r in caplog.records if r.getMessage() == "circuit breaker closed"]
    assert len(closed) == 1
    assert closed[0].levelno == logging.INFO
    assert closed[0].__dict__["target_id"] == target["id"]
    assert closed[0].__dict__["tenant_id"] == tenant.id
    # and enabling it once more (nothing to close) says nothing
    resp = await client.patch(
        f"/v1/targets/{target['id']}", json={"enabled": True}, headers=tenant.auth
    )
    assert resp.status == 200
    assert len([r for r in caplog.records if r.getMessage() == "circuit breaker closed"]) == 1
