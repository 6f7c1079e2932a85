"""A lighter record (0026) and claim.

A record moves its deliveries without locking their tenant's and target's rows.

A succeeded delivery moves from deliveries_open to deliveries_sent. With the keys
to tenants and targets on the parent, each move ran two foreign-key checks, and
each attempt a third: a query apiece, each taking FOR KEY SHARE on the one tenant
row and the one target row every worker's record touches (11.5 µs of 78 in
Postgres a delivery, bench/pg_cycle.py). The keys are now checked where deliveries
are made (deliveries_open), and an attempt carries its target, so that the
attempts' rollup no longer looks each delivery up in every partition.

A claim's transaction commits without waiting for its WAL to be flushed. A claim
is a lease: one that a crash of Postgres loses is a delivery claimed again, as
when a worker dies holding it. Its commit is spared the flush (an fsync here)
that a record's commit pays anyway, and flushes the claim's WAL with.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from relay.core.crypto import new_id
from relay.store import claims, housekeeping
from tests.history import make_partitions


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


async def tenant_and_target(conn: asyncpg.Connection, deliveries: int) -> tuple[str, str]:
    """A tenant, a target of it with ``deliveries`` due deliveries."""
    tenant, source, target = new_id("ten"), new_id("src"), new_id("tgt")
    await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, 'record')", tenant)
    await conn.execute(
        "INSERT INTO sources (id, tenant_id, name, auth_type, secret_enc)"
        " VALUES ($1, $2, 's', 'token', '\\x00')",
        source,
        tenant,
    )
    await conn.execute(
        "INSERT INTO targets (id, tenant_id, url, secret_enc, max_in_flight)"
        " VALUES ($1, $2, 'http://127.0.0.1:9/', '\\x00', 50)",
        target,
        tenant,
    )
    for _ in range(deliveries):
        event = new_id("evt")
        await conn.execute(
            "INSERT INTO events (id, tenant_id, source_id, payload) VALUES ($1, $2, $3, '{}')",
            event,
            tenant,
            source,
        )
        await conn.execute(
            "INSERT INTO deliveries (id, tenant_id, event_id, target_id, next_attempt_at,"
            " enqueued_until) VALUES ($1, $2, $3, $4, now(), now() + interval '1 hour')",
            new_id("dlv"),
            tenant,
            event,
            target,
        )
    return tenant, target


async def send_all(conn: asyncpg.Connection, target: str, code: int) -> list[str]:
    """Claim the target's due deliveries and record one attempt each, answered ``code``."""
    _, claimed = await claims.claim_batch(conn, target, want=50, lease_s=30)
    now = datetime.now(UTC)
    ok = 200 <= code < 300
    return await claims.record_batch(
        conn,
        target,
        [
            claims.Attempt(
                c,
                now,
                7,
                code,
                None,
                None,
                "succeeded" if ok else "retrying",
                None if ok else 60.0,
                None,
                None,
            )
            for c in claimed
        ],
        breaker=None,
        failing=False,
    )


async def xmax(conn: asyncpg.Connection, table: str, row_id: str) -> str:
    """The last transaction that locked (or deleted) the row: a lock changes it."""
    return str(await conn.fetchval(f"SELECT xmax::text FROM {table} WHERE id = $1", row_id))


async def test_a_record_locks_neither_its_tenant_nor_its_target(conn: asyncpg.Connection) -> None:
    # Given a healthy target with 20 due deliveries, claimed
    tenant, target = await tenant_and_target(conn, 20)
    before = [await xmax(conn, "tenants", tenant), await xmax(conn, "targets", target)]

    # When they succeed and are recorded (the record of a healthy target: one call)
    recorded = await send_all(conn, target, 200)

    # Then all 20 moved to the sent deliveries, and neither the tenant's row nor the
    # target's was locked by it (each row of a hot tenant or target that every
    # worker's record share-locks turns into a multixact)
    assert len(recorded) == 20
    assert (
        await conn.fetchval("SELECT count(*) FROM deliveries_sent WHERE target_id = $1", target)
        == 20
    )
    after = [await xmax(conn, "tenants", tenant), await xmax(conn, "targets", target)]
    assert after == before


async def test_a_record_locks_the_same_few_relations_however_many_days_are_kept(
    conn: asyncpg.Connection,
) -> None:
    # Given 40 days of partitions (as with RELAY_RETENTION_DAYS 40) and a target whose
    # 3 due deliveries are claimed
    for days in range(1, 41):
        await make_partitions(conn, datetime.now(UTC) - timedelta(days=days))
    _, target = await tenant_and_target(conn, 3)
    _, claimed = await claims.claim_batch(conn, target, want=10, lease_s=30)
    assert len(claimed) == 3

    # When they are recorded (its locks held to the end of the transaction)
    async with conn.transaction():
        now = datetime.now(UTC)
        recorded = await claims.record_batch(
            conn,
            target,
            [
                claims.Attempt(c, now, 7, 200, None, None, "succeeded", None, None, None)
                for c in claimed
            ],
            breaker=None,
            failing=False,
        )
        locked = [
            r["name"]
            for r in await conn.fetch(
                "SELECT relation::regclass::text AS name FROM pg_locks"
                " WHERE pid = pg_backend_pid() AND relation IS NOT NULL"
            )
        ]

    # Then it opened today's partitions only, not every day's: the attempts' rollup
    # looks an attempt's target up in deliveries only for one written without it, and
    # a plan holding that look-up opened (and locked) each day's partition, run or not
    assert len(recorded) == 3
    today = f"p{datetime.now(UTC):%Y%m%d}"
    days = {m.group(1) for n in locked if (m := re.match(r"\w+_(p\d{8})", n))}
    assert days <= {today}, sorted(days)
    assert len(locked) < 60, len(locked)


async def test_deliveries_still_need_a_real_tenant_and_target(conn: asyncpg.Connection) -> None:
    tenant, target = await tenant_and_target(conn, 1)
    event = await conn.fetchval("SELECT id FROM events WHERE tenant_id = $1", tenant)
    insert = (
        "INSERT INTO deliveries (id, tenant_id, event_id, target_id, next_attempt_at)"
        " VALUES ($1, $2, $3, $4, now())"
    )
    # a delivery to a target, or of a tenant, that does not exist is refused (deliveries
    # are made pending, in deliveries_open, and move to deliveries_sent from there only)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(insert, new_id("dlv"), tenant, event, "tgt_none")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(insert, new_id("dlv"), "ten_none", event, target)


async def test_attempts_are_counted_to_their_target_old_rows_included(
    conn: asyncpg.Connection,
) -> None:
    # Given a target whose 5 deliveries were each attempted once (a 503: they stay open)
    _, target = await tenant_and_target(conn, 5)
    assert len(await send_all(conn, target, 503)) == 5
    # and an attempt as written before 0026 (no target of its own) of another target
    _, other = await tenant_and_target(conn, 1)
    delivery = await conn.fetchval("SELECT id FROM deliveries WHERE target_id = $1", other)
    await conn.execute(
        "INSERT INTO attempts (id, tenant_id, delivery_id, started_at, duration_ms, status_code)"
        " VALUES ($1, $2, $3, now(), 12, 200)",
        new_id("att"),
        await conn.fetchval("SELECT tenant_id FROM targets WHERE id = $1", other),
        delivery,
    )

    # (the rollup and its look-up keep 0018's plans: no sequential scan of deliveries)
    for function in ("rollup_attempts_inserted", "relay_delivery_target"):
        config = await conn.fetchval("SELECT proconfig FROM pg_proc WHERE proname = $1", function)
        assert "enable_seqscan=off" in config, (function, config)

    # When the deltas are folded
    await housekeeping.fold_rollups(conn)

    # Then each attempt carries its delivery's target, and the per-target figures
    # count each where it belongs
    assert await conn.fetchval(
        "SELECT array_agg(DISTINCT a.target_id) FROM attempts a"
        " JOIN deliveries d ON d.id = a.delivery_id WHERE d.target_id = $1",
        target,
    ) == [target]
    figures = {
        r["target_id"]: (r["ok"], r["failed"])
        for r in await conn.fetch(
            "SELECT target_id, sum(ok) AS ok, sum(failed) AS failed FROM target_minutes_now"
            " WHERE target_id = ANY($1) GROUP BY 1",
            [target, other],
        )
    }
    assert figures == {target: (0, 5), other: (1, 0)}


async def test_a_claims_transaction_commits_without_a_flush(
    conn: asyncpg.Connection,
) -> None:
    # Given a target with a due delivery, on a connection that commits synchronously
    _, target = await tenant_and_target(conn, 1)
    await conn.execute("SET synchronous_commit = on")

    # When a worker claims it, in the claim's transaction
    async with conn.transaction():
        _, claimed = await claims.claim_batch(conn, target, want=10, lease_s=30)
        during = await conn.fetchval("SHOW synchronous_commit")

    # Then that transaction committed asynchronously, and the connection's own
    # setting is back for what follows: the record, a synchronous commit
    assert len(claimed) == 1
    assert during == "off"
    assert await conn.fetchval("SHOW synchronous_commit") == "on"
