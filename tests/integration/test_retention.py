"""Retention: the sweeper's housekeeping purges what is past RELAY_RETENTION_DAYS, only that."""

from __future__ import annotations

from typing import Any

import asyncpg

from relay.core.config import Settings
from relay.delivery.wakeups import Enqueuer, make_broker
from tests.conftest import Tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from workers.sweeper import Sweeper


async def test_housekeeping_purges_old_events_with_their_deliveries_and_attempts(
    client: Any, tenant: Tenant, settings: Settings, database_url: str
) -> None:
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    ids = (await (await post_token(client, source, [{"n": i} for i in range(6)])).json())[
        "event_ids"
    ]
    conn = await asyncpg.connect(database_url)
    try:
        # Given three old events whose deliveries finished, one old event whose delivery
        # is still to be sent (its target was disabled for longer than the retention),
        # and two recent ones
        old, unfinished, recent = ids[:3], ids[3], ids[4:]
        await conn.execute(
            "UPDATE events SET received_at = now() - interval '31 days' WHERE id = ANY($1)",
            [*old, unfinished],
        )
        await conn.execute(
            "UPDATE deliveries SET status = CASE WHEN event_id = $2 THEN 'dead' ELSE 'succeeded' "
            "END, next_attempt_at = NULL WHERE event_id = ANY($1)",
            old,
            old[0],
        )
        await conn.execute(
            "UPDATE deliveries SET status = 'retrying' WHERE event_id = $1", unfinished
        )
        # (the death told the tenant: an operational event, as old as the others here, and
        # purged with the same retention)
        told = await conn.fetchval(
            "UPDATE events SET received_at = now() - interval '31 days' "
            "WHERE tenant_id = $1 AND operational RETURNING id",
            tenant.id,
        )
        assert told is not None
        await conn.execute(
            "INSERT INTO attempts (id, tenant_id, delivery_id, started_at, duration_ms) "
            "SELECT 'att_' || id, tenant_id, id, now(), 1 FROM deliveries WHERE event_id = ANY($1)",
            old,
        )
        sweeper = Sweeper(settings, Enqueuer(make_broker(settings.broker_url, middleware=[])))
        await sweeper.housekeeping(conn)
        left = {
            r["id"]
            for r in await conn.fetch("SELECT id FROM events WHERE tenant_id = $1", tenant.id)
        }
        # Then only the finished old events are gone; the unfinished one stays
        assert left == {unfinished, *recent}
        assert (
            await conn.fetchval("SELECT count(*) FROM deliveries WHERE event_id = ANY($1)", old)
            == 0
        )
        assert await conn.fetchval("SELECT count(*) FROM attempts WHERE id LIKE 'att_dlv%'") == 0
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM deliveries WHERE event_id = ANY($1)", [unfinished, *recent]
            )
            == 3
        )
        await sweeper.enqueuer.close()
    finally:
        await conn.close()
