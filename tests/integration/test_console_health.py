"""A target's health figures on the console: latency only of attempts that got an answer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from relay.core.crypto import new_id
from relay.store import console as store
from tests.conftest import Tenant


async def test_a_target_whose_attempts_were_all_refused_has_no_latency(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a target with one delivery whose three attempts were all refused (no answer, 0 ms)
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
        json={"uuid": "u1", "objectType": "Bill", "action": "paid"},
    )
    assert resp.status == 202
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
