"""Retention: the sweeper's housekeeping removes what is past RELAY_RETENTION_DAYS, only that.

The history is partitioned by day (migration 0012): a day past the retention is
dropped whole, and what is still to be sent is kept (moved to the DEFAULT
partitions) until it finishes.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from relay.core.config import Settings
from relay.delivery.wakeups import Enqueuer, make_broker
from relay.store import housekeeping
from tests.conftest import Tenant
from tests.history import backdate, partition_exists
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import eventually
from workers.sweeper import Sweeper


def _sweeper(settings: Settings) -> Sweeper:
    return Sweeper(settings, Enqueuer(make_broker(settings.broker_url, middleware=[])))


async def _old_history(client: Any, tenant: Tenant, conn: asyncpg.Connection) -> dict[str, Any]:
    """Six events: three old and finished (one dead), one old and unfinished, two recent.

    The old ones are 31 days old, in their day's partitions, each delivery with
    an attempt. Returns their ids (after ageing).
    """
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    ids = (await (await post_token(client, source, [{"n": i} for i in range(6)])).json())[
        "event_ids"
    ]
    old, unfinished, recent = ids[:3], ids[3], ids[4:]
    await conn.execute(
        "UPDATE deliveries SET status = CASE WHEN event_id = $2 THEN 'dead' ELSE 'succeeded' "
        "END, next_attempt_at = NULL WHERE event_id = ANY($1)",
        old,
        old[0],
    )
    await conn.execute("UPDATE deliveries SET status = 'retrying' WHERE event_id = $1", unfinished)
    await conn.execute(
        "INSERT INTO attempts (id, tenant_id, delivery_id, started_at, duration_ms) "
        "SELECT 'att_' || substr(id, 5), tenant_id, id, now(), 1 FROM deliveries "
        "WHERE event_id = ANY($1)",
        [*old, unfinished],
    )
    # (the death told the tenant: an operational event, aged with the others and
    # dropped with the same retention)
    told = await conn.fetchval(
        "SELECT id FROM events WHERE tenant_id = $1 AND operational", tenant.id
    )
    assert told is not None
    moved = await backdate(conn, [*old, unfinished, told], days=31)
    return {
        "old": [moved[i] for i in old],
        "told": moved[told],
        "unfinished": moved[unfinished],
        "recent": recent,
        "at": datetime.now(UTC) - timedelta(days=31),
    }


async def _count(conn: asyncpg.Connection, query: str, *args: Any) -> int:
    return int(await conn.fetchval(query, *args))


async def _counted(conn: asyncpg.Connection, tenant_id: str) -> list[tuple[Any, ...]]:
    """The tenant's deliveries by target and status, as the counters have them."""
    rows = await conn.fetch(
        "SELECT target_id, status, n FROM delivery_counts_now"
        " WHERE tenant_id = $1 AND n <> 0 ORDER BY 1, 2",
        tenant_id,
    )
    return [tuple(r) for r in rows]


async def _scanned(conn: asyncpg.Connection, tenant_id: str) -> list[tuple[Any, ...]]:
    """The tenant's deliveries by target and status, counted row by row."""
    rows = await conn.fetch(
        "SELECT target_id, status, count(*) AS n FROM deliveries WHERE tenant_id = $1"
        " GROUP BY 1, 2 ORDER BY 1, 2",
        tenant_id,
    )
    return [tuple(r) for r in rows]


async def test_housekeeping_drops_the_days_past_retention_and_keeps_what_is_unsent(
    client: Any, tenant: Tenant, settings: Settings, database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    sweeper = _sweeper(settings)
    try:
        # Given three old events whose deliveries finished, one old event whose delivery
        # is still to be sent (its target was disabled for longer than the retention),
        # and two recent ones
        h = await _old_history(client, tenant, conn)
        assert await partition_exists(conn, "events", h["at"])

        # When the sweeper's housekeeping runs
        await sweeper.housekeeping(conn)

        # Then the old day's partitions are gone, whole
        for parent in ("events", "deliveries_sent", "attempts"):
            assert not await partition_exists(conn, parent, h["at"]), parent
        # and only the finished old events are gone, with their deliveries and attempts;
        # the unfinished one stays with its delivery and attempt
        left = {
            r["id"]
            for r in await conn.fetch("SELECT id FROM events WHERE tenant_id = $1", tenant.id)
        }
        assert left == {h["unfinished"], *h["recent"]}
        assert (
            await _count(conn, "SELECT count(*) FROM deliveries WHERE event_id = ANY($1)", h["old"])
            == 0
        )
        kept = await conn.fetch(
            "SELECT d.id, d.status, (SELECT count(*) FROM attempts a WHERE a.delivery_id = d.id)"
            " AS attempts FROM deliveries d WHERE d.event_id = $1",
            h["unfinished"],
        )
        assert [(r["status"], r["attempts"]) for r in kept] == [("retrying", 1)]
        # and the counters of deliveries by status (admin stats, the console) count
        # what is left: a dropped day takes its sent deliveries out of them too
        counted = await conn.fetch(
            "SELECT target_id, status, n FROM delivery_counts_now WHERE n <> 0 ORDER BY 1, 2"
        )
        scanned = await conn.fetch(
            "SELECT target_id, status, count(*) AS n FROM deliveries GROUP BY 1, 2 ORDER BY 1, 2"
        )
        assert [tuple(r) for r in counted] == [tuple(r) for r in scanned]
        assert (
            await _count(
                conn,
                "SELECT count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
                "WHERE d.event_id = ANY($1)",
                h["old"],
            )
            == 0
        )
        assert (
            await _count(
                conn,
                "SELECT count(*) FROM deliveries WHERE event_id = ANY($1)",
                [h["unfinished"], *h["recent"]],
            )
            == 3
        )

        # When the kept delivery finishes, the next housekeeping removes it with its event
        await conn.execute(
            "UPDATE deliveries SET status = 'succeeded', next_attempt_at = NULL "
            "WHERE event_id = $1",
            h["unfinished"],
        )
        await sweeper.housekeeping(conn)
        assert await _count(conn, "SELECT count(*) FROM events WHERE id = $1", h["unfinished"]) == 0
        assert (
            await _count(
                conn, "SELECT count(*) FROM deliveries WHERE event_id = $1", h["unfinished"]
            )
            == 0
        )
        assert (
            await _count(
                conn, "SELECT count(*) FROM attempts WHERE delivery_id = $1", kept[0]["id"]
            )
            == 0
        )
        assert (
            await _count(conn, "SELECT count(*) FROM events WHERE id = ANY($1)", h["recent"]) == 2
        )
        # and the counters no longer count it (it went from the DEFAULT partition)
        assert await _counted(conn, tenant.id) == await _scanned(conn, tenant.id)
    finally:
        await sweeper.enqueuer.close()
        await conn.close()


async def test_two_sweepers_at_once_drop_each_day_once_and_keep_the_unsent_once(
    client: Any, tenant: Tenant, settings: Settings, database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    others = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        h = await _old_history(client, tenant, conn)

        # When two processes run the retention at the same instant
        results = await asyncio.gather(
            *(housekeeping.purge_old_events(c, settings.retention_days, grace_s=30) for c in others)
        )

        # Then between them the three old events went, once; the unfinished one is kept once
        assert sum(n for n, _ in results) == 4  # the three old events and the death's
        assert not await partition_exists(conn, "events", h["at"])
        assert await _count(conn, "SELECT count(*) FROM events WHERE id = $1", h["unfinished"]) == 1
        assert (
            await _count(
                conn, "SELECT count(*) FROM deliveries WHERE event_id = $1", h["unfinished"]
            )
            == 1
        )
        assert (
            await _count(
                conn,
                "SELECT count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
                "WHERE d.event_id = $1",
                h["unfinished"],
            )
            == 1
        )
    finally:
        for c in (conn, *others):
            await c.close()


async def test_a_row_of_a_day_without_partition_is_kept_and_moved_when_the_day_is_made(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    [event_id] = (await (await post_token(client, source, {"n": 1})).json())["event_ids"]
    conn = await asyncpg.connect(database_url)
    try:
        # Given an event whose id falls on a day ten days ahead, which has no partition
        moved = await backdate(conn, [event_id], days=-10, partitions=False)
        ahead = datetime.now(UTC) + timedelta(days=10)
        assert not await partition_exists(conn, "events", ahead)
        # Then it was stored all the same (the DEFAULT partition caught it)
        where = "SELECT tableoid::regclass::text FROM events WHERE id = $1"
        assert await conn.fetchval(where, moved[event_id]) == "events_default"

        # When the partition manager makes the days ahead (here: eleven days)
        made = await housekeeping.ensure_partitions(conn, days_ahead=11)

        # Then that day's partition holds it, and making them again makes nothing
        assert f"events_p{ahead:%Y%m%d}" in made
        assert await conn.fetchval(where, moved[event_id]) == f"events_p{ahead:%Y%m%d}"
        assert await housekeeping.ensure_partitions(conn, days_ahead=11) == []
    finally:
        await conn.close()


async def test_a_day_of_sent_deliveries_is_counted_out_before_the_deliveries_are_held(
    client: Any,
    tenant: Tenant,
    settings: Settings,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn, blocker, writer = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        # Given an old day of sent deliveries, and a writer holding that day's partition
        # (as a late success moving into it would), the drop's lock waiting long
        h = await _old_history(client, tenant, conn)
        part = f"deliveries_sent_p{h['at']:%Y%m%d}"
        monkeypatch.setattr(housekeeping, "LOCK_TIMEOUT", "20s")
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute(f"LOCK TABLE {part} IN ROW EXCLUSIVE MODE")

        # When retention comes to that day: it waits for the writer
        purging = asyncio.create_task(housekeeping.drop_expired_partitions(conn, 30))
        pid = conn.get_server_pid()

        async def waits() -> bool:
            return bool(
                await writer.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
                )
            )

        await eventually(waits, timeout=10, every=0.02)

        # Then meanwhile it holds no lock of the deliveries' tables: a claim or a record
        # of any other delivery goes through (before: the drop held all of them while
        # it waited, and while it read the day's rows to take them out of the counters)
        held = await writer.fetch(
            "SELECT c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " WHERE l.pid = $1 AND l.granted AND c.relname LIKE 'deliveries%'",
            pid,
        )
        assert held == []
        await writer.execute("SET lock_timeout = '2s'")
        updated = await writer.execute(  # two recent deliveries recorded sent, as relay_record
            "UPDATE deliveries SET status = 'succeeded', next_attempt_at = NULL"
            " WHERE status IN ('pending', 'retrying') AND event_id = ANY($1)",
            h["recent"],
        )
        assert updated == "UPDATE 2"
        assert not purging.done()

        # and once the writer is done, the day goes, counted out of the figures exactly
        await holding.rollback()
        dropped = await asyncio.wait_for(purging, timeout=30)
        assert dropped["deliveries_sent"] == 2
        assert not await partition_exists(conn, "deliveries_sent", h["at"])
        assert await _counted(conn, tenant.id) == await _scanned(conn, tenant.id)
    finally:
        for c in (conn, blocker, writer):
            await c.close()


async def _set_aside(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT relname FROM pg_class WHERE relname LIKE 'relay\\_detached\\_%' ORDER BY 1"
    )
    return [r["relname"] for r in rows]


async def test_days_detached_by_a_pass_that_stopped_before_their_drop_are_dropped_by_the_next(
    client: Any, tenant: Tenant, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # Given an old day, and a retention pass that stops once it has detached the
        # day's sent deliveries from their table (counted out of the counters), before
        # it drops them (its worker killed)
        h = await _old_history(client, tenant, conn)
        day = f"{h['at']:%Y%m%d}"
        drop = housekeeping._drop_detached

        async def killed_once_sent_is_set_aside(c: Any) -> None:
            if f"relay_detached_deliveries_sent_p{day}" in await _set_aside(c):
                raise ConnectionError("killed")
            await drop(c)

        monkeypatch.setattr(housekeeping, "_drop_detached", killed_once_sent_is_set_aside)
        with pytest.raises(ConnectionError):
            await housekeeping.purge_old_events(conn, 30)
        # Then the day's sent deliveries are out of their table already, and set aside;
        # the counters count what the table holds
        assert await _set_aside(conn) == [f"relay_detached_deliveries_sent_p{day}"]
        assert (
            await _count(
                conn,
                "SELECT count(*) FROM deliveries WHERE event_id = ANY($1) AND status = 'succeeded'",
                h["old"],
            )
            == 0
        )
        assert await _counted(conn, tenant.id) == await _scanned(conn, tenant.id)

        # When the next pass runs (no day of sent deliveries left to drop: only what was
        # set aside)
        monkeypatch.setattr(housekeeping, "_drop_detached", drop)
        await housekeeping.purge_old_events(conn, 30)

        # Then it drops what was set aside, and the rest of the day; nothing is left
        assert await _set_aside(conn) == []
        for parent in ("events", "deliveries_sent", "attempts"):
            assert not await partition_exists(conn, parent, h["at"]), parent
        assert await _count(conn, "SELECT count(*) FROM events WHERE id = ANY($1)", h["old"]) == 0
        assert await _count(conn, "SELECT count(*) FROM events WHERE id = $1", h["unfinished"]) == 1
        assert (
            await _count(
                conn,
                "SELECT count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id"
                " WHERE d.event_id = $1",
                h["unfinished"],
            )
            == 1
        )
        assert await _counted(conn, tenant.id) == await _scanned(conn, tenant.id)
    finally:
        await conn.close()


async def _events_set_aside(
    client: Any, tenant: Tenant, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], str]:
    """An old day whose events a pass detached from their table and stopped before their
    drop (its worker killed); the history and the detached table's name."""
    h = await _old_history(client, tenant, conn)
    detached = f"relay_detached_events_p{h['at']:%Y%m%d}"
    drop = housekeeping._drop_detached

    async def killed_once_events_are_set_aside(c: Any) -> None:
        if detached in await _set_aside(c):
            raise ConnectionError("killed")
        await drop(c)

    with monkeypatch.context() as patch:
        patch.setattr(housekeeping, "_drop_detached", killed_once_events_are_set_aside)
        with pytest.raises(ConnectionError):
            await housekeeping.purge_old_events(conn, 30)
    return h, detached


async def test_the_drop_of_a_detached_day_of_events_locks_no_table_its_keys_reference(
    client: Any, tenant: Tenant, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # Given an old day whose events were detached from their table by a pass that
        # stopped before their drop: a detached partition keeps its table's foreign
        # keys (to tenants and sources) as its own
        _, detached = await _events_set_aside(client, tenant, conn, monkeypatch)
        keys = "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conrelid = $1::regclass"
        assert await conn.fetchval(keys, detached) == 2

        # When the next pass drops what was set aside, the locks its DROP holds are
        # looked at just before it commits (when the files are removed)
        held: list[str] = []

        class Watched:
            def __getattr__(self, name: str) -> Any:
                return getattr(conn, name)

            async def execute(self, query: str, *args: Any) -> str:
                done: str = await conn.execute(query, *args)
                if query.startswith("DROP TABLE"):
                    held.extend(
                        r["relname"]
                        for r in await conn.fetch(
                            "SELECT c.relname FROM pg_locks l JOIN pg_class c"
                            " ON c.oid = l.relation WHERE l.pid = pg_backend_pid()"
                            " AND c.relname IN ('tenants', 'sources')"
                        )
                    )
                return done

        await housekeeping._drop_detached(Watched())  # type: ignore[arg-type]

        # Then the day is gone, and its drop held neither tenants nor sources, which
        # every ingest reads (before: both, for as long as the files' removal took)
        assert await _set_aside(conn) == []
        assert held == []
        assert await conn.fetchval("SELECT to_regclass($1)", detached) is None
    finally:
        await conn.close()


#: An event stored as relay_ingest() stores one, for the order of its locks: it reads the
#: tenant, then its insert checks the event's keys (tenants', then sources').
_STORE = """
WITH t AS MATERIALIZED (SELECT id FROM tenants WHERE id = $1)
INSERT INTO events (id, tenant_id, source_id, payload)
SELECT 'evt_' || relay_ulid(), t.id, $2, '\\x00' FROM t
"""


async def test_a_detached_day_of_events_is_dropped_while_events_are_stored(
    client: Any, tenant: Tenant, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await asyncpg.connect(database_url)
    writers = [await asyncpg.connect(database_url) for _ in range(4)]
    stop = asyncio.Event()
    stored = 0

    async def store(writer: asyncpg.Connection, source_id: str) -> None:
        nonlocal stored
        while not stop.is_set():
            await writer.execute(_STORE, tenant.id, source_id)
            stored += 1

    try:
        # Given an old day of events set aside, keys and all, and four writers storing
        # events all along
        h, detached = await _events_set_aside(client, tenant, conn, monkeypatch)
        source_id = await conn.fetchval(
            "SELECT source_id FROM events WHERE id = ANY($1) LIMIT 1", h["recent"]
        )
        storing = [asyncio.create_task(store(w, source_id)) for w in writers]

        async def storing_well() -> bool:
            return stored > 100

        await eventually(storing_well, timeout=10, every=0.01)

        # When retention passes come to it (at most five, a tenth of a second apart)
        for _ in range(5):
            await housekeeping._drop_detached(conn)
            if await conn.fetchval("SELECT to_regclass($1)", detached) is None:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*storing)

        # Then it is dropped (before: the drop of each key deadlocked with the writers,
        # which hold the tenant when their insert checks the source, and timed out at
        # every pass: a day of events set aside for ever)
        assert await conn.fetchval("SELECT to_regclass($1)", detached) is None
    finally:
        stop.set()
        for c in (conn, *writers):
            await c.close()


async def test_the_keys_of_the_tables_detached_first_reference_the_tables_locked_for_their_drop(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        referenced = await conn.fetch(
            "SELECT DISTINCT confrelid::regclass::text AS t FROM pg_constraint"
            " WHERE contype = 'f' AND conrelid::regclass::text = ANY($1::text[])",
            sorted(housekeeping._DETACHED_FIRST),
        )
        assert {r["t"] for r in referenced} <= set(housekeeping._KEYS_REFERENCE)
    finally:
        await conn.close()


async def test_one_pass_removes_every_record_of_a_death_past_the_retention(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # Given 25 deaths recorded 40 days ago and one today (the console's chart of
        # deaths), and a pass that deletes 10 rows a statement
        await conn.execute(
            "INSERT INTO delivery_deaths (delivery_id, tenant_id, target_id, died_at)"
            " SELECT 'dlv_old_' || g, 'ten_deaths', 'tgt_deaths', now() - interval '40 days'"
            " FROM generate_series(1, 25) g"
        )
        await conn.execute(
            "INSERT INTO delivery_deaths (delivery_id, tenant_id, target_id)"
            " VALUES ('dlv_new', 'ten_deaths', 'tgt_deaths')"
        )

        # When one retention pass runs
        await housekeeping.purge_old_events(conn, 30, batch=10)

        # Then every old one is gone (before: 10 a pass), today's is there
        left = await conn.fetch(
            "SELECT delivery_id FROM delivery_deaths WHERE tenant_id = 'ten_deaths'"
        )
        assert [r["delivery_id"] for r in left] == ["dlv_new"]
    finally:
        await conn.close()
