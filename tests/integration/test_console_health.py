"""A target's health figures on the console: latency only of attempts that got an answer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from relay.core.crypto import new_id
from relay.store import console as store
from tests.conftest import Tenant
from tests.integration.test_console import csrf_of, sign_in


async def one_delivery(client: Any, tenant: Tenant, uuid: str) -> str:
    """A source, a target and one event to it; the target's id."""
    source = await (
        await client.post(
            "/v1/sources", json={"name": "s", "auth": {"type": "token"}}, headers=tenant.auth
        )
    ).json()
    target = await (
        await client.post("/v1/targets", json={"url": "https://example.com/h"}, headers=tenant.auth)
    ).json()
    resp = await client.post(
        f"/in/{source['id']}",
        params={"token": source["secret"]},
        json={"uuid": uuid, "objectType": "Bill", "action": "paid"},
    )
    assert resp.status == 202
    target_id: str = target["id"]
    return target_id


async def test_a_target_whose_attempts_were_all_refused_has_no_latency(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a target with one delivery whose three attempts were all refused (no answer, 0 ms)
    target = {"id": await one_delivery(client, tenant, "u1")}
    conn = await asyncpg.connect(database_url)
    try:
        delivery_id = await conn.fetchval(
            "SELECT id FROM deliveries WHERE target_id = $1", target["id"]
        )
        for _ in range(3):
            await conn.execute(
                "INSERT INTO attempts (id, tenant_id, delivery_id, started_at, duration_ms, "
                "status_code, error) VALUES ($1, $2, $3, now(), 0, NULL, 'connection refused')",
                new_id("att"),
                tenant.id,
                delivery_id,
            )
        # When its health over the last hour is read
        since = datetime.now(UTC) - timedelta(hours=1)
        health = (await store.target_health(conn, tenant.id, [target["id"]], since=since))[
            target["id"]
        ]
    finally:
        await conn.close()
    # Then the attempts count, none succeeded, and no latency is made up from refusals
    assert health.attempts == 3 and health.succeeded == 0
    assert health.p50_ms is None and health.p99_ms is None


async def test_the_chart_keeps_a_death_after_its_dead_letter_is_replayed(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a delivery that died this minute
    await one_delivery(client, tenant, "u2")
    since = datetime.now(UTC) - timedelta(hours=3)
    conn = await asyncpg.connect(database_url)
    try:
        delivery_id = await conn.fetchval(
            "SELECT id FROM deliveries WHERE tenant_id = $1", tenant.id
        )
        await conn.execute(
            "UPDATE deliveries SET status = 'dead', next_attempt_at = NULL WHERE id = $1",
            delivery_id,
        )
        died = sum(p.died for p in await store.outcomes_by_minute(conn, tenant.id, since=since))
        assert died == 1
        # When its dead letter is replayed (it is pending again)
        replay = await client.post(
            "/v1/dead-letters/replay", json={"ids": [delivery_id]}, headers=tenant.auth
        )
        assert replay.status == 202, await replay.text()
        status = await conn.fetchval("SELECT status FROM deliveries WHERE id = $1", delivery_id)
        assert status == "pending"
        # Then the chart still counts the death in the minute it happened
        after = sum(p.died for p in await store.outcomes_by_minute(conn, tenant.id, since=since))
    finally:
        await conn.close()
    assert after == 1


async def test_the_console_says_what_holds_due_deliveries_and_replays(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a dead letter of a target whose breaker is open
    target_id = await one_delivery(client, tenant, "u3")
    conn = await asyncpg.connect(database_url)
    try:
        delivery_id = await conn.fetchval(
            "SELECT id FROM deliveries WHERE target_id = $1", target_id
        )
        await conn.execute(
            "UPDATE deliveries SET status = 'dead', next_attempt_at = NULL WHERE id = $1",
            delivery_id,
        )
        await conn.execute(
            "INSERT INTO target_health (target_id, breaker, consecutive_failures, opened_count,"
            " reason, open_until, changed_at)"
            " VALUES ($1, 'open', 5, 1, 'HTTP 503', now() + interval '10 minutes', now())",
            target_id,
        )
    finally:
        await conn.close()
    await sign_in(client, tenant.api_key)
    # When it is replayed from the console
    csrf = await csrf_of(client, "/console/dead-letters")
    resp = await client.post(
        "/console/dead-letters/replay",
        data={"csrf_token": csrf, "ids": delivery_id, "scope": "selected", "confirm": "yes"},
    )
    page = await resp.text()
    # Then the confirmation says it waits for the breaker, not that it goes within seconds
    assert "circuit breaker is open" in page and "within seconds" not in page
    # and the overview says what holds the due backlog
    overview = await (await client.get("/console/")).text()
    assert "1 held by 1 open breaker" in overview
