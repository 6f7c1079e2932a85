"""The sweeper's vacuum of the rollups' deltas never waits for their writers.

Every ingest and record appends to the deltas' tables (migration 0011's triggers);
the sweeper folds them and vacuums them in its housekeeping. VACUUM gives a table's
empty tail back only under its exclusive lock, and tries for that lock 5 s: with
writers always at the table (any load), each of the four tables cost the sweeper
5 s, and its wake-ups and folds waited meanwhile (seen as `VacuumTruncate` waits
in pg_stat_activity under bench/noisy_neighbour.py).
"""

from __future__ import annotations

import asyncpg

from relay.store import housekeeping
from relay.store.housekeeping import _DELTA_TABLES


async def _emptied(conn: asyncpg.Connection, table: str, rows: int) -> None:
    """``rows`` deltas in ``table``, then deleted (as a fold does): an empty tail."""
    await conn.execute(f"DELETE FROM {table}")
    columns = await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_name = $1 ORDER BY ordinal_position",
        table,
    )
    value = {"bigint": "g", "integer": "1", "smallint": "1", "text": "'t' || g"}
    values = ", ".join(value.get(c["data_type"], "now()") for c in columns)
    await conn.execute(f"INSERT INTO {table} SELECT {values} FROM generate_series(1, {rows}) g")
    await conn.execute(f"DELETE FROM {table}")


async def test_the_vacuum_of_the_deltas_does_not_wait_for_their_writers(
    database_url: str,
) -> None:
    sweeper, writer = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        # Given deltas folded away (an empty tail in each table), and a transaction
        # writing deltas at that moment (an ingest, a record)
        for table in _DELTA_TABLES:
            await _emptied(sweeper, table, 5_000)
        writing = writer.transaction()
        await writing.start()
        for table in _DELTA_TABLES:
            await writer.execute(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE")

        # When the sweeper vacuums them (bounded here well under the 5 s a table that
        # VACUUM spends trying for the lock to truncate)
        await sweeper.execute("SET statement_timeout = '2s'")
        await housekeeping.vacuum_rollup_deltas(sweeper)

        # Then it was done without waiting, and the writer was never held either
        await writing.commit()
    finally:
        await sweeper.close()
        await writer.close()


async def test_a_deltas_table_grown_past_its_bound_gives_its_empty_tail_back(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # Given a deltas' table grown past DELTA_TRUNCATE_BYTES (a burst, a sweeper that
        # was down), then folded
        table = "delivery_count_deltas"
        await _emptied(conn, table, 200_000)
        size = await conn.fetchval("SELECT pg_relation_size($1::regclass)", table)
        assert size > housekeeping.DELTA_TRUNCATE_BYTES

        # When the sweeper vacuums it, no writer at it
        await housekeeping.vacuum_rollup_deltas(conn)

        # Then its empty pages are given back
        assert await conn.fetchval("SELECT pg_relation_size($1::regclass)", table) < size // 10
    finally:
        await conn.close()
