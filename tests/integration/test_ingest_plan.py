"""Storing events costs what is stored, not what the day's partition already holds.

Each event's uuid is checked against its source's events before it is inserted.
Plans are kept for a connection's life (prepared statements, PL/pgSQL): planned
while the day's partition was small (a new install, a new day, a bench's
database), the check read the whole partition for every event, until an ANALYZE
replanned it. After 30,000 events, a group of 16 cost 21 ms of Postgres's CPU
instead of 1 ms, and the gateway's group commits fell behind at 1,000 events/s.
Tuples read by sequential scans are counted by Postgres's statistics
(pg_stat_user_tables), flushed when the connection goes idle.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import asyncpg
import pytest

from relay.ingest.parse import parse_body
from relay.ingest.routes import TargetRoute
from relay.store import events
from relay.store.events import IngestRequest, record_event_groups

HISTORY = 30_000
GROUP = 16
ROUTES = [TargetRoute(t, frozenset(), frozenset(), None) for t in ("tgt_plan_1", "tgt_plan_2")]


def group(n: int) -> list[IngestRequest]:
    def body() -> bytes:
        event = {"uuid": str(uuid.uuid4()), "objectType": "Bill", "objectId": n}
        return json.dumps({**event, "action": "paid", "date": "2026-11-28T12:00:00Z"}).encode()

    return [IngestRequest("ten_plan", "src_plan", parse_body(body()), ROUTES) for _ in range(n)]


async def events_stats(conn: asyncpg.Connection) -> tuple[int, int]:
    """Scans of the events partitions, and tuples read by sequential ones, as last flushed."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(
        "SELECT coalesce(sum(coalesce(idx_scan, 0) + seq_scan), 0) AS scans,"
        " coalesce(sum(seq_tup_read), 0) AS seq_read FROM pg_stat_user_tables"
        " WHERE relname LIKE 'events\\_%'"
    )
    assert row is not None
    return int(row["scans"]), int(row["seq_read"])


async def test_the_uuid_check_reads_the_index_however_small_the_partition_was_when_planned(
    database_url: str,
) -> None:
    # Given a source with two targets, and a gateway connection that stored events
    # while the day's partition was empty (its plans are made and kept then)
    setup = await asyncpg.connect(database_url)
    gateway = await asyncpg.connect(database_url)
    try:
        await setup.execute("INSERT INTO tenants (id, name) VALUES ('ten_plan', 'plan')")
        await setup.execute(
            "INSERT INTO sources (id, tenant_id, name, auth_type, secret_enc)"
            " VALUES ('src_plan', 'ten_plan', 'plan', 'token', '\\x00'::bytea)"
        )
        for route in ROUTES:
            await setup.execute(
                "INSERT INTO targets (id, tenant_id, url, secret_enc)"
                " VALUES ($1, 'ten_plan', 'http://127.0.0.1:9/', '\\x00'::bytea)",
                route.id,
            )
        for n in (1, 2, 1, 3, 1, 2, 1, 4, 1, 2):  # past the plan cache's five custom plans
            await record_event_groups(gateway, group(n), enqueue_grace_s=30)

        # When the partition fills with a day's events, no ANALYZE meanwhile
        await setup.execute(
            "INSERT INTO events (id, tenant_id, source_id, upstream_uuid, object_type, action,"
            " payload) SELECT 'evt_plan_' || n, 'ten_plan', 'src_plan', gen_random_uuid()::text,"
            " 'Bill', 'paid', '{}'::bytea FROM generate_series(1, $1) n",
            HISTORY,
        )
        before_scans, before_read = await events_stats(setup)
        # and the gateway stores a group of 16 events
        stored = await record_event_groups(gateway, group(GROUP), enqueue_grace_s=30)
        await gateway.execute("SELECT pg_stat_force_next_flush()")
        await gateway.execute("SELECT 1")  # its statistics go out as it goes idle

        async def flushed() -> int:
            for _ in range(100):
                scans, seq_read = await events_stats(setup)
                if scans > before_scans:
                    return seq_read - before_read
                await asyncio.sleep(0.05)
            raise AssertionError("the gateway's statistics never came")

        read = await flushed()
    finally:
        await gateway.close()
        await setup.close()

    # Then all 16 were stored, with their deliveries, and the uuid check read the
    # index: far fewer tuples than one pass over the partition, let alone 16
    assert sum(len(r.event_ids) for r in stored) == GROUP
    assert sum(len(r.delivery_ids) for r in stored) == GROUP * len(ROUTES)
    assert read < HISTORY // 10, f"{read:,} tuples read by sequential scans of events"


WIDE_TARGETS = 300


def wide_group(ordered: bool, uuids: list[str]) -> list[IngestRequest]:
    tenant = f"ten_wide_{ordered}"
    routes = [
        TargetRoute(f"tgt_wide_{ordered}_{n}", frozenset(), frozenset(), None, ordered=ordered)
        for n in (7, 123)
    ]
    bodies = [
        json.dumps(
            # ordered: 100 events of 7 keys, so most wait behind an earlier one
            {"uuid": u, "objectType": "Bill", "objectId": n % 7, "action": "paid"}
        ).encode()
        for n, u in enumerate(uuids)
    ]
    return [IngestRequest(tenant, f"src_wide_{ordered}", parse_body(b), routes) for b in bodies]


async def explained(conn: asyncpg.Connection) -> None:
    """Every statement's plan, its nested ones too, sent to ``conn`` as a NOTICE."""
    try:
        await conn.execute("LOAD 'auto_explain'")
    except asyncpg.UndefinedFileError:
        # a contrib module: Debian's Postgres has it, the embedded one of `[embedded]` not
        pytest.skip("this Postgres has no auto_explain")
    for setting in (
        "auto_explain.log_min_duration = 0",
        "auto_explain.log_nested_statements = on",
        "auto_explain.log_analyze = on",
        "auto_explain.log_timing = off",
        "auto_explain.log_level = notice",
    ):
        await conn.execute(f"SET {setting}")


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
async def test_a_group_reads_what_it_stores_not_every_target_or_id(
    database_url: str, ordered: bool
) -> None:
    # Given a tenant with 300 targets, two of which match (ordered by object or
    # not), and a gateway connection whose plans are generic by now (they cannot
    # see how long the arrays are)
    setup = await asyncpg.connect(database_url)
    gateway = await asyncpg.connect(database_url)
    plans: list[str] = []
    try:
        await setup.execute(
            "INSERT INTO tenants (id, name) VALUES ($1, 'wide')", f"ten_wide_{ordered}"
        )
        await setup.execute(
            "INSERT INTO sources (id, tenant_id, name, auth_type, secret_enc)"
            " VALUES ($1, $2, 'wide', 'token', '\\x00'::bytea)",
            f"src_wide_{ordered}",
            f"ten_wide_{ordered}",
        )
        await setup.execute(
            "INSERT INTO targets (id, tenant_id, url, secret_enc, ordering)"
            " SELECT $2 || n, $1, 'http://127.0.0.1:9/', '\\x00'::bytea, $3"
            " FROM generate_series(1, $4) n",
            f"ten_wide_{ordered}",
            f"tgt_wide_{ordered}_",
            "object" if ordered else "none",
            WIDE_TARGETS,
        )
        for n in (1, 2, 1, 3, 1, 2, 1, 4, 1, 2):
            fresh = [str(uuid.uuid4()) for _ in range(n)]
            await record_event_groups(gateway, wide_group(ordered, fresh), enqueue_grace_s=30)

        # When it stores a group of 100 new events, then the same 100 again with 20
        # new ones (the 100 are duplicates), with every statement's plan reported
        await explained(gateway)
        gateway.add_log_listener(lambda _conn, message: plans.append(str(message)))
        first = [str(uuid.uuid4()) for _ in range(100)]
        stored = await record_event_groups(gateway, wide_group(ordered, first), enqueue_grace_s=30)
        again = first + [str(uuid.uuid4()) for _ in range(20)]
        resent = await record_event_groups(gateway, wide_group(ordered, again), enqueue_grace_s=30)
    finally:
        await gateway.close()
        await setup.close()

    # Then each is stored once, with a delivery to each of the two targets
    assert sum(len(r.delivery_ids) for r in stored) == 200
    assert sum(r.duplicates for r in resent) == 100
    assert sum(len(r.delivery_ids) for r in resent) == 40
    assert [r.event_ids for r in resent[:100]] == [r.event_ids for r in stored]
    # And no statement read a whole table, hashed a whole partition, or joined each
    # delivery to the tenant's every target or the group's every id: each row is
    # checked by an index probe of its own
    text = "\n".join(plans)
    assert "relay_ingest" in text, text
    assert "Seq Scan" not in text, text
    assert "hashed SubPlan" not in text, text
    joined_away = sum(int(n) for n in re.findall(r"Rows Removed by Join Filter: (\d+)", text))
    assert joined_away < 50, text
    assert ("relay_insert_deliveries" in text) is ordered, text


async def test_a_heavy_group_goes_in_chunks_and_each_key_still_waits_its_turn(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an ordered target, and deliveries inserted 7 rows per statement
    monkeypatch.setattr(events, "INSERT_CHUNK", 7)
    conn = await asyncpg.connect(database_url)
    calls: list[str] = []
    try:
        await conn.execute("INSERT INTO tenants (id, name) VALUES ('ten_chunk', 'chunk')")
        await conn.execute(
            "INSERT INTO sources (id, tenant_id, name, auth_type, secret_enc)"
            " VALUES ('src_chunk', 'ten_chunk', 'chunk', 'token', '\\x00'::bytea)"
        )
        await conn.execute(
            "INSERT INTO targets (id, tenant_id, url, secret_enc, ordering)"
            " VALUES ('tgt_chunk', 'ten_chunk', 'http://127.0.0.1:9/', '\\x00'::bytea, 'object')"
        )
        route = TargetRoute("tgt_chunk", frozenset(), frozenset(), None, ordered=True)
        body = json.dumps(
            [
                {"uuid": str(uuid.uuid4()), "objectType": "Bill", "objectId": f"k{n % 3}"}
                for n in range(20)
            ]
        ).encode()
        request = IngestRequest("ten_chunk", "src_chunk", parse_body(body), [route])
        conn.add_query_logger(lambda record: calls.append(record.query))

        # When a request of 20 events over 3 keys is stored
        (stored,) = await record_event_groups(conn, [request], enqueue_grace_s=30)
        rows = await conn.fetch(
            "SELECT d.order_key, d.order_pos, d.next_attempt_at IS NOT NULL AS due, e.id AS event"
            " FROM deliveries d JOIN events e ON e.id = d.event_id"
            " WHERE d.target_id = 'tgt_chunk' ORDER BY d.order_pos"
        )
    finally:
        await conn.close()

    # Then it took three statements, and each key has one delivery due, its first,
    # the others waiting in the order of the body
    assert sum("relay_insert_deliveries(" in c for c in calls) == 3, calls
    assert len(stored.delivery_ids) == len(rows) == 20
    assert [r["event"] for r in rows] == stored.event_ids
    keys = {r["order_key"] for r in rows}
    assert len(keys) == 3, keys
    for key in keys:
        mine = [r["due"] for r in rows if r["order_key"] == key]
        assert mine == [True] + [False] * (len(mine) - 1), (key, mine)
