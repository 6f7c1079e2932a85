"""Open deliveries whose statistics say none waits are analyzed again once they pile up.

Autovacuum analyzes the open deliveries after a burst was sent, when every row
there is a dead tuple: the statistics then say the partition holds nothing, over
pages that remain, and a plan made until the next analyze (a minute or more away)
reads the partition whole, since reading all of nothing costs nothing. A worker
started meanwhile made its record's plan then and read every open delivery through
an index for each batch: `bench/history.py`'s drain of a 20,000 backlog ran at 430
deliveries/s, each record of 10 taking 50 ms (auto_explain). The sweeper's tick
(each second) analyzes the open deliveries again once far more wait to be sent than
their statistics say, also when they were taken while the partition held only dead
letters (a database with history). Tuples read are counted as in
test_delivery_plan.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from relay.store import housekeeping
from relay.store.db import connect
from relay.store.events import record_event_groups
from tests.integration.test_delivery_plan import (
    BATCH,
    TARGET,
    group,
    seed_target,
    send_all,
    seq_read,
)
from tests.stack import Workers, eventually, fetch

BACKLOG = 20_000
BATCHES = 6


async def _pile_up(database_url: str, *, dead_letters: int = 0) -> None:
    """A burst sent, the open deliveries analyzed then as autovacuum does (every row there a
    dead tuple, or one of ``dead_letters`` dead letters), then a backlog of ``BACKLOG`` due
    deliveries piled up, the worker down."""
    setup = await asyncpg.connect(database_url)
    try:
        await seed_target(setup)
        await record_event_groups(setup, group(200), enqueue_grace_s=30)
        burst = await connect(database_url)
        try:
            while await send_all(burst, 64):
                pass
        finally:
            await burst.close()
        await _open_deliveries(setup, "dead", dead_letters)
        await setup.execute("ANALYZE deliveries_open")
        await _open_deliveries(setup, "pending", BACKLOG)
        await setup.execute("SELECT pg_stat_force_next_flush()")
        await setup.execute("SELECT 1")  # statistics go out as a connection goes idle
    finally:
        await setup.close()


async def _open_deliveries(conn: asyncpg.Connection, status: str, count: int) -> None:
    """``count`` events to the target, each with a delivery in ``status`` (pending ones due)."""
    await conn.execute(
        "INSERT INTO events (id, tenant_id, source_id, upstream_uuid, object_type, action,"
        " payload) SELECT 'evt_dplan_' || $2 || n, 'ten_dplan', 'src_dplan',"
        " gen_random_uuid()::text, 'Bill', 'paid', '{}'::bytea"
        " FROM generate_series(1, $1) n",
        count,
        status,
    )
    await conn.execute(
        "INSERT INTO deliveries (id, tenant_id, event_id, target_id, status, next_attempt_at)"
        " SELECT 'dlv_dplan_' || $3 || n, 'ten_dplan', 'evt_dplan_' || $3 || n, $2, $3,"
        " CASE WHEN $3 = 'pending' THEN now() END"
        " FROM generate_series(1, $1) n",
        count,
        TARGET,
        status,
    )


async def _known_open_rows(database_url: str) -> float:
    rows = await fetch(
        database_url, "SELECT reltuples FROM pg_class WHERE oid = 'deliveries_open'::regclass"
    )
    return float(rows[0]["reltuples"])


@pytest.mark.parametrize("dead_letters", [0, 15_000])
async def test_a_backlog_after_a_burst_is_sent_reading_by_key(
    own_database: str, dead_letters: int
) -> None:
    # Given a backlog piled up after a burst, over statistics that say none is open: the
    # partition held nothing alive, or only dead letters (what a database with history
    # holds there: `bench/history.py`'s drain stayed at 437 deliveries/s with the first
    # case fixed)
    await _pile_up(own_database, dead_letters=dead_letters)
    setup = await asyncpg.connect(own_database)
    try:
        # When the sweeper ticks (each second) before the worker is back: it counts the
        # waiting deliveries from the counters, exact at once
        assert await housekeeping.refresh_open_statistics(setup)
        # and a worker started now sends batches of 16
        before_scans, before_read = await seq_read(setup)
        worker = await connect(own_database)
        try:
            sent = 0
            for _ in range(BATCHES):
                sent += len(await send_all(worker, BATCH))
            await worker.execute("SELECT pg_stat_force_next_flush()")
            await worker.execute("SELECT 1")
        finally:
            await worker.close()
        for _ in range(100):
            scans, _ = await seq_read(setup)
            if scans > before_scans:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # a straggler's statistics would only add to the count
        read = (await seq_read(setup))[1] - before_read
    finally:
        await setup.close()

    # Then every batch is sent and recorded reading a few tuples each, not the backlog
    # (120,048 tuples for 6 batches before the sweeper analyzed them)
    assert sent == BATCH * BATCHES
    assert read < BACKLOG // 10, f"{read:,} tuples read"


async def test_the_sweeper_of_a_worker_process_analyzes_them(
    own_database: str, clean_redis: str, tmp_path: Path
) -> None:
    # Given a backlog piled up after a burst, over statistics that say none is open
    await _pile_up(own_database)
    assert await _known_open_rows(own_database) < 1_000

    # When a `relay worker` starts (its sweeper leads)
    workers = Workers(own_database, clean_redis, tmp_path)
    try:
        workers.start()

        # Then within seconds (autovacuum looks once a minute) the statistics know them
        async def known() -> bool:
            return await _known_open_rows(own_database) >= BACKLOG / 2

        await eventually(known, timeout=30)
    finally:
        for process in workers.started:
            process.stop()
