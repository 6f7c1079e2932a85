"""A tenant's lists read that tenant's rows, not past every other tenant's.

The lists' statements said in SQL whether each filter was given
(``$1::text IS NULL OR d.tenant_id = $1``). No index can serve such a condition
under the generic plan that a prepared statement runs from its sixth execution:
a small tenant's deliveries page was read off the newest deliveries of every
tenant, 3,381 pages (10 ms) past 100,000 of another tenant's, and more with every
day of history. Now a filter not given is left out of the statement, and the
tenant (or target) is pinned: a range that leads the ORDER BY, which only an index
leading with it serves (``pinned_order``).

Pages are counted by EXPLAIN (ANALYZE, BUFFERS) of the very statement each list
sends, beside a big tenant's 30,000 newer deliveries (of which 10,000 dead) and
events.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from relay.store.console import EventSearch, figures_by_tenant, held_deliveries, search_events
from relay.store.dead_letters import DeadLetterFilter, list_dead_letters
from relay.store.deliveries import list_deliveries
from relay.store.events import list_events
from relay.store.sql import text_array

BIG, SMALL = "ten_lists_big", "ten_lists_small"
BIG_ROWS = 30_000
BACKLOG = 20_000
UTC_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# ~1,000 pages hold the big tenant's rows; the small one's page is a few per partition
MOST_PAGES = 150
# Postgres plans a prepared statement's first five executions with their values;
# from the sixth, it may run a generic plan instead (if that seems no dearer)
CUSTOM_PLANS = 5


def _literal(value: Any) -> str:
    """``value`` as an SQL literal of this test's own values."""
    if value is None:
        return "NULL"
    if isinstance(value, bool | int):
        return str(value).lower()
    if isinstance(value, list):
        value = text_array(value)
    if isinstance(value, datetime):
        value = value.isoformat()
    return "'" + str(value).replace("'", "''") + "'"


class Explained:
    """A connection whose ``fetch`` first counts the pages its statement reads, then
    answers as the connection does.

    ``generic``: under the generic plan. Else the statement is prepared, run five
    times for the big tenant (its requests came first on this pooled connection:
    Postgres plans those with their values, and keeps a generic plan from the sixth
    if it seems no dearer), then explained for the small one.
    """

    def __init__(self, conn: asyncpg.Connection, *, generic: bool) -> None:
        self.conn = conn
        self.generic = generic
        self.pages: list[int] = []

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        mine = ", ".join(_literal(a) for a in args)
        others = mine.replace(SMALL, BIG)
        async with self.conn.transaction():
            if self.generic:
                await self.conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await self.conn.execute(f"PREPARE listing AS {sql}")
            try:
                for _ in range(0 if self.generic else CUSTOM_PLANS):
                    await self.conn.execute(f"EXECUTE listing({others})")
                [plan] = json.loads(
                    await self.conn.fetchval(
                        f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE listing({mine})"
                    )
                )
            finally:
                await self.conn.execute("DEALLOCATE listing")
        top = plan["Plan"]
        self.pages.append(int(top["Shared Hit Blocks"] + top["Shared Read Blocks"]))
        rows: list[asyncpg.Record] = await self.conn.fetch(sql, *args)
        return rows


@pytest.fixture(params=["after another tenant's", "generic"])
def explained(request: pytest.FixtureRequest, conn: asyncpg.Connection) -> Explained:
    return Explained(conn, generic=request.param == "generic")


@pytest.fixture(scope="module")
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The small tenant's 20 events and deliveries (6 dead), then the big one's, newer;
    the big one's next 20,000 deliveries are due, still to be sent (a backlog, retrying)."""
    connection = await asyncpg.connect(database_url)
    fill = """
        INSERT INTO tenants (id, name) VALUES ($1, 'lists');
        INSERT INTO targets (id, tenant_id, url, secret_enc)
        VALUES ('tgt_' || $1, $1, 'http://127.0.0.1:9/', '\\x00');
        INSERT INTO events (id, tenant_id, payload)
        SELECT 'evt_' || relay_ulid(), $1, convert_to('{"data": {}}', 'UTF8')
        FROM generate_series(1, $2::int);
        INSERT INTO deliveries (id, tenant_id, event_id, target_id, status, last_error)
        SELECT 'dlv_' || relay_ulid(), $1, 'evt_x', 'tgt_' || $1,
               CASE WHEN g % 3 = 0 THEN 'dead' ELSE 'succeeded' END,
               CASE WHEN g % 3 = 0 THEN 'HTTP 500' END
        FROM generate_series(1, $2::int) g;
    """
    for tenant, rows in ((SMALL, 20), (BIG, BIG_ROWS)):
        for statement in fill.split(";")[:-1]:
            args = (tenant, rows) if "$2" in statement else (tenant,)
            await connection.execute(statement, *args)
    await connection.execute(
        """
        INSERT INTO deliveries (id, tenant_id, event_id, target_id, status, next_attempt_at)
        SELECT 'dlv_' || relay_ulid(), $1, 'evt_x', 'tgt_' || $1, 'retrying',
               now() - interval '1 minute'
        FROM generate_series(1, $2::int)
        """,
        BIG,
        BACKLOG,
    )
    await connection.execute("ANALYZE events; ANALYZE deliveries")
    yield connection
    await connection.close()


def read_little(explained: Explained, *, statements: int) -> None:
    """Each of the lists' ``statements`` read a few pages, not the big tenant's rows."""
    assert len(explained.pages) == statements, explained.pages
    assert max(explained.pages) < MOST_PAGES, explained.pages


async def test_a_small_tenants_deliveries_page_reads_its_own_rows(explained: Explained) -> None:
    page, cursor = await list_deliveries(explained, SMALL, limit=50, cursor=None)  # type: ignore[arg-type]
    assert len(page) == 20 and cursor is None
    assert [d.id for d in page] == sorted((d.id for d in page), reverse=True)

    dead, _ = await list_deliveries(explained, SMALL, limit=50, cursor=None, status="dead")  # type: ignore[arg-type]
    assert len(dead) == 6 and {d.status for d in dead} == {"dead"}

    mine, _ = await list_deliveries(  # type: ignore[arg-type]
        explained, SMALL, limit=5, cursor=page[4].id, target_id=f"tgt_{SMALL}"
    )
    assert [d.id for d in mine] == [d.id for d in page[5:10]]
    # (a list reads the last day first, and the days before when that page is not full:
    # two statements each for the first two, one for the third)
    read_little(explained, statements=5)


async def test_a_small_tenants_dead_letters_page_reads_its_own_rows(explained: Explained) -> None:
    page, _ = await list_dead_letters(explained, SMALL, DeadLetterFilter(), limit=50, cursor=None)  # type: ignore[arg-type]
    assert len(page) == 6 and {d.tenant_id for d in page} == {SMALL}

    errors, _ = await list_dead_letters(  # type: ignore[arg-type]
        explained, SMALL, DeadLetterFilter(error="500"), limit=50, cursor=None
    )
    assert [d.id for d in errors] == [d.id for d in page]
    read_little(explained, statements=2)


async def test_a_small_tenants_events_page_reads_its_own_rows(explained: Explained) -> None:
    page, _ = await list_events(  # type: ignore[arg-type]
        explained, SMALL, limit=50, cursor=None, payload_bytes=1 << 20
    )
    assert len(page) == 20 and all(e.payload is not None for e in page)
    read_little(explained, statements=2)  # the last day, then the days before


async def test_a_small_tenants_console_events_read_its_own_rows(explained: Explained) -> None:
    page, _ = await search_events(explained, SMALL, EventSearch(), limit=50, cursor=None)  # type: ignore[arg-type]
    assert len(page) == 20 and {e.tenant_id for e in page} == {SMALL}

    paid, _ = await search_events(  # type: ignore[arg-type]
        explained, SMALL, EventSearch(object_type="bill"), limit=50, cursor=None
    )
    assert paid == []
    read_little(explained, statements=4)  # each: the last day, then the days before


async def test_a_tenants_dead_deliveries_are_not_read_past_its_backlog(
    explained: Explained,
) -> None:
    """The big tenant's dead ones, older than its 20,000 retrying: off the dead letters'
    own index (migration 0025), as ``status=dead`` is written in the statement."""
    dead, _ = await list_deliveries(explained, BIG, limit=50, cursor=None, status="dead")  # type: ignore[arg-type]
    assert len(dead) == 50 and {(d.tenant_id, d.status) for d in dead} == {(BIG, "dead")}
    read_little(explained, statements=1)


async def test_a_small_tenants_overview_counts_its_own_due_deliveries(
    explained: Explained,
) -> None:
    """Due deliveries are counted through the tenant's targets, not past the big
    tenant's 20,000 due ones."""
    since = datetime.now(UTC) - timedelta(hours=1)
    [mine] = await figures_by_tenant(explained, SMALL, since=since)  # type: ignore[arg-type]
    assert (mine.tenant_id, mine.due, mine.oldest_due_at) == (SMALL, 0, None)
    assert await held_deliveries(explained, SMALL) == []  # type: ignore[arg-type]
    read_little(explained, statements=2)


async def test_the_operators_lists_still_hold_every_tenant(conn: asyncpg.Connection) -> None:
    deliveries, _ = await list_deliveries(conn, None, limit=BIG_ROWS + BACKLOG + 50, cursor=None)
    assert {d.tenant_id for d in deliveries} == {BIG, SMALL}
    assert len(deliveries) == BIG_ROWS + BACKLOG + 20
    dead, _ = await list_dead_letters(conn, None, DeadLetterFilter(), limit=BIG_ROWS, cursor=None)
    assert len(dead) == BIG_ROWS // 3 + 6
    assert [d.id for d in dead] == sorted((d.id for d in dead), reverse=True)
    figures = {f.tenant_id: f.due for f in await figures_by_tenant(conn, None, since=UTC_EPOCH)}
    assert figures == {BIG: BACKLOG, SMALL: 0}
    [big] = await figures_by_tenant(conn, BIG, since=UTC_EPOCH)
    assert big.due == BACKLOG
    events, _ = await search_events(conn, None, EventSearch(), limit=BIG_ROWS + 50, cursor=None)
    assert len(events) == BIG_ROWS + 20 and {e.tenant_id for e in events} == {BIG, SMALL}
