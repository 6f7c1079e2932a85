"""A claim costs what it claims, not what waits: whatever Postgres's statistics say.

A target's claim counts its leased deliveries (its cap holds across worker
processes). On a fresh partition, with no statistics yet (a new install, a day's
partition, a bench's database), the planner read that count through the due-index
of every pending delivery: a claim read ~2,700 pages at a backlog of 8,000, so a
target at 1,000 events/s fell behind and each claim grew slower with the backlog
it left (the e2e bench at 1,000/s: p50 10-16 s on the partitioned schema against
133 ms before it; the count read 2,685 pages at a backlog of 8,249 with its dead
rows). And with statistics taken while the queue was empty (bench/history.py
analyzes after its fill), the claim's UPDATE joined its ten rows to every pending
delivery of the partition (a nested loop over the unsent index: 14,400 rows, 31 ms
a claim, the backlog's drain at 487/s). Pages read are counted by EXPLAIN (ANALYZE,
BUFFERS), inside a transaction rolled back, so the claim changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from relay.store import claims

BACKLOG = 40_000
CAP = 10


@pytest.fixture(params=["no statistics", "statistics of an empty queue"])
async def conn(
    database_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    # autovacuum must not gather statistics meanwhile
    await connection.execute("ALTER TABLE deliveries_open SET (autovacuum_enabled = false)")
    # emptied whole: rows deleted by an earlier case would leave dead index entries to read
    await connection.execute("TRUNCATE deliveries_open")
    if await connection.fetchval("SELECT to_regclass('delivery_leases') IS NOT NULL"):
        await connection.execute("TRUNCATE delivery_leases")
    await connection.execute(
        "DELETE FROM pg_statistic WHERE starelid = 'deliveries_open'::regclass"
    )
    if request.param == "statistics of an empty queue":
        # the planner's view once a quiet queue was analyzed, and a burst came
        await connection.execute("ANALYZE deliveries_open")
    yield connection
    await connection.execute("ALTER TABLE deliveries_open RESET (autovacuum_enabled)")
    await connection.close()


async def backlog(conn: asyncpg.Connection, target: str, leased: int) -> None:
    tenant = f"ten_{target}"
    await conn.execute(
        "INSERT INTO tenants (id, name) VALUES ($1, 'claims') ON CONFLICT DO NOTHING", tenant
    )
    await conn.execute(
        "INSERT INTO targets (id, tenant_id, url, secret_enc)"
        " VALUES ($1, $2, 'http://127.0.0.1:9/', '\\x00') ON CONFLICT DO NOTHING",
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
    if await conn.fetchval("SELECT to_regclass('delivery_leases') IS NOT NULL"):
        # the leases held are counted where claims write them (migration 0014)
        await conn.execute(
            "INSERT INTO delivery_leases SELECT id, target_id, locked_until FROM deliveries_open"
            " WHERE target_id = $1 AND locked_until IS NOT NULL",
            target,
        )


async def pages_read(conn: asyncpg.Connection, target: str, want: int) -> tuple[int, int]:
    """(pages a claim of ``want`` reads, deliveries it claims), the claim rolled back.

    The claim is one call (relay_claim): the pages its statements read are counted
    on the call's node (Postgres counts buffers per backend, nested statements too).
    """
    transaction = conn.transaction()
    await transaction.start()
    try:
        # a connection's first call reads the catalog to plan the function's
        # statements (~400 pages, once): measure a worker's every other call
        await conn.execute(
            "INSERT INTO targets (id, tenant_id, url, secret_enc)"
            " SELECT $1 || '_warm', tenant_id, url, secret_enc FROM targets WHERE id = $1",
            target,
        )
        warm = await conn.fetchrow(
            claims._CLAIM,
            target + "_warm",
            claims._CLAIM_LOCK,
            want,
            30.0,
            "warm",
            0,
            0.0,
            1,
            [],
            None,
            0,
        )
        assert warm["claimed"] == []  # its statements planned, on a target with nothing due
        [plan] = json.loads(
            await conn.fetchval(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + claims._CLAIM,
                target,
                claims._CLAIM_LOCK,
                want,
                30.0,
                "drainer",
                0,
                claims.SHARE_S,
                claims.SHARE_MIN_PART,
                [],
                claims.INLINE_PAYLOAD_BYTES,
                0,
            )
        )
        claimed = await conn.fetchval(
            "SELECT count(*) FROM deliveries_open WHERE target_id = $1 AND locked_until > now()",
            target,
        )
    finally:
        await transaction.rollback()
    top = plan["Plan"]
    return top["Shared Hit Blocks"] + top["Shared Read Blocks"], claimed


@pytest.mark.parametrize("leased", [0, CAP // 2])
async def test_a_claim_reads_pages_for_its_cap_not_for_the_backlog(
    conn: asyncpg.Connection, leased: int
) -> None:
    target = f"tgt_claimcost{leased}"
    await backlog(conn, target, leased)
    stats = await conn.fetchval("SELECT count(*) FROM pg_stats WHERE tablename = 'deliveries_open'")
    assert stats == 0  # no statistics: the planner guesses
    pages, claimed = await pages_read(conn, target, CAP)
    assert claimed == CAP  # the cap holds, leased ones counted
    # ~6 pages per claimed row (its lease row, and the row's new version on its own
    # page: 57 for 10 counted on the claim's statement alone; 215 when the lease was
    # written in each of the partition's indexes) and a few per leased one, plus,
    # now that the claim is one call, what its statements' planning and the target
    # read take (136 for 10 in all), and since 0018 the payloads' read, planned at each
    # claim with the events' ids as values so that only their partitions are opened
    # (221-277 in all on Debian's Postgres 15, 367-369 on the embedded one of
    # `[embedded]`): a cost per claim, not the backlog's (~1,100 pages at 40,000)
    assert pages < 500, pages


async def test_a_record_reads_pages_for_what_it_records_not_for_the_backlog(
    conn: asyncpg.Connection,
) -> None:
    target = "tgt_recordcost"
    await backlog(conn, target, 0)
    transaction = conn.transaction()
    await transaction.start()
    try:
        # (the backlog's deliveries have no events: the call's own answer names them)
        claim = await conn.fetchrow(
            claims._CLAIM, target, claims._CLAIM_LOCK, CAP, 30.0, None, 0, 0.0, 1, [], None, 0
        )
        assert len(claim["claimed"]) == CAP
        now = datetime.now(UTC)
        # the record is a function (0018) whose statements are planned at its first
        # call in a session, as a prepared statement's were when prepared: planned
        # here, by a record of nothing, their planning's pages are not the record's
        empty: list[None] = []
        await conn.fetchrow(claims._RECORD, *[empty] * 11, target, None)
        n = CAP
        [plan] = json.loads(
            await conn.fetchval(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + claims._RECORD,
                claim["claimed"],
                claim["leases"],
                ["succeeded"] * n,
                [None] * n,
                [None] * n,
                [200] * n,
                [None] * n,
                [f"att_recordcost{i}" for i in range(n)],
                [now] * n,
                [3] * n,
                [None] * n,
                target,
                None,
            )
        )
    finally:
        await transaction.rollback()
    top = plan["Plan"]
    pages = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    # each row leaves the unsent partition for a day's sent one, with its attempt
    assert pages < 800, pages


async def test_claim_batch_claims_under_the_plan_measured_here(conn: asyncpg.Connection) -> None:
    # the figures above are measured on the call claim_batch makes, whose plan settings
    # are the function's own: they hold inside it whatever the session's are
    target = "tgt_claimplan"
    await backlog(conn, target, 0)
    settings = await conn.fetchval("SELECT proconfig FROM pg_proc WHERE proname = 'relay_claim'")
    # (and planned once per connection, 0023: the plan measured is the one every call runs)
    assert set(settings) == {
        "enable_sort=off",
        "jit=off",
        "enable_seqscan=off",
        "plan_cache_mode=force_generic_plan",
    }
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("SET LOCAL jit = on; SET LOCAL jit_above_cost = 0")
        # (the backlog's deliveries have no events: they are claimed, not returned)
        await claims.claim_batch(conn, target, want=CAP, lease_s=30.0)
        leased = (
            "SELECT count(*) FROM deliveries_open WHERE target_id = $1 AND locked_until > now()"
        )
        assert await conn.fetchval(leased, target) == CAP
        # and the session's own settings are left as they were
        assert await conn.fetchval("SHOW enable_sort") == "on"
        assert await conn.fetchval("SHOW jit") == "on"
    finally:
        await transaction.rollback()


async def test_a_claim_writes_no_index_entry(conn: asyncpg.Connection) -> None:
    # Given a backlog inserted as the ingest inserts it (after the migrations)
    target = "tgt_claimhot"
    await backlog(conn, target, 0)
    transaction = conn.transaction()
    await transaction.start()
    try:
        # When a worker claims from it
        await claims.claim_batch(conn, target, want=CAP, lease_s=30.0)
        updated, hot = await conn.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
            " WHERE relname = 'deliveries_open'"
        )
    finally:
        await transaction.rollback()
    # Then each claimed delivery's new version stayed on its page and no index
    # changed: a heap-only (HOT) update, not ~25 pages of index entries a row
    assert (updated, hot) == (CAP, CAP)


async def test_a_claim_leasing_ahead_writes_no_index_entry_either(conn: asyncpg.Connection) -> None:
    # Given a backlog inserted as the ingest inserts it, of a target whose cap is 32:
    # a drainer alone on it leases 64 at once (its part and as many ahead, 0024),
    # contiguous rows of the same pages
    target = "tgt_claimahead"
    await backlog(conn, target, 0)
    await conn.execute("UPDATE targets SET max_in_flight = 32 WHERE id = $1", target)
    transaction = conn.transaction()
    await transaction.start()
    try:
        # When it claims
        share = await claims.claim_share(
            conn, target, want=64, lease_s=30.0, holder="drn_ahead", ahead=32
        )
        updated, hot = await conn.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
            " WHERE relname = 'deliveries_open'"
        )
    finally:
        await transaction.rollback()
    # Then every new version found room on its page (with 30 % of each page kept
    # free, a page's rows leased at once did not all fit: 55 % of them were HOT)
    assert len(share.rows) == 0  # (the backlog has no events: claimed, not returned)
    assert (updated, hot) == (64, 64)
