"""Postgres's shared lock table: no request can fill it, and a full one is a 503, not a 500.

Each test runs on a Postgres of its own with ``max_locks_per_transaction = 10`` (the
lowest Postgres allows), so its lock table holds about a thousand locks in all.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import asyncpg

from relay.core.config import Settings
from relay.store.events import UUID_LOCK_BUCKETS
from relay.store.migrations import migrate
from relay.store.sql import KEY_LOCK_BUCKETS
from relay.web.app import create_app
from tests.conftest import make_tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.services import RestartablePostgres
from tests.stack import eventually

TARGETS = 10
KEYS = 1000


async def _small_lock_table(tmp_path: Path) -> RestartablePostgres:
    postgres = RestartablePostgres(tmp_path / "pg").start()
    conn = await asyncpg.connect(postgres.url)
    await conn.execute("ALTER SYSTEM SET max_locks_per_transaction = 10")
    await conn.close()
    await asyncio.to_thread(postgres.stop)
    postgres.start()
    conn = await asyncpg.connect(postgres.url)
    try:
        assert await conn.fetchval("SHOW max_locks_per_transaction") == "10"
        await migrate(conn)
    finally:
        await conn.close()
    return postgres


def _batch(prefix: str) -> list[dict[str, Any]]:
    return [
        {"uuid": f"{prefix}-{n}", "objectType": "Bill", "objectId": f"{prefix}-{n}"}
        for n in range(KEYS)
    ]


async def _advisory_locks(watcher: Any, pid: int) -> int:
    count: int = await watcher.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", pid
    )
    return count


async def test_a_thousand_keys_to_ten_ordered_targets_take_a_bounded_number_of_locks(
    aiohttp_client: Any, settings: Settings, tmp_path: Path
) -> None:
    # Given a gateway on a Postgres whose lock table is small, and 10 ordered targets
    # (statements may wait long: one is held on purpose below)
    postgres = await _small_lock_table(tmp_path)
    client = await aiohttp_client(
        create_app(settings.with_overrides(database_url=postgres.url, db_statement_timeout_s=60.0))
    )
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    for _ in range(TARGETS):
        await make_target(client, tenant, ordering="object")
    # And an unrelated session taking locks of its own in short transactions meanwhile
    unrelated = await asyncpg.connect(postgres.url)
    failures: list[str] = []
    rounds = 0
    running = True

    async def other_work() -> None:
        nonlocal rounds
        while running:
            try:
                async with unrelated.transaction():
                    await unrelated.execute(
                        "SELECT pg_advisory_xact_lock(7, n) FROM generate_series(1, 20) n"
                    )
                    await unrelated.execute("CREATE TEMP TABLE scratch (n int) ON COMMIT DROP")
                rounds += 1
            except asyncpg.PostgresError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.01)

    other = asyncio.create_task(other_work())
    try:
        # When batches of 1,000 events with distinct keys are posted, three at once
        answers = await asyncio.gather(
            *(post_token(client, source, _batch(f"k{n}")) for n in range(3))
        )

        # Then each is accepted: its deliveries, one per event and target, are stored
        for resp in answers:
            assert resp.status == 202, (resp.status, await resp.text())
    finally:
        running = False
        await other
    conn = await asyncpg.connect(postgres.url)
    try:
        count = await conn.fetchval("SELECT count(*) FROM deliveries WHERE order_key IS NOT NULL")
        assert count == 3 * KEYS * TARGETS
        # And the unrelated session never failed
        assert rounds > 0
        assert failures == []

        # And while a batch's transaction is held (its deliveries' table locked by
        # another session), it holds at most KEY_LOCK_BUCKETS advisory locks per target
        blocker = await asyncpg.connect(postgres.url)
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE deliveries IN EXCLUSIVE MODE")
        post = asyncio.create_task(post_token(client, source, _batch("held")))

        async def waiting_backend() -> int | None:
            pid: int | None = await conn.fetchval(
                """
                SELECT pid FROM pg_stat_activity
                WHERE wait_event_type = 'Lock' AND query LIKE '%relay_insert_deliveries(%'
                """
            )
            return pid

        pid = await eventually(waiting_backend, timeout=30)
        assert pid is not None
        held = await _advisory_locks(conn, pid)
        print(f"a batch of {KEYS} keys to {TARGETS} ordered targets holds {held} advisory locks")
        await tx.commit()
        await blocker.close()
        resp = await post
        assert resp.status == 202, await resp.text()
        # (and, for its source's uuids, at most UUID_LOCK_BUCKETS: de-duplication's locks)
        assert 0 < held <= KEY_LOCK_BUCKETS * TARGETS + UUID_LOCK_BUCKETS, held
    finally:
        await conn.close()
        await unrelated.close()
        await asyncio.to_thread(postgres.stop)


async def test_a_full_lock_table_is_answered_503_with_retry_after(
    aiohttp_client: Any, settings: Settings, tmp_path: Path
) -> None:
    # Given a gateway on a Postgres with a small lock table, and an ordered target
    postgres = await _small_lock_table(tmp_path)
    client = await aiohttp_client(create_app(settings.with_overrides(database_url=postgres.url)))
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    await make_target(client, tenant, ordering="object")
    assert (await post_token(client, source, _batch("warm")[:1])).status == 202
    # And another session of the cluster that filled the lock table (session locks
    # outlive the statement that failed to take one more)
    filler = await asyncpg.connect(postgres.url)
    try:
        with contextlib.suppress(asyncpg.exceptions.OutOfMemoryError):
            for start in range(0, 1_000_000, 100):
                await filler.execute(
                    "SELECT pg_advisory_lock(9, n) FROM generate_series($1::int, $1 + 99) n",
                    start,
                )
            raise AssertionError("the lock table never filled up")

        # When an ordered event is posted
        resp = await post_token(client, source, _batch("full")[:1])

        # Then the answer is 503 with Retry-After, in API.md's error shape
        assert resp.status == 503, (resp.status, await resp.text())
        assert resp.headers["Retry-After"].isdigit()
        assert (await resp.json())["error"]["code"] == "unavailable"
    finally:
        await filler.close()  # its session locks go with it

    # And once the locks are free, the same event is accepted
    resp = await post_token(client, source, _batch("full")[:1])
    assert resp.status == 202, await resp.text()
    await asyncio.to_thread(postgres.stop)
