"""The per-minute and per-hour figures are partitioned by UTC day (migration 0028).

Retention deleted the figures past it 10,000 rows at a time: with 2 M events of
history to two targets, ~1.4 M rows of latency histograms for ten days, 4 s of
DELETEs, and more with every target a relay serves. A day of figures is now a
partition of each table, dropped whole once all of it is past the retention.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from relay.store import console, housekeeping
from relay.store.migrations import migrate
from tests.history import Planned, migrated_before

FIGURES = [table for table, _ in housekeeping.FIGURES]
PARTITIONED = 28
#: minutes of figures on each old day (a busy target's histogram rows, in small)
MINUTES = 300


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


async def _figures(conn: asyncpg.Connection, tenant: str, target: str, days_ago: int) -> None:
    """``MINUTES`` minutes of figures of each kind ``days_ago`` days ago, as the triggers
    append them (deltas), not folded."""
    await conn.execute(
        """
        WITH m AS (
            SELECT date_trunc('day', now(), 'UTC') - $3::int * interval '1 day'
                   + g * interval '1 minute' AS minute, g
            FROM generate_series(0, $4::int - 1) g
        ), tenants AS (
            INSERT INTO tenant_minute_deltas (tenant_id, minute, events, ok, failed, died)
            SELECT $1, minute, 1, 1, 0, 0 FROM m
        ), targets AS (
            INSERT INTO target_minute_deltas (target_id, minute, tenant_id, ok, failed,
                                              last_attempt_at)
            SELECT $2, minute, $1, 1, 0, minute FROM m
        )
        INSERT INTO target_latency_minute_deltas (target_id, minute, bucket, n)
        SELECT $2, minute, b, 1 FROM m CROSS JOIN generate_series(1, 3) b
        """,
        tenant,
        target,
        days_ago,
        MINUTES,
    )


async def _rows(conn: asyncpg.Connection, tenant: str, target: str) -> dict[str, list[tuple]]:
    """Every figure row of the tenant and its target, by table, as (time, values...)."""
    return {
        table: [
            tuple(r)
            for r in await conn.fetch(
                f"SELECT * FROM {table} WHERE {'tenant_id' if 'tenant' in table else 'target_id'}"
                " = $1 ORDER BY 1, 2, 3",
                tenant if "tenant" in table else target,
            )
        ]
        for table in FIGURES
    }


async def test_a_day_of_figures_past_the_retention_is_dropped_whole(
    conn: asyncpg.Connection,
) -> None:
    tenant, target = f"ten_{uuid.uuid4().hex[:12]}", f"tgt_{uuid.uuid4().hex[:12]}"
    await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, 'figures')", tenant)
    # Given a day of figures 40 days ago in its partitions (the sweeper made them ahead
    # of that day), a minute 35 days ago that fell in no partition, and today's, folded
    old_day = (datetime.now(UTC) - timedelta(days=40)).date()
    for table in FIGURES:
        await conn.execute("SELECT relay_ensure_figures_partition($1, $2)", table, old_day)
    await _figures(conn, tenant, target, 40)
    await conn.execute(
        "INSERT INTO tenant_minute_deltas (tenant_id, minute, events, ok, failed, died)"
        " VALUES ($1, date_trunc('minute', now()) - interval '35 days', 1, 0, 0, 0)",
        tenant,
    )
    await _figures(conn, tenant, target, 0)
    await housekeeping.fold_rollups(conn)
    where = "SELECT tableoid::regclass::text FROM tenant_minutes WHERE tenant_id = $1 AND minute"
    assert await conn.fetchval(f"{where} < now() - interval '38 days' LIMIT 1", tenant) == (
        f"tenant_minutes_p{old_day:%Y%m%d}"
    )
    assert (
        await conn.fetchval(
            f"{where} < now() - interval '30 days' ORDER BY minute DESC LIMIT 1", tenant
        )
        == "tenant_minutes_default"
    )
    today = await _rows(conn, tenant, target)

    # When the sweeper trims what is past a retention of 30 days
    async with conn.transaction():
        await housekeeping.purge_old_rollups(conn, 30)
        deleted = await conn.fetchval(
            "SELECT coalesce(sum(n_tup_del), 0) FROM pg_stat_xact_user_tables"
            " WHERE relname ~ ('^(' || array_to_string($1::text[], '|') || ')_')",
            FIGURES,
        )

    # Then the old day's partitions are gone, the day dropped whole: the only rows
    # deleted are the minute in no partition and its hour (before: also the day's
    # 2,101 rows of figures, 10,000 a statement), and today's figures are all there
    for table in FIGURES:
        assert await conn.fetchval("SELECT to_regclass($1)", f"{table}_p{old_day:%Y%m%d}") is None
    assert deleted == 2
    recent = datetime.now(UTC) - timedelta(days=2)
    assert await _rows(conn, tenant, target) == {
        t: [r for r in rows if r[1] > recent] for t, rows in today.items()
    }
    assert len(today["target_latency_minutes"]) == 2 * 3 * MINUTES


async def test_two_sweepers_at_once_drop_the_same_old_days_once_without_error(
    database_url: str,
) -> None:
    conn, holder, *sweepers = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        tenant, target = f"ten_{uuid.uuid4().hex[:12]}", f"tgt_{uuid.uuid4().hex[:12]}"
        await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, 'figures')", tenant)
        # Given two old days of figures in their partitions, and today's, folded
        old_days = [(datetime.now(UTC) - timedelta(days=n)).date() for n in (40, 45)]
        for day in old_days:
            for table in FIGURES:
                await conn.execute("SELECT relay_ensure_figures_partition($1, $2)", table, day)
        for back in (40, 45, 0):
            await _figures(conn, tenant, target, back)
        await housekeeping.fold_rollups(conn)
        today = await _rows(conn, tenant, target)

        # When two sweepers trim at once, both having listed the same old days (the
        # partition manager's lock held meanwhile, then let go)
        await holder.execute("SELECT pg_advisory_lock($1)", housekeeping.PARTITION_LOCK)
        trims = [asyncio.ensure_future(housekeeping.purge_old_rollups(c, 30)) for c in sweepers]
        waiting = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND objid = $1"
        )
        deadline = asyncio.get_running_loop().time() + 10
        while await conn.fetchval(waiting, housekeeping.PARTITION_LOCK) < 2:
            assert asyncio.get_running_loop().time() < deadline, "the sweepers never met"
            await asyncio.sleep(0.01)
        await holder.execute("SELECT pg_advisory_unlock($1)", housekeeping.PARTITION_LOCK)
        await asyncio.gather(*trims)

        # Then neither failed, each old day's partitions are gone and today's figures stay
        for day in old_days:
            for table in FIGURES:
                name = f"{table}_p{day:%Y%m%d}"
                assert await conn.fetchval("SELECT to_regclass($1)", name) is None
        recent = datetime.now(UTC) - timedelta(days=2)
        assert await _rows(conn, tenant, target) == {
            t: [r for r in rows if r[1] > recent] for t, rows in today.items()
        }
        assert len(today["tenant_minutes"]) == 3 * MINUTES
    finally:
        for c in (conn, holder, *sweepers):
            await c.close()


async def test_the_consoles_figures_plan_only_the_days_they_show(
    conn: asyncpg.Connection,
) -> None:
    tenant, target = f"ten_{uuid.uuid4().hex[:12]}", f"tgt_{uuid.uuid4().hex[:12]}"
    await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, 'figures')", tenant)
    await conn.execute(
        "INSERT INTO targets (id, tenant_id, url, secret_enc) VALUES ($1, $2, 'http://x/', '')",
        target,
        tenant,
    )
    # Given 20 days of figures' partitions before yesterday (as a relay keeps for its
    # retention), and figures of today
    old_days = [(datetime.now(UTC) - timedelta(days=n)).date() for n in range(2, 22)]
    for day in old_days:
        for table in FIGURES:
            await conn.execute("SELECT relay_ensure_figures_partition($1, $2)", table, day)
    await _figures(conn, tenant, target, 0)
    await housekeeping.fold_rollups(conn)

    # When the console's pages read their figures of the last day (as the operator
    # and as the tenant)
    planned = Planned(conn)
    since = datetime.now(UTC) - timedelta(days=1)
    for viewer in (None, tenant):
        await console.figures_by_tenant(planned, viewer, since=since)
        await console.outcomes_by_minute(planned, viewer, since=since)
        await console.target_health(planned, viewer, [target], since=since)
    await console.targets_across_tenants(planned, sort="failing", since=since, limit=10)

    # Then no plan holds a partition of an older day: what they cost does not grow with
    # the days kept (before: the overview's figures planned every day's partition)
    assert len(planned.plans) == 11  # target_health: its targets, then two reads
    assert planned.partitions_of(old_days) == []
    assert any(f"_p{datetime.now(UTC):%Y%m%d}" in plan for plan in planned.plans)


@pytest.fixture
async def old_db(services: dict[str, str], tmp_path: Path) -> AsyncIterator[str]:
    """A database migrated up to the migration before 0028."""
    async with migrated_before(services["postgres"], tmp_path, PARTITIONED) as (_, url):
        yield url


async def test_the_migration_puts_each_figure_in_its_day_and_loses_none(old_db: str) -> None:
    conn = await asyncpg.connect(old_db)
    try:
        # Given a database before 0028 with figures of 60, 3 and 0 days ago (each day's
        # first at midnight UTC), folded, and today's appended again (not folded yet),
        # migrated from a session whose DateStyle and TimeZone are not ISO and UTC
        # ("IST" written by that style would be read back as Israel's, not India's)
        tenant, target = "ten_f", "tgt_f"
        await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, 'figures')", tenant)
        for days_ago in (60, 3, 0):
            await _figures(conn, tenant, target, days_ago)
        await housekeeping.fold_rollups(conn)
        await _figures(conn, tenant, target, 0)
        before = await _rows(conn, tenant, target)
        await conn.execute("SET DateStyle = 'SQL, DMY'")
        await conn.execute("SET TimeZone = 'Asia/Kolkata'")

        # When it is migrated
        applied = await migrate(conn)
        assert applied[0] == "0028_partitioned_figures.sql", applied
        await conn.execute("RESET DateStyle")
        await conn.execute("RESET TimeZone")

        # Then every folded figure is there; those of the last 40 days each in its UTC
        # day's partition, midnight's included, older ones in the DEFAULT partition (one
        # transaction cannot make a partition for each day of a long history); the
        # days ahead are made, and the deltas fold into them as before
        assert await _rows(conn, tenant, target) == before
        for table, column in housekeeping.FIGURES:
            placed = await conn.fetch(
                f"SELECT DISTINCT tableoid::regclass::text AS part,"
                f" to_char({column} AT TIME ZONE 'UTC', 'YYYYMMDD') AS day FROM {table}"
            )
            assert placed and all(
                r["part"] == (f"{table}_default" if r["day"] < old else f"{table}_p{r['day']}")
                for r in placed
                for old in [f"{datetime.now(UTC) - timedelta(days=40):%Y%m%d}"]
            ), (table, placed)
            ahead = datetime.now(UTC).date() + timedelta(days=housekeeping.DAYS_AHEAD)
            assert await conn.fetchval("SELECT to_regclass($1)", f"{table}_p{ahead:%Y%m%d}")
        await housekeeping.fold_rollups(conn)
        after = await _rows(conn, tenant, target)
        latency = "target_latency_minutes"
        assert sum(r[-1] for r in after[latency]) == sum(r[-1] for r in before[latency]) + (
            3 * MINUTES  # today's second round of deltas
        )

        # And the trim of the release before (a DELETE of the parent by ctid, which on
        # partitioned tables matches rows of every day) is refused, today's kept
        for table, column in housekeeping.FIGURES:
            with pytest.raises(asyncpg.RaiseError, match="partitioned by day"):
                await conn.execute(
                    f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table}"
                    f" WHERE {column} < now() - make_interval(days => 30) LIMIT 10000)"
                )
        assert await _rows(conn, tenant, target) == after
    finally:
        await conn.close()
