"""The partitioned history (migration 0012) keeps every guarantee of the tables it replaced.

A database of the previous schema, filled with rows, is migrated and checked
row for row; uuid de-duplication holds across days (partitions) and after the
migration; ordering positions go on from where they were.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relay.core.crypto import new_id
from relay.ingest.parse import ParsedEvent
from relay.store import claims, console, deliveries
from relay.store import events as events_store
from relay.store.events import add_deliveries, record_events
from relay.store.migrations import migrate
from tests.conftest import Tenant
from tests.history import (
    Planned,
    aged_id,
    backdate,
    make_old_days,
    migrated_before,
)
from tests.integration.test_ingest import make_source, make_target, post_token

PARTITIONED = 12


@pytest.fixture
async def old_db(services: dict[str, str], tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A database migrated up to the migration before 0012, and that migration's directory."""
    async with migrated_before(services["postgres"], tmp_path, PARTITIONED) as (old, url):
        yield url, old


def _ids(prefix: str, n: int, days: int) -> list[str]:
    """``n`` ids of type ``prefix`` spread over the last ``days`` days, oldest first."""
    now = datetime.now(UTC)
    return [
        aged_id(f"{prefix}_{'0' * 10}{uuid.uuid4().hex[:16].upper()}", now - timedelta(days=d))
        for d in [days * (n - 1 - i) / max(n - 1, 1) for i in range(n)]
    ]


async def _fill(conn: asyncpg.Connection) -> None:
    """Rows of the previous schema over 5 days, with what other migrations may have added:
    a column with a default on events, and a trigger of their own on attempts."""
    await conn.execute(
        """
        INSERT INTO tenants (id, name) VALUES ('ten_1', 'Old');
        INSERT INTO sources (id, tenant_id, name, auth_type, secret_enc)
            VALUES ('src_1', 'ten_1', 's', 'token', '\\x00');
        INSERT INTO targets (id, tenant_id, url, secret_enc, ordering)
            VALUES ('tgt_1', 'ten_1', 'https://a.example/', '\\x00', 'object');
        ALTER TABLE events ADD COLUMN extra text NOT NULL DEFAULT 'kept';
        CREATE TABLE attempt_log (attempt_id text);
        CREATE FUNCTION log_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO attempt_log VALUES (NEW.id); RETURN NULL; END $$;
        CREATE TRIGGER attempts_logged AFTER INSERT ON attempts
            FOR EACH ROW EXECUTE FUNCTION log_attempt();
        """
    )
    events = _ids("evt", 40, days=5)
    deliveries = [f"dlv_{e[4:]}" for e in events]  # made with their events
    await conn.execute(
        """
        INSERT INTO events (id, tenant_id, source_id, upstream_uuid, payload, received_at)
        SELECT e.id, 'ten_1', 'src_1', 'u-' || e.n, convert_to('{"n":' || e.n || '}', 'UTF8'),
               now()
        FROM unnest($1::text[]) WITH ORDINALITY AS e(id, n)
        """,
        events,
    )
    # statuses: most succeeded, some dead, the newest pending (parked behind the one before)
    await conn.execute(
        """
        INSERT INTO deliveries (id, tenant_id, event_id, target_id, status, next_attempt_at,
                                enqueued_until, order_key, order_pos, attempt_count)
        SELECT d.id, 'ten_1', e.id, 'tgt_1',
               CASE WHEN d.n > 38 THEN 'pending' WHEN d.n % 10 = 0 THEN 'dead'
                    ELSE 'succeeded' END,
               CASE WHEN d.n = 39 THEN now() END, CASE WHEN d.n = 39 THEN now() END,
               'Bill/' || (d.n % 3), nextval('deliveries_order_pos_seq'), 1
        FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS d(id, event_id, n)
        JOIN events e ON e.id = d.event_id
        ORDER BY d.n
        """,
        deliveries,
        events,
    )
    await conn.execute(
        """
        INSERT INTO attempts (id, tenant_id, delivery_id, started_at, duration_ms, status_code)
        SELECT 'att_' || substr(id, 5), tenant_id, id, now(), 5, 200 FROM deliveries
        """
    )


_ROWS = {
    "events": "SELECT row_to_json(x)::text FROM events x ORDER BY id",
    "deliveries": "SELECT row_to_json(x)::text FROM deliveries x ORDER BY id",
    # (less the target that 0026 adds to attempts: NULL in the rows made before it)
    "attempts": "SELECT (to_jsonb(x) - 'target_id')::text FROM attempts x ORDER BY id",
}


async def _snapshot(conn: asyncpg.Connection) -> dict[str, list[str]]:
    return {t: [r[0] for r in await conn.fetch(q)] for t, q in _ROWS.items()}


async def test_migration_converts_a_database_with_data(old_db: tuple[str, Path]) -> None:
    url, _ = old_db
    conn = await asyncpg.connect(url)
    try:
        # Given a database of the previous schema with 5 days of history
        await _fill(conn)
        before = await _snapshot(conn)
        last_pos = await conn.fetchval("SELECT last_value FROM deliveries_order_pos_seq")

        # When it is migrated
        applied = await migrate(conn)
        assert applied[0] == "0012_partitioned_history.sql", applied

        # Then every row is there, unchanged, each in its day's partition
        assert await _snapshot(conn) == before
        assert len(before["events"]) == 40 and len(before["attempts"]) == 40
        misplaced = await conn.fetchval(
            """
            SELECT count(*) FROM events
            WHERE tableoid::regclass::text
                  <> 'events_p' || to_char(relay_ulid_time(id) AT TIME ZONE 'UTC', 'YYYYMMDD')
            """
        )
        assert misplaced == 0
        where = await conn.fetch(
            "SELECT status, tableoid::regclass::text AS part FROM deliveries GROUP BY 1, 2"
        )
        for r in where:
            if r["status"] == "succeeded":
                assert r["part"].startswith("deliveries_sent_p"), r
            else:
                assert r["part"] == "deliveries_open", r
        # and the days ahead have their partitions
        ahead = datetime.now(UTC) + timedelta(days=3)
        assert await conn.fetchval("SELECT to_regclass($1)", f"events_p{ahead:%Y%m%d}")

        # And the triggers are on the new tables: the death record and the other one
        triggers = {
            (r["tgname"], r["tgrelid"])
            for r in await conn.fetch(
                "SELECT tgname, tgrelid::regclass::text AS tgrelid FROM pg_trigger "
                "WHERE NOT tgisinternal AND tgparentid = 0"
            )
        }
        assert {("deliveries_death", "deliveries"), ("attempts_logged", "attempts")} <= triggers
        pending = await conn.fetchval("SELECT id FROM deliveries WHERE status = 'pending' LIMIT 1")
        await conn.execute(
            "UPDATE deliveries SET status = 'dead', next_attempt_at = NULL WHERE id = $1",
            pending,
        )
        assert await conn.fetchval(
            "SELECT count(*) FROM delivery_deaths WHERE delivery_id = $1", pending
        )
        await conn.execute(
            "INSERT INTO attempts (id, tenant_id, delivery_id, started_at, duration_ms) "
            "VALUES ('att_01NEW', 'ten_1', $1, now(), 1)",
            pending,
        )
        assert await conn.fetchval(
            "SELECT count(*) FROM attempt_log WHERE attempt_id = 'att_01NEW'"
        )
        # the column another migration added carried its values and its default (the
        # death above also wrote an operational event, a row made after the migration)
        assert await conn.fetchval("SELECT count(*) FROM events WHERE NOT operational") == 40
        assert await conn.fetchval("SELECT count(*) FROM events WHERE operational") == 1
        assert await conn.fetchval("SELECT count(*) FROM events WHERE extra <> 'kept'") == 0

        # And the keys to tenants, sources and targets hold; positions go on
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                "INSERT INTO events (id, tenant_id, source_id, payload) "
                "VALUES ('evt_x', 'ten_none', 'src_1', '\\x00')"
            )
        assert await conn.fetchval("SELECT nextval('deliveries_order_pos_seq')") > last_pos

        # And a uuid seen before the migration is still a duplicate
        first = before["events"][0]
        old_id = first.split('"id":"')[1].split('"')[0]
        result = await record_events(
            conn,
            "ten_1",
            "src_1",
            [ParsedEvent(b"{}", "u-1", None, None, None, None, None)],
            [],
            enqueue_grace_s=30,
        )
        assert result.event_ids == [old_id] and result.duplicates == 1
    finally:
        await conn.close()


async def test_a_uuid_is_a_duplicate_across_days_while_its_event_is_kept(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    conn = await asyncpg.connect(database_url)
    try:
        # Given an event stored yesterday (yesterday's partition), and one ten days
        # ago whose day has no partition (the DEFAULT partition holds it)
        body = [{"uuid": "across-days"}, {"uuid": "in-default"}]
        first = await (await post_token(client, source, body)).json()
        yesterday, old = first["event_ids"]
        moved = await backdate(conn, [yesterday], days=1)
        moved.update(await backdate(conn, [old], days=10, partitions=False))

        # When the same uuids come again today
        again = await post_token(client, source, [*body, {"uuid": "fresh"}])

        # Then they are duplicates: the stored events' ids, no new delivery
        answer = await again.json()
        assert answer["event_ids"][:2] == [moved[yesterday], moved[old]]
        assert answer.get("duplicates", 2) == 2
        n = await conn.fetchval(
            "SELECT count(*) FROM events WHERE source_id = $1 AND upstream_uuid = ANY($2)",
            source["id"],
            ["across-days", "in-default"],
        )
        assert n == 2
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM deliveries d JOIN events e ON e.id = d.event_id "
                "WHERE e.source_id = $1",
                source["id"],
            )
            == 3
        )
    finally:
        await conn.close()


async def test_concurrent_posts_of_one_uuid_to_two_gateway_connections_make_one_event(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given two connections storing events of one source
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    conns = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        # When both store the same uuid of one source at once, many times over
        async def store(conn: asyncpg.Connection, n: int) -> list[str]:
            result = await record_events(
                conn,
                tenant.id,
                source["id"],
                [ParsedEvent(b"{}", f"race-{n}", None, None, None, None, None)],
                [],
                enqueue_grace_s=30,
            )
            return result.event_ids

        for n in range(20):
            a, b = await asyncio.gather(*(store(c, n) for c in conns))
            # Then both get the one event
            assert a == b
        stored = await conns[0].fetchval(
            "SELECT count(*) FROM events WHERE source_id = $1", source["id"]
        )
        assert stored == 20
    finally:
        for c in conns:
            await c.close()


async def test_deleting_a_target_while_its_delivery_succeeds_answers_204(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a target with a delivery that a worker is recording as succeeded (its row
    # moves from deliveries_open to deliveries_sent; the transaction is not yet committed)
    source = await make_source(client, tenant)
    target = await make_target(client, tenant)
    [event_id] = (await (await post_token(client, source, {"n": 1})).json())["event_ids"]
    worker = await asyncpg.connect(database_url)
    try:
        recording = worker.transaction()
        await recording.start()
        await worker.execute(
            "UPDATE deliveries SET status = 'succeeded', next_attempt_at = NULL "
            "WHERE event_id = $1",
            event_id,
        )

        # When the tenant deletes the target meanwhile (it waits for that row), and the
        # record commits
        deleting = asyncio.create_task(
            client.delete(f"/v1/targets/{target['id']}", headers=tenant.auth)
        )
        await asyncio.sleep(0.5)
        await recording.commit()
        resp = await deleting

        # Then the deletion is answered 204 and the delivery stays succeeded
        assert resp.status == 204, await resp.text()
        status = await worker.fetchval(
            "SELECT status FROM deliveries WHERE event_id = $1", event_id
        )
        assert status == "succeeded"
    finally:
        await worker.close()


async def test_a_replay_of_an_event_dropped_past_retention_makes_no_delivery(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given an event read by a replay, then dropped past retention before the replay
    # stores its deliveries
    target = await make_target(client, tenant)
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            # When the replay stores them
            made = await add_deliveries(
                conn,
                tenant.id,
                "evt_01GONE0000000000000000000",
                [(target["id"], None)],
                enqueue_grace_s=30,
            )
        # Then none is made (it would wait for ever for an event it cannot send)
        assert made == []
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM deliveries WHERE target_id = $1", target["id"]
            )
            == 0
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("pad", [0, claims.INLINE_PAYLOAD_BYTES], ids=["inline", "read-apart"])
async def test_a_claim_locks_the_same_few_relations_however_many_days_are_kept(
    client: Any, tenant: Tenant, database_url: str, pad: int
) -> None:
    # Given 40 days of partitions (as with RELAY_RETENTION_DAYS 40) and a due delivery
    # (its payload in the claim's answer, or too big for it and read apart)
    source = await make_source(client, tenant)
    target = await make_target(client, tenant)
    body = {"n": 1, "pad": "x" * pad} if pad else {"n": 1}
    await post_token(client, source, body)
    conn = await asyncpg.connect(database_url)
    try:
        await make_old_days(conn, range(1, 41))

        # When a worker claims it (its locks held to the end of the transaction)
        async with conn.transaction():
            _, claimed = await claims.claim_batch(conn, target["id"], want=10, lease_s=30)
            locked = [
                r["name"]
                for r in await conn.fetch(
                    "SELECT relation::regclass::text AS name FROM pg_locks"
                    " WHERE pid = pg_backend_pid() AND relation IS NOT NULL"
                )
            ]

        # Then it got its payload, and locked its event's partition only, not every
        # day's (Postgres's lock table is shared: 100s of locks per claim would fill it)
        assert [json.loads(c.payload) for c in claimed] == [body]
        today = f"events_p{datetime.now(UTC):%Y%m%d}"
        days = {  # the day partitions locked (a parent's index, e.g. events_pkey, is no day)
            m.group(1) for n in locked if (m := re.match(r"(?:events|deliveries_sent)_(p\d{8})", n))
        }
        assert days <= {today.split("_")[1]}, sorted(days)
        assert len(locked) < 100, len(locked)
    finally:
        await conn.close()


async def test_an_events_deliveries_and_their_attempts_are_read_from_their_days_only(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given 20 days of partitions before yesterday, and an event of today with its
    # delivery and two attempts, one of them stamped 30 minutes before its delivery
    # (made by a worker whose clock is behind the gateway's)
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    [event_id] = (await (await post_token(client, source, {"n": 1})).json())["event_ids"]
    conn = await asyncpg.connect(database_url)
    try:
        old_days = await make_old_days(conn)
        delivery_id = await conn.fetchval("SELECT id FROM deliveries WHERE event_id = $1", event_id)
        now = new_id("att")
        behind = aged_id(now, datetime.now(UTC) - timedelta(minutes=30))
        for attempt_id in (behind, now):
            await conn.execute(
                "INSERT INTO attempts (id, tenant_id, delivery_id, target_id, started_at,"
                " duration_ms, status_code) SELECT $1, tenant_id, id, target_id, now(), 5, 500"
                " FROM deliveries WHERE id = $2",
                attempt_id,
                delivery_id,
            )

        # When its event's page and its delivery's page are read
        planned = Planned(conn)
        page, _ = await deliveries.deliveries_of_event(planned, tenant.id, event_id, limit=10)
        every = await deliveries.attempts_of(planned, delivery_id)
        latest, _ = await deliveries.attempts_page(planned, delivery_id, limit=10)

        # Then both attempts are there, and no plan holds an older day's partition:
        # an old event's page costs what a new one's does, however many days are kept
        assert [d.id for d in page] == [delivery_id]
        assert [a.id for a in every] == [behind, now]
        assert [a.id for a in latest] == [now, behind]
        assert planned.partitions_of(old_days) == []
    finally:
        await conn.close()


async def _spread_over_days(
    client: Any, tenant: Tenant, conn: asyncpg.Connection
) -> dict[str, list[str]]:
    """A tenant's events (two targets each) made now, 20 hours, 30 hours, 3 days and 10
    days ago (Bill now and 3 days ago, Invoice else; payloads of 40..49 bytes); its
    events' and its deliveries' ids, newest first."""
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    await make_target(client, tenant)
    for days, count in ((10, 2), (3, 3), (1.25, 2), (20 / 24, 2), (0, 3)):
        kind = "Bill" if days in (0, 3) else "Invoice"
        body = [{"objectType": kind, "n": f"{days}-{i}", "pad": "x" * i} for i in range(count)]
        made = (await (await post_token(client, source, body)).json())["event_ids"]
        if days:
            await backdate(conn, made, days)
    rows = {
        table: [
            r["id"]
            for r in await conn.fetch(
                f"SELECT id FROM {table} WHERE tenant_id = $1 AND NOT {flag} ORDER BY id DESC",
                tenant.id,
            )
        ]
        for table, flag in (("events", "operational"), ("deliveries", "false"))
    }
    return rows


async def _every_page(list_page: Any, limit: int) -> list[list[str]]:
    """The ids of each page of a list, following its cursors to the end."""
    pages, cursor = [], None
    while True:
        rows, cursor = await list_page(limit, cursor)
        pages.append([r.id for r in rows])
        if cursor is None:
            return pages


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 7, 50])
async def test_lists_read_newest_first_across_days_lose_and_repeat_nothing(
    client: Any, tenant: Tenant, database_url: str, limit: int
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # Given a tenant's events and deliveries of today, yesterday, and days before
        # (a list reads the last day first, then the days before it when its page is
        # not full)
        made = await _spread_over_days(client, tenant, conn)
        assert len(made["events"]) == 12 and len(made["deliveries"]) == 24

        # When every page of its events, its deliveries and the console's event search
        # is read, and of the Invoices only (which the last day holds two of)
        lists = {
            "events": lambda n, c: events_store.list_events(
                conn, tenant.id, limit=n, cursor=c, payload_bytes=1 << 20
            ),
            "deliveries": lambda n, c: deliveries.list_deliveries(
                conn, tenant.id, limit=n, cursor=c
            ),
            "console events": lambda n, c: console.search_events(
                conn, tenant.id, console.EventSearch(), limit=n, cursor=c
            ),
            "invoices": lambda n, c: events_store.list_events(
                conn, tenant.id, limit=n, cursor=c, object_type="invoice", payload_bytes=1 << 20
            ),
        }
        pages = {name: await _every_page(read, limit) for name, read in lists.items()}

        # Then each list is every row once, newest first, in pages of the limit
        invoices = await conn.fetch(
            "SELECT id FROM events WHERE tenant_id = $1 AND object_type = 'Invoice'"
            " ORDER BY id DESC",
            tenant.id,
        )
        expected = {
            "events": made["events"],
            "deliveries": made["deliveries"],
            "console events": made["events"],
            "invoices": [r["id"] for r in invoices],
        }
        for name, ids in expected.items():
            assert [i for page in pages[name] for i in page] == ids, name
            assert all(len(page) == limit for page in pages[name][:-1]), name
    finally:
        await conn.close()


async def test_a_page_of_events_reads_payloads_up_to_its_budget_across_days(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # Given events of today and of days before, and a budget of payload bytes that
        # the page's first events (today's and yesterday's) do not exhaust
        made = await _spread_over_days(client, tenant, conn)
        sizes = {
            r["id"]: r["n"]
            for r in await conn.fetch(
                "SELECT id, octet_length(payload) AS n FROM events WHERE tenant_id = $1",
                tenant.id,
            )
        }
        budget = sum(sizes[i] for i in made["events"][:8]) + 1

        # When a page of ten is read
        page, _ = await events_store.list_events(
            conn, tenant.id, limit=10, cursor=None, payload_bytes=budget
        )

        # Then the payloads are those of the newest events whose sizes, added up newest
        # first, fit the budget: the first eight, whichever day they are of
        assert [e.id for e in page] == made["events"][:10]
        assert [e.payload is not None for e in page] == [True] * 8 + [False] * 2
    finally:
        await conn.close()


async def test_a_page_of_the_newest_reads_only_the_last_days_when_they_fill_it(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given 20 days of partitions, and more events and deliveries today than a page
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    await post_token(client, source, [{"n": i} for i in range(12)])
    conn = await asyncpg.connect(database_url)
    try:
        old_days = await make_old_days(conn)

        # When the first page of each list is read
        planned = Planned(conn)
        read = [
            await events_store.list_events(
                planned, tenant.id, limit=10, cursor=None, payload_bytes=1 << 20
            ),
            await deliveries.list_deliveries(planned, tenant.id, limit=10, cursor=None),
            await console.search_events(
                planned, tenant.id, console.EventSearch(), limit=10, cursor=None
            ),
        ]

        # Then each is full, in one read that plans no older day's partition
        assert [len(rows) for rows, _ in read] == [10, 10, 10]
        assert len(planned.plans) == 3
        assert planned.partitions_of(old_days) == []
    finally:
        await conn.close()
