"""A claim costs what it claims, not what waits: before Postgres has statistics too.

A target's claim counts its leased deliveries (its cap holds across worker
processes). On a fresh partition, with no statistics yet (a new install, a day's
partition, a bench's database), the planner read that count through the due-index
of every pending delivery: a claim read ~2,700 pages at a backlog of 8,000, so a
target at 1,000 events/s fell behind and each claim grew slower with the backlog
it left (the e2e bench at 1,000/s: p50 10-16 s on the partitioned schema against
133 ms before it; the count read 2,685 pages at a backlog of 8,249 with its dead
rows). Pages read are counted by EXPLAIN (ANALYZE, BUFFERS), inside a transaction
rolled back, so the claim changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from relay.store import claims

BACKLOG = 40_000
CAP = 10


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    # the state of a fresh partition: autovacuum must not gather statistics meanwhile
    await connection.execute("ALTER TABLE deliveries_open SET (autovacuum_enabled = false)")
    yield connection
    await connection.execute("ALTER TABLE deliveries_open RESET (autovacuum_enabled)")
    await connection.close()


async def backlog(conn: asyncpg.Connection, target: str, leased: int) -> None:
    tenant = f"ten_{target}"
    await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, 'claims')", tenant)
    await conn.execute(
        "INSERT INTO targets (id, tenant_id, url, secret_enc)"
        " VALUES ($1, $2, 'http://127.0.0.1:9/', '\\x00')",
        target,
        tenant,
    )
    await conn.execute(
        """
        INSERT INTO deliveries (id, tenant_id, event_id, target_id, status, next_attempt_at,
                                locked_until)
        SELECT $1 || lpad(g::text, 8, '0'), $2, 'evt_' || g, $3, 'pending',
               now() - interval '1 minute' + g * interval '1 ms',
               CASE WHEN g <= $4 THEN now() + interval '30 seconds' END
        FROM generate_series(1, $5::int) g
        """,
        f"dlv_{target}_",
        tenant,
        target,
        leased,
        BACKLOG,
    )


async def pages_read(conn: asyncpg.Connection, target: str, want: int) -> tuple[int, int]:
    """(pages a claim of ``want`` reads, deliveries it claims), the claim rolled back."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        [plan] = json.loads(
            await conn.fetchval(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + claims._CLAIM,
                target,
                want,
                CAP,
                30.0,
            )
        )
    finally:
        await transaction.rollback()
    top = plan["Plan"]
    return top["Shared Hit Blocks"] + top["Shared Read Blocks"], top["Actual Rows"]


@pytest.mark.parametrize("leased", [0, CAP // 2])
async def test_a_claim_reads_pages_for_its_cap_not_for_the_backlog(
    conn: asyncpg.Connection, leased: int
) -> None:
    target = f"tgt_claimcost{leased}"
    await backlog(conn, target, leased)
    stats = await conn.fetchval("SELECT count(*) FROM pg_stats WHERE tablename = 'deliveries_open'")
    assert stats == 0  # no statistics: the planner guesses
    pages, claimed = await pages_read(conn, target, CAP)
    assert claimed == CAP - leased  # the cap holds, leased ones counted
    # ~25 pages per claimed row (its lease is written in each of the partition's indexes)
    # and a few per leased one: not the backlog's (~1,100 pages at 40,000 before the fix)
    assert pages < 500, pages
