"""The operational events' lists read what they show, not every event (migration 0013).

Migration 0012 partitioned events and did not recreate 0010's index of operational
events: the console's overview read every event to find the ten latest operational
ones (2,000,000 events of history: 150 ms a page, 11 ms empty). Pages read are
counted by EXPLAIN (ANALYZE, BUFFERS) under a generic plan (what a prepared
statement runs after its fifth execution), over 30,000 upstream events and a few
operational ones.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from relay.store import console
from relay.store.console import operational_events

EVENTS = 30_000


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    for tenant in ("ten_opreads_a", "ten_opreads_b"):
        await connection.execute(
            "INSERT INTO tenants (id, name) VALUES ($1, 'opreads') ON CONFLICT DO NOTHING", tenant
        )
    await connection.execute(
        """
        INSERT INTO events (id, tenant_id, payload, operational)
        SELECT 'evt_' || relay_ulid(),
               CASE WHEN g % 2 = 0 THEN 'ten_opreads_a' ELSE 'ten_opreads_b' END,
               convert_to('{"data": {}}', 'UTF8'), g % 5000 < 2
        FROM generate_series(1, $1::int) g
        """,
        EVENTS,
    )
    await connection.execute("ANALYZE events")
    yield connection
    await connection.close()


async def pages(conn: asyncpg.Connection, sql: str, tenant: str | None) -> int:
    async with conn.transaction():
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE latest(text, text, int) AS {sql}")
        try:
            literal = "NULL" if tenant is None else f"'{tenant}'"  # a test's own names
            [plan] = json.loads(
                await conn.fetchval(
                    f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE latest({literal}, NULL, 10)"
                )
            )
        finally:
            await conn.execute("DEALLOCATE latest")
    top = plan["Plan"]
    return int(top["Shared Hit Blocks"] + top["Shared Read Blocks"])


async def test_the_latest_operational_events_read_a_few_pages(conn: asyncpg.Connection) -> None:
    every = await pages(conn, console._OPERATIONAL_OF_ALL, None)
    mine = await pages(conn, console._OPERATIONAL_OF_TENANT, "ten_opreads_a")
    # ~600 pages hold the 30,000 events: an index of the operational ones reads a few
    assert every < 60, every
    assert mine < 60, mine


async def test_the_lists_show_the_operational_events_newest_first(
    conn: asyncpg.Connection,
) -> None:
    every = await operational_events(conn, None, limit=10)
    mine = await operational_events(conn, "ten_opreads_a", limit=10)
    assert [e.id for e in every] == sorted((e.id for e in every), reverse=True)
    assert {e.tenant_id for e in every} >= {"ten_opreads_a", "ten_opreads_b"}
    assert mine and {e.tenant_id for e in mine} == {"ten_opreads_a"}
