"""A day of a tenant's figures reads hours, not 1,440 minutes (migration 0021).

The console's overview shows each tenant's events and attempts of the last 24
hours. Summed from per-minute rows, a busy day cost 1,440 rows a tenant, and the
page took 1.6 to 1.9 times its empty-database time with history (issue 24). The
fold now keeps per-hour figures beside the minutes; a day reads the minutes of its
first hour, whole hours after it, and the deltas not folded yet. The rows a read
fetches are counted by Postgres (pg_stat_xact_user_tables, this transaction's).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from relay.store import console, housekeeping

#: 30 hours of minutes, every minute busy
MINUTES = 30 * 60


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


async def _tenant(conn: asyncpg.Connection) -> str:
    tenant = f"ten_hourly_{uuid.uuid4().hex[:12]}"
    await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, 'hourly')", tenant)
    return tenant


async def _busy_day(conn: asyncpg.Connection, tenant: str, *, fold: bool) -> None:
    """A delta for each of the last ``MINUTES`` minutes, as the triggers append them;
    folded by the sweeper's fold when ``fold``."""
    await conn.execute(
        """
        INSERT INTO tenant_minute_deltas (tenant_id, minute, events, ok, failed, died)
        SELECT $1, date_trunc('minute', now()) - g * interval '1 minute', g % 7 + 1, g % 5,
               g % 3, g % 2
        FROM generate_series(0, $2::int - 1) g
        """,
        tenant,
        MINUTES,
    )
    if fold:
        await housekeeping.fold_rollups(conn)


async def _rows_fetched(conn: asyncpg.Connection, tables: list[str]) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT relname, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS n "
        "FROM pg_stat_xact_user_tables WHERE relname = ANY($1::text[])",
        tables,
    )
    return {r["relname"]: r["n"] for r in rows}


async def test_a_days_figures_read_hours_not_every_minute(conn: asyncpg.Connection) -> None:
    # Given a tenant busy every minute of the last 30 hours, its figures folded
    tenant = await _tenant(conn)
    await _busy_day(conn, tenant, fold=True)
    await conn.execute("ANALYZE tenant_minutes")

    # When the overview reads its last 24 hours
    async with conn.transaction():
        [fig] = await console.figures_by_tenant(
            conn, tenant, since=datetime.now(UTC) - timedelta(hours=24)
        )
        fetched = await _rows_fetched(conn, ["tenant_minutes"])

    # Then it reads at most the minutes of the first hour, not 1,440 (nor a scan of 1,800)
    assert fig.events > 1_440
    assert fetched.get("tenant_minutes", 0) <= 60, fetched


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "America/St_Johns", "Asia/Kathmandu"])
async def test_a_windows_figures_are_the_sum_of_its_minutes(
    conn: asyncpg.Connection, zone: str
) -> None:
    # Given two tenants busy every minute of the last 30 hours, one folded, one still in
    # deltas, and a session whose time zone is not a whole number of hours from UTC
    folded, unfolded = await _tenant(conn), await _tenant(conn)
    await _busy_day(conn, folded, fold=True)
    await _busy_day(conn, unfolded, fold=False)
    await conn.execute(f"SET TimeZone = '{zone}'")  # a test's own constant
    try:
        now = datetime.now(UTC)
        # When windows start on an hour, a half hour, a minute before an hour, mid-minute
        for since in (
            now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=20),
            now.replace(minute=30, second=0, microsecond=0) - timedelta(hours=24),
            now.replace(minute=59, second=0, microsecond=0) - timedelta(hours=5),
            now - timedelta(hours=23, seconds=17),
            now - timedelta(minutes=3),
        ):
            figures = {
                f.tenant_id: (f.events, f.succeeded, f.failed_attempts)
                for f in await console.figures_by_tenant(conn, None, since=since)
            }
            sums = await conn.fetch(
                "SELECT tenant_id, sum(events)::bigint AS e, sum(ok)::bigint AS ok, "
                "sum(failed)::bigint AS failed FROM tenant_minutes_now "
                "WHERE tenant_id = ANY($1::text[]) "
                "AND minute >= date_trunc('minute', $2::timestamptz) GROUP BY 1",
                [folded, unfolded],
                since,
            )
            # Then each tenant's figures are the sum of the minutes in the window
            for r in sums:
                assert figures[r["tenant_id"]] == (r["e"], r["ok"], r["failed"]), (zone, since)
            assert {r["tenant_id"] for r in sums} == {folded, unfolded}
        # And once the deltas are folded, the figures are unchanged
        since = now - timedelta(hours=24)
        before = await console.figures_by_tenant(conn, unfolded, since=since)
        await housekeeping.fold_rollups(conn)
        assert await console.figures_by_tenant(conn, unfolded, since=since) == before
    finally:
        await conn.execute("RESET TimeZone")


async def test_hours_past_the_retention_are_trimmed_with_their_minutes(
    conn: asyncpg.Connection,
) -> None:
    # Given a tenant's figures of 40 days ago and of today, folded
    tenant = await _tenant(conn)
    await conn.execute(
        """
        INSERT INTO tenant_minute_deltas (tenant_id, minute, events, ok, failed, died)
        SELECT $1, date_trunc('minute', now()) - d * interval '1 day', 1, 1, 0, 0
        FROM unnest(ARRAY[40, 0]) d
        """,
        tenant,
    )
    await housekeeping.fold_rollups(conn)

    # When the sweeper trims what is past a retention of 30 days
    await housekeeping.purge_old_rollups(conn, 30)

    # Then today's minute and hour are kept, the old ones are gone
    for table, column in (("tenant_minutes", "minute"), ("tenant_hours", "hour")):
        ages = await conn.fetch(
            f"SELECT now() - {column} > interval '30 days' AS old FROM {table} "
            "WHERE tenant_id = $1",
            tenant,
        )
        assert [r["old"] for r in ages] == [False], table
