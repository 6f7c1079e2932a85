"""The sweeper vacuums what every delivery churns, whatever autovacuum does.

A delivery's row leaves the open partition when it ends, and its lease row comes
and goes. The open partition also keeps every dead letter until retention, so
autovacuum's default trigger (a fifth of the table dead) waited for more dead rows
the longer the history, and where autovacuum is off (as on the CI's Postgres),
for ever. The readers of what is due (GET /v1/admin/stats, the console's
overview) stepped over every delivery sent since: with 2 M events of history,
after a drain of 20,000, the stats took 1.93 ms against 0.57 once vacuumed.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from relay.store import claims, housekeeping
from tests.conftest import Tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import ended_attempt

SENT = 3_000
#: what GET /v1/admin/stats reads of the due deliveries (relay/store/housekeeping.stats)
OLDEST_DUE = """
SELECT min(next_attempt_at) FROM deliveries
WHERE status IN ('pending', 'retrying') AND next_attempt_at <= now()
"""


async def _pages_read(conn: asyncpg.Connection, query: str) -> int:
    """Buffers (shared, hit or read) the query's plan touched."""
    [plan] = json.loads(await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query))
    top = plan["Plan"]
    return int(top["Shared Hit Blocks"] + top["Shared Read Blocks"])


async def _dead_rows(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT relname, n_dead_tup FROM pg_stat_user_tables WHERE relname = ANY($1::text[])",
        ["deliveries_open", "delivery_leases"],
    )
    return {r["relname"]: r["n_dead_tup"] for r in rows}


async def test_the_sweeper_vacuums_the_deliveries_sent_out_of_the_open_partition(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given SENT deliveries claimed and recorded as succeeded, as a worker does
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, max_in_flight=1000)
    for first in range(0, SENT, 500):
        batch = [{"n": n} for n in range(first, first + 500)]
        assert (await post_token(client, source, batch)).status == 202
    worker = await asyncpg.connect(database_url)
    try:
        for _ in range(SENT // 1000):
            _, claimed = await claims.claim_batch(worker, target["id"], want=1000, lease_s=60)
            attempts = [ended_attempt(c, 200) for c in claimed]
            await claims.record_batch(worker, target["id"], attempts, breaker=None)
    finally:
        await worker.close()  # (its statistics are reported as it ends)
    sweeper = await asyncpg.connect(database_url)
    try:
        before = await _pages_read(sweeper, OLDEST_DUE)
        assert min((await _dead_rows(sweeper)).values()) >= SENT
        # When the sweeper's housekeeping runs
        vacuumed = await housekeeping.vacuum_churned(sweeper)
        # Then it vacuumed the open partition and the leases, and the stats' read of
        # what is due touches a few pages, not one per delivery sent
        assert {"deliveries_open", "delivery_leases"} <= set(vacuumed)
        after = await _pages_read(sweeper, OLDEST_DUE)
        assert before > 20 and after <= 5, (before, after)
        assert max((await _dead_rows(sweeper)).values()) < housekeeping.CHURN_DEAD_ROWS
        # and with nothing churned since, the next housekeeping vacuums nothing
        assert await housekeeping.vacuum_churned(sweeper) == []
    finally:
        await sweeper.close()
