"""Sending a delivery costs what it touches, not what the tables already hold.

A worker's connection keeps its plans for its life: the claim and the
attempts' rollup trigger (PL/pgSQL), the payload read and the record (prepared
statements). Planned while the day's partitions were small (a new install, a
new day, a bench's database) and never again until an ANALYZE, each of them
read whole tables: the payload read every event of the day, the record and the
claim every open delivery (dead letters included), the rollup every delivery of
the day, for every claim and record of every delivery. At 500 events/s that
was the larger part of Postgres's CPU, and end-to-end latency went to seconds at
1,000/s. Tuples read by sequential scans are counted by Postgres's statistics
(pg_stat_user_tables), flushed when the connection goes idle; so are the
tuples fetched through indexes, which a plan that walks a whole index would
inflate as much.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import asyncpg

from relay.ingest.parse import parse_body
from relay.ingest.routes import TargetRoute
from relay.store import claims
from relay.store.claims import Attempt
from relay.store.db import Conn, connect
from relay.store.events import IngestRequest, record_event_groups

HISTORY = 20_000
BATCH = 16
TARGET = "tgt_dplan"
ROUTES = [TargetRoute(TARGET, frozenset(), frozenset(), None)]


def group(n: int) -> list[IngestRequest]:
    def body() -> bytes:
        event = {"uuid": str(uuid.uuid4()), "objectType": "Bill", "objectId": n}
        return json.dumps({**event, "action": "paid", "date": "2026-11-28T12:00:00Z"}).encode()

    return [IngestRequest("ten_dplan", "src_dplan", parse_body(body()), ROUTES) for _ in range(n)]


async def seq_read(conn: asyncpg.Connection) -> tuple[int, int]:
    """Scans of the history tables, and the tuples they read, as last flushed."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(
        "SELECT coalesce(sum(coalesce(idx_scan, 0) + seq_scan), 0) AS scans,"
        " coalesce(sum(seq_tup_read + coalesce(idx_tup_fetch, 0)), 0) AS seq_read"
        " FROM pg_stat_user_tables"
        " WHERE relname ~ '^(events|deliveries|attempts)_'"
    )
    assert row is not None
    return int(row["scans"]), int(row["seq_read"])


async def send_all(worker: Conn, want: int) -> list[str]:
    """What a drainer does with a due batch: claim it, read it, record it as sent."""
    share = await claims.claim_share(worker, TARGET, want=want, lease_s=30)
    now = datetime.now(UTC)
    attempts = [
        Attempt(row, now, 3, 200, None, "ok", "succeeded", None, None, None) for row in share.rows
    ]
    return await claims.record_batch(worker, TARGET, attempts, breaker=None, failing=False)


async def seed_target(conn: asyncpg.Connection) -> None:
    """The tenant, source and target (64 in flight, never reached) of ``group``'s events."""
    await conn.execute("INSERT INTO tenants (id, name) VALUES ('ten_dplan', 'plan')")
    await conn.execute(
        "INSERT INTO sources (id, tenant_id, name, auth_type, secret_enc)"
        " VALUES ('src_dplan', 'ten_dplan', 'plan', 'token', '\\x00'::bytea)"
    )
    await conn.execute(
        "INSERT INTO targets (id, tenant_id, url, secret_enc, max_in_flight)"
        " VALUES ($1, 'ten_dplan', 'http://127.0.0.1:9/', '\\x00'::bytea, 64)",
        TARGET,
    )


async def test_a_claim_and_its_record_read_indexes_however_small_the_tables_were_when_planned(
    database_url: str,
) -> None:
    # Given a target, and a worker connection that sent deliveries while the day's
    # partitions were empty (its plans are made and kept then)
    setup = await asyncpg.connect(database_url)
    gateway = await asyncpg.connect(database_url)
    worker = await connect(database_url)
    try:
        await seed_target(setup)
        for n in (1, 2, 1, 3, 1, 2, 1, 4, 1, 2):  # past the plan cache's five custom plans
            await record_event_groups(gateway, group(n), enqueue_grace_s=30)
            assert len(await send_all(worker, n)) == n

        # When the day's events and deliveries pile up (sent, and dead letters kept
        # open), with no ANALYZE meanwhile
        await setup.execute(
            "INSERT INTO events (id, tenant_id, source_id, upstream_uuid, object_type, action,"
            " payload) SELECT 'evt_dplan_' || n, 'ten_dplan', 'src_dplan',"
            " gen_random_uuid()::text, 'Bill', 'paid', '{}'::bytea"
            " FROM generate_series(1, $1) n",
            HISTORY,
        )
        await setup.execute(
            "INSERT INTO deliveries (id, tenant_id, event_id, target_id, status, attempt_count)"
            " SELECT 'dlv_dplan_' || n, 'ten_dplan', 'evt_dplan_' || n, $2,"
            " CASE WHEN n % 2 = 0 THEN 'succeeded' ELSE 'dead' END, 1"
            " FROM generate_series(1, $1) n",
            HISTORY,
            TARGET,
        )
        before_scans, before_read = await seq_read(setup)
        # and the worker sends a batch of 16 fresh deliveries
        stored = await record_event_groups(gateway, group(BATCH), enqueue_grace_s=30)
        sent = await send_all(worker, BATCH)
        for conn in (gateway, worker):
            await conn.execute("SELECT pg_stat_force_next_flush()")
            await conn.execute("SELECT 1")  # statistics go out as a connection goes idle

        async def flushed() -> int:
            for _ in range(100):
                scans, read = await seq_read(setup)
                if scans > before_scans:
                    return read - before_read
                await asyncio.sleep(0.05)
            raise AssertionError("the statistics never came")

        read = await flushed()
        # (a straggler's statistics would only add to the count)
        await asyncio.sleep(0.2)
        read = max(read, (await seq_read(setup))[1] - before_read)
    finally:
        await worker.close()
        await gateway.close()
        await setup.close()

    # Then all 16 were sent and recorded, and nothing read a table through: far
    # fewer tuples than one pass over the day's events or deliveries
    assert len(sent) == BATCH
    assert sorted(sent) == sorted(d for r in stored for d in r.delivery_ids)
    assert read < HISTORY // 10, f"{read:,} tuples read"
