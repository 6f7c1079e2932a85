"""Housekeeping of the sweeper and the operators: auto-disable, retention, backlog figures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time as clock
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import asyncpg

from relay.store.db import Conn, Queries
from relay.store.key_queues import lock_keys, promote_keys
from relay.store.rows import Replayed
from relay.store.sql import CLOCKS_APART, floor_id

log = logging.getLogger(__name__)


async def stats(conn: Queries) -> dict[str, Any]:
    """Deliveries by status, the oldest due delivery's age, dead letters per tenant.

    Counts come from the counters (migration 0011); the ages read only the
    deliveries waiting, by index, never the history.
    """
    by_status = {
        r["status"]: int(r["n"])
        for r in await conn.fetch(
            "SELECT status, sum(n) AS n FROM delivery_counts_now GROUP BY status"
        )
    }
    oldest_due = await conn.fetchval(
        """
        SELECT extract(epoch FROM now() - min(next_attempt_at)) FROM deliveries
        WHERE status IN ('pending', 'retrying') AND next_attempt_at <= now()
        """
    )
    oldest_pending = await conn.fetchval(
        "SELECT extract(epoch FROM now() - min(created_at)) FROM deliveries "
        "WHERE status IN ('pending', 'retrying')"
    )
    dead = await conn.fetch(
        "SELECT tenant_id, sum(n)::bigint AS n FROM delivery_counts_now WHERE status = 'dead' "
        "GROUP BY tenant_id HAVING sum(n) > 0 ORDER BY n DESC, tenant_id LIMIT 100"
    )
    return {
        "deliveries": {
            s: by_status.get(s, 0) for s in ("pending", "retrying", "succeeded", "dead")
        },
        "oldest_due_age_s": float(oldest_due) if oldest_due is not None else None,
        "oldest_pending_age_s": float(oldest_pending) if oldest_pending is not None else None,
        "dead_letters_by_tenant": [{"tenant_id": r["tenant_id"], "count": r["n"]} for r in dead],
    }


async def fold_rollups(conn: Queries) -> int:
    """Move the figures' deltas into their keyed rows (one folder at a time); how many rows.

    The triggers of migration 0011 append a delta per statement; folding them
    keeps what a figure reads bounded by the keys and minutes it shows.
    """
    moved: int = await conn.fetchval("SELECT fold_rollups()")
    return moved


#: Where the triggers append, emptied by every fold.
_DELTA_TABLES = (
    "delivery_count_deltas",
    "tenant_minute_deltas",
    "target_minute_deltas",
    "target_latency_minute_deltas",
)


#: A deltas' table larger than this has its empty tail given back to the system.
DELTA_TRUNCATE_BYTES = 8 << 20


async def vacuum_rollup_deltas(conn: Queries) -> None:
    """Vacuum the deltas' tables: each fold empties them, and readers scan them whole, so
    their dead rows are reclaimed every few seconds rather than at autovacuum's pace.

    Outside a transaction (VACUUM cannot run in one); a table another holds is skipped.
    The space freed is kept for the next deltas (``TRUNCATE false``): giving a table's
    empty tail back needs its exclusive lock, which every ingest and record writing a
    delta holds off, and VACUUM tries for it 5 s per table: under load, every
    housekeeping held the sweeper (its wake-ups, its folds) up to 20 s. Only a table
    grown past ``DELTA_TRUNCATE_BYTES`` (a burst, a sweeper that was down) is truncated,
    at that cost, once.
    """
    grown = {
        r["relname"]
        for r in await conn.fetch(
            "SELECT relname FROM pg_class WHERE relname = ANY($1::text[])"
            " AND relkind = 'r' AND pg_relation_size(oid) > $2",
            list(_DELTA_TABLES),
            DELTA_TRUNCATE_BYTES,
        )
    }
    kept = [t for t in _DELTA_TABLES if t not in grown]
    if kept:
        await conn.execute(f"VACUUM (SKIP_LOCKED, TRUNCATE false) {', '.join(kept)}")
    if grown:
        await conn.execute(f"VACUUM (SKIP_LOCKED) {', '.join(sorted(grown))}")


#: The tables every delivery churns: its row leaves the open partition when it ends (a
#: cross-partition move), its lease row comes and goes, each claim renews its drainer's
#: share of the cap. Their dead rows are vacuumed by the sweeper past CHURN_DEAD_ROWS.
_CHURNED_TABLES = ("deliveries_open", "delivery_leases", "drain_shares")
#: Dead rows (as pg_stat_user_tables counts them) past which a churned table is vacuumed.
CHURN_DEAD_ROWS = 1000


async def vacuum_churned(conn: Queries) -> list[str]:
    """Vacuum the tables every delivery churns, those with CHURN_DEAD_ROWS dead rows or
    more; which.

    The open partition keeps every dead letter until retention, so autovacuum's default
    trigger (a fifth of the table dead) waited for more dead rows the longer the history,
    and where autovacuum is off, for ever. Meanwhile the readers of what is due (the
    stats, the console's overview and the claims) stepped over each delivery sent since
    the last vacuum: on a history of 2 M events, after a drain of 20,000, GET
    /v1/admin/stats took 1.93 ms against 0.57 ms once these were vacuumed, the console's
    overview 5.45 against 3.98 ms (bench/history.py --keep, autovacuum off). Outside a
    transaction, skipping a table another vacuum holds, never truncating (that lock
    waits for every claim and record).
    """
    churned = [
        r["relname"]
        for r in await conn.fetch(
            "SELECT relname FROM pg_stat_user_tables"
            " WHERE relname = ANY($1::text[]) AND n_dead_tup >= $2 ORDER BY relname",
            list(_CHURNED_TABLES),
            CHURN_DEAD_ROWS,
        )
    ]
    if churned:
        await conn.execute(f"VACUUM (SKIP_LOCKED, TRUNCATE false) {', '.join(churned)}")
    return churned


#: The per-minute and per-hour figures and their time column, partitioned by UTC day
#: (migration 0028) and trimmed by ``purge_old_rollups``.
FIGURES = (
    ("tenant_minutes", "minute"),
    ("target_minutes", "minute"),
    ("target_latency_minutes", "minute"),
    ("tenant_hours", "hour"),
)


@contextlib.asynccontextmanager
async def _managing(conn: Conn, lock_timeout: str) -> AsyncIterator[None]:
    """A transaction of the partition manager: one at a time (``PARTITION_LOCK``), and
    never waiting longer than ``lock_timeout`` for a table's lock (LockNotAvailableError:
    nothing done)."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
        yield


async def _existing(conn: Conn, names: list[str]) -> list[str]:
    """Which of the tables ``names`` are there (another sweeper may have dropped some
    since they were listed; pg_class read anew: to_regclass may answer from a cache not
    yet told)."""
    rows = await conn.fetch(
        "SELECT relname FROM pg_class WHERE relname = ANY($1::text[])"
        " AND relnamespace = current_schema()::regnamespace",
        names,
    )
    return [r["relname"] for r in rows]


async def purge_old_rollups(conn: Conn, retention_days: int, batch: int = 10000) -> int:
    """Drop the days of per-minute and per-hour figures past the retention, whole, then
    delete up to ``batch`` of the figures (of each kind) past it in the DEFAULT
    partitions; the rows deleted.

    A day goes once all of it is past the retention (as the history's days). Only
    the folder writes these tables and the console reads them, never the hot path:
    a table whose lock is not free within ``LOCK_TIMEOUT`` keeps its days until the
    next call.
    """
    by_parent: dict[str, list[str]] = {}
    for row in await conn.fetch(_EXPIRED, [t for t, _ in FIGURES], retention_days):
        by_parent.setdefault(row["parent"], []).append(row["name"])
    expired = [
        (parent, names[first : first + DROP_DAYS_AT_ONCE])
        for parent, names in by_parent.items()
        for first in range(0, len(names), DROP_DAYS_AT_ONCE)
    ]
    for parent, some in expired:
        try:
            async with _managing(conn, LOCK_TIMEOUT):
                parts = await _existing(conn, some)
                if parts:
                    await conn.execute(f"DROP TABLE {', '.join(parts)}")
            if parts:
                log.info("retention: dropped %s", ", ".join(parts))
        except asyncpg.LockNotAvailableError:
            log.warning("retention: %s's old days stay until the next pass (busy)", parent)
    total = 0
    for table, column in FIGURES:
        deleted: int = await conn.fetchval(
            f"""
            WITH gone AS (
                DELETE FROM {table}_default WHERE ctid IN (
                    SELECT ctid FROM {table}_default
                    WHERE {column} < now() - make_interval(days => $1) LIMIT $2
                ) RETURNING 1
            ) SELECT count(*) FROM gone
            """,
            retention_days,
            batch,
        )
        total += deleted
    return total


#: The open deliveries are analyzed again once this many times more of them are due or
#: retrying than their statistics say, and at least ``STALE_MIN_ROWS``.
STALE_FACTOR = 4
STALE_MIN_ROWS = 1000


async def refresh_open_statistics(conn: Queries) -> bool:
    """ANALYZE the open deliveries when far more of them wait to be sent than their
    statistics say; True if it did.

    A worker's record finds its batch's rows by id among the open deliveries still to
    send (``status IN ('pending', 'retrying')``); when the statistics say there are
    none, its plan reads the partition whole, which costs nothing when it holds
    nothing, for every batch: a backlog of 20,000 to one target drained at 430
    deliveries/s (`bench/history.py`), each record of 10 taking 50 ms. The statistics
    say so when autovacuum analyzed the partition after a burst was sent (every row
    there a dead tuple), or while it held only dead letters (what a database with
    history holds there), and they stay so until its next analyze, a minute or more
    away, or never while the rows it counts do not change by a tenth. How many wait
    is known exactly, from the counters (migration 0011); an ANALYZE takes no lock
    that a write waits for, and the plans made after it read by key.
    """
    row = await conn.fetchrow(
        """
        SELECT c.reltuples,
               (SELECT coalesce(sum(m.f), 0) FROM pg_stats s,
                       unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS m(v, f)
                WHERE s.schemaname = n.nspname AND s.tablename = c.relname
                  AND s.attname = 'status' AND m.v IN ('pending', 'retrying')) AS share,
               (SELECT coalesce(sum(k.n), 0) FROM delivery_counts_now k
                WHERE k.status IN ('pending', 'retrying')) AS waiting
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = 'deliveries_open'::regclass
        """
    )
    if row is None or row["reltuples"] < 0:  # never analyzed: planned as a table of some size
        return False
    known = float(row["reltuples"]) * float(row["share"])
    if row["waiting"] < max(STALE_MIN_ROWS, STALE_FACTOR * known):
        return False
    await conn.execute("ANALYZE deliveries_open")
    return True


async def disable_failing_targets(conn: Queries, failing_for_s: float) -> list[str]:
    """Disable targets whose every attempt has failed for ``failing_for_s``; return their ids.

    Each one disabled is told to its tenant's operational targets (Target disabled).
    """
    rows = await conn.fetch(
        """
        WITH off AS (
            UPDATE targets
            SET enabled = false, updated_at = now(),
                disabled_reason = 'every attempt failed since ' ||
                    to_char(failing_since AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
            WHERE enabled AND deleted_at IS NULL AND failing_since IS NOT NULL
              AND failing_since < now() - make_interval(secs => $1)
            RETURNING id, tenant_id, url, kind, disabled_reason
        )
        -- Target disabled, in the same statement (none about an operational target)
        SELECT id, CASE WHEN kind = 'events' THEN emit_operational(
            tenant_id, 'Target', 'disabled', id,
            jsonb_build_object('url', url, 'reason', disabled_reason)
        ) END AS told
        FROM off
        """,
        failing_for_s,
    )
    return [r["id"] for r in rows]


async def purge_lapsed_leases(conn: Queries, *, older_than_s: float = 60.0) -> int:
    """Remove the lease rows of leases that lapsed ``older_than_s`` ago; how many.

    A lease is given back by its record (or release) in the statement that ends
    it. One whose worker died lapses: the claims' count ignores it at once, and
    its row goes when its delivery is claimed again; this removes the rest (a
    delivery that died, was replayed or deleted meanwhile), and the cap shares
    (drain_shares) of drainers whose process died.
    """
    removed: int = await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM delivery_leases
            WHERE delivery_id IN (
                -- passing over a row a claim is taking back (no lock-order deadlock)
                SELECT delivery_id FROM delivery_leases
                WHERE locked_until < now() - make_interval(secs => $1::float8)
                FOR UPDATE SKIP LOCKED
            )
            RETURNING 1
        ), shares_gone AS (
            -- the cap shares left by drainers whose process died (migration 0015)
            DELETE FROM drain_shares WHERE until < now() - make_interval(secs => $1::float8)
        ) SELECT count(*) FROM gone
        """,
        older_than_s,
    )
    return removed


#: The history partitioned by id, one partition per UTC day: (table, id prefix).
#: deliveries_sent holds the succeeded deliveries; what is still to be sent, and dead
#: letters, are in deliveries_open (migration 0012).
HISTORY = (("events", "evt"), ("deliveries_sent", "dlv"), ("attempts", "att"))
#: The advisory lock of the partition manager: one at a time (sweepers, `relay migrate`).
PARTITION_LOCK = 0x70617274  # "part"
#: Days of partitions made ahead of today.
DAYS_AHEAD = 3
#: How long dropping a partition waits for its table's lock before it tries again
#: later: never long, so the ingest and the engine never queue behind it for long.
LOCK_TIMEOUT = "200ms"
#: At most this many days of a table are dropped in one transaction (its lock held
#: for them all: a relay that kept its history past the retention catches up in steps).
DROP_DAYS_AT_ONCE = 16
#: The name a day's partition takes once retention detached it, until it is dropped.
DETACHED = "relay_detached_"
#: The tables whose days are detached with the table held, then dropped once it is
#: free: a DROP's commit removes the days' files (~25 ms for ten days of one table,
#: 250 ms for ten days of the 2 M-event history's events, several times that on a
#: busy host), and every ingest and record waits for its table meanwhile. A detached
#: partition keeps its parent's foreign keys as its own (events': to tenants and
#: sources), and dropping a table with keys locks the tables they reference for
#: every reader until its commit: the keys are dropped first, in a transaction of
#: their own (catalog changes only), then the tables.
_DETACHED_FIRST = frozenset({"attempts", "deliveries_sent", "events"})
#: How long the drop of a detached day's keys waits for the tables they reference
#: (which every ingest reads, and queues behind it while it waits): a busy moment
#: leaves the day to the next pass.
KEYS_LOCK_TIMEOUT = "50ms"
#: The tables the keys of the detached days reference, in the order the ingest locks
#: them (tests/integration/test_retention.py holds the keys to them).
_KEYS_REFERENCE = ("tenants", "sources")
#: How many times a drop whose lock timed out is tried again in one pass.
LOCK_TRIES = 5

# (a table without an id prefix is a table of figures, partitioned by its time: 0028)
_ENSURE = """
SELECT h.parent || '_p' || to_char(d, 'YYYYMMDD') AS name
FROM unnest($1::text[], $2::text[]) AS h(parent, prefix)
CROSS JOIN generate_series((now() AT TIME ZONE 'UTC')::date,
                           (now() AT TIME ZONE 'UTC')::date + $3::int, interval '1 day') AS d
WHERE CASE WHEN h.prefix IS NULL THEN relay_ensure_figures_partition(h.parent, d::date)
           ELSE relay_ensure_partition(h.parent, h.prefix, d::date) END
"""

# The daily partitions of ``$1``'s tables whose whole day is past the retention, oldest
# first: the history's (dropped a day at a time, all tables) and the figures'.
_EXPIRED = """
SELECT p.relname AS parent, c.relname AS name, to_date(right(c.relname, 8), 'YYYYMMDD') AS day
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_class p ON p.oid = i.inhparent
WHERE p.relname = ANY($1::text[]) AND c.relname ~ '_p[0-9]{8}$'
  AND (to_date(right(c.relname, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
      <= now() - make_interval(days => $2)
ORDER BY day, parent
"""

# What of a partition about to be dropped is kept (moved to the DEFAULT partition):
# events with a delivery still to be sent or a dead letter (their dead letters, of
# an event past retention, went first), and attempts of deliveries still to be sent.
# Each reads the few rows of deliveries_open, then the partition's index for them,
# never the partition's whole (as an IN (subquery) was planned: a hashed semi-join
# over the day's rows, ~30 ms for ten days of 18,000 attempts, the parent held).
_KEPT = {
    "events": """
        SELECT * FROM {part} WHERE id = ANY (ARRAY(
            SELECT event_id FROM deliveries_open WHERE event_id >= '{lo}' AND event_id < '{hi}'
        ))""",
    # (a day's attempts are of deliveries made by its end: the older open ones only)
    "attempts": """
        SELECT * FROM {part} WHERE delivery_id = ANY (ARRAY(
            SELECT id FROM deliveries_open
            WHERE status IN ('pending', 'retrying') AND id < '{delivery_hi}'
        ))""",
    "deliveries_sent": "SELECT * FROM {part} WHERE false",
}

# The tables whose rows the counters of deliveries by status count, and the statement
# that takes a partition's rows out of them before it is dropped (the rows kept and
# inserted again are counted again by the insert's trigger). It reads the day's rows
# (172 M sent deliveries a day at 1,000 events/s to two targets), so it runs under a
# SHARE lock of that partition alone, before its parent, which every claim and record
# writes, is locked for the drop.
_COUNTED = frozenset({"deliveries_sent"})
_UNCOUNT = """
WITH told AS (
    INSERT INTO delivery_count_deltas (tenant_id, target_id, status, n)
    SELECT tenant_id, target_id, status, -count(*) FROM {part} GROUP BY 1, 2, 3
    RETURNING n
)
SELECT coalesce(-sum(n), 0)::bigint FROM told
"""

# Dead letters of events past retention: their keys go on (on_dead "block").
_OLD_DEAD = """
SELECT d.id, d.target_id, d.order_key FROM deliveries d
WHERE d.status = 'dead' AND d.event_id < relay_ulid_floor('evt', now() - make_interval(days => $1))
LIMIT $2
"""

# The DEFAULT partitions' rows past retention: what was kept and has finished since
# (and anything made before the partitions of its day). Few rows: deleted one by one.
_PURGE_DEFAULTS = """
WITH cut AS MATERIALIZED (
    SELECT now() - make_interval(days => $1) AS at
), events_gone AS (
    DELETE FROM events_default e WHERE e.ctid IN (
        SELECT x.ctid FROM events_default x
        WHERE x.id < relay_ulid_floor('evt', (SELECT at FROM cut))
          AND NOT EXISTS (SELECT 1 FROM deliveries_open d WHERE d.event_id = x.id)
        LIMIT $2
    ) RETURNING 1
), sent_gone AS (
    DELETE FROM deliveries_sent_default s WHERE s.ctid IN (
        SELECT x.ctid FROM deliveries_sent_default x
        WHERE x.id < relay_ulid_floor('dlv', (SELECT at FROM cut)) LIMIT $2
    ) RETURNING s.tenant_id, s.target_id, s.status
), sent_uncounted AS (
    -- a DELETE from a partition fires no trigger of its parent's (the counters of
    -- deliveries by status, migration 0011): they are told here
    INSERT INTO delivery_count_deltas (tenant_id, target_id, status, n)
    SELECT tenant_id, target_id, status, -count(*) FROM sent_gone GROUP BY 1, 2, 3
), attempts_gone AS (
    DELETE FROM attempts_default a WHERE a.ctid IN (
        SELECT x.ctid FROM attempts_default x
        WHERE x.id < relay_ulid_floor('att', (SELECT at FROM cut))
          AND NOT EXISTS (
              SELECT 1 FROM deliveries_open d
              WHERE d.id = x.delivery_id AND d.status IN ('pending', 'retrying')
          )
        LIMIT $2
    ) RETURNING 1
)
SELECT (SELECT count(*) FROM events_gone) AS events,
       (SELECT count(*) FROM sent_gone) + (SELECT count(*) FROM attempts_gone) AS others
"""


async def ensure_partitions(conn: Conn, *, days_ahead: int = DAYS_AHEAD) -> list[str]:
    """Make the partitions of the history and of the figures of today and ``days_ahead``
    days ahead; the names made.

    Safe from any number of processes at once (``PARTITION_LOCK``). An insert never
    fails for want of a partition: the DEFAULT partitions catch what has none, and
    making a day's partition moves its rows there.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
        tables = [*HISTORY, *((t, None) for t, _ in FIGURES)]
        rows = await conn.fetch(_ENSURE, [t for t, _ in tables], [p for _, p in tables], days_ahead)
    return [r["name"] for r in rows]


def _start(day: date) -> datetime:
    """The first instant of the UTC ``day``."""
    return datetime.combine(day, time(), UTC)


async def _drop_partitions(conn: Conn, parent: str, prefix: str, days: list[date]) -> int | None:
    """Drop ``parent``'s partitions of ``days`` in one transaction, keeping what ``_KEPT``
    says; rows dropped.

    One lock of the parent and one change of its partitions for all the days: each
    change makes every connection's plans of the parent's statements be made again
    (the claim's, the record's, the ingest's), and each lock queues them; ten days
    dropped one at a time did both ten times while the relay ran. None: a lock was
    not free within ``LOCK_TIMEOUT`` (nothing done: try again).
    """
    parts = {f"{parent}_p{day:%Y%m%d}": day for day in days}
    # counted before the lock (rows rarely move into an old day: a late success); a
    # counted table's rows are counted as they are counted out, below (one read)
    counted = parent in _COUNTED
    total = 0
    for part in list(parts):
        if counted:
            continue
        try:
            total += await conn.fetchval(f"SELECT count(*) FROM {part}")
        except asyncpg.UndefinedTableError:
            del parts[part]  # another sweeper dropped it
    if not parts:
        return 0
    detach = parent in _DETACHED_FIRST
    try:
        async with _managing(conn, LOCK_TIMEOUT):
            there = set(await _existing(conn, list(parts)))
            parts = {part: day for part, day in parts.items() if part in there}
            if not parts:
                return 0  # another sweeper dropped them
            if counted:
                # a DROP fires no trigger: the counters of deliveries by status
                # (migration 0011) are told, in the same transaction, what goes; no
                # writer changes the day's rows from here until the drop commits (a
                # late success into it waits; one that holds the parent meanwhile
                # makes the parent's lock below time out, or is the one a deadlock
                # aborts: a record is made again)
                for part in parts:
                    await conn.execute(f"LOCK TABLE {part} IN SHARE MODE")
                    total += await conn.fetchval(_UNCOUNT.format(part=part))
            # the parent's lock before the rest (DROP takes it): no reader holds the
            # parent while waiting for the partition behind us; a busy parent is
            # asked again, not the days' rows read again
            for attempt in range(LOCK_TRIES):
                try:
                    async with conn.transaction():
                        await conn.execute(f"LOCK TABLE {parent} IN ACCESS EXCLUSIVE MODE")
                    break
                except asyncpg.LockNotAvailableError:
                    if attempt == LOCK_TRIES - 1:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))
            locked = clock.perf_counter()
            kept_rows = " UNION ALL ".join(
                _KEPT[parent].format(
                    part=part,
                    lo=floor_id(prefix, _start(day)),
                    hi=floor_id(prefix, _start(day + timedelta(days=1))),
                    delivery_hi=floor_id("dlv", _start(day + timedelta(days=1)) + CLOCKS_APART),
                )
                for part, day in parts.items()
            )
            await conn.execute(f"CREATE TEMP TABLE relay_kept ON COMMIT DROP AS {kept_rows}")
            if detach:
                for part in parts:
                    await conn.execute(f"ALTER TABLE {parent} DETACH PARTITION {part}")
                    await conn.execute(f"ALTER TABLE {part} RENAME TO {DETACHED}{part}")
            else:
                await conn.execute(f"DROP TABLE {', '.join(parts)}")
            kept: int = await conn.fetchval(
                f"WITH moved AS (INSERT INTO {parent} SELECT * FROM relay_kept RETURNING 1) "
                "SELECT count(*) FROM moved"
            )
    except (asyncpg.LockNotAvailableError, asyncpg.DuplicateTableError):
        return None  # (a name taken: what an earlier pass set aside is not dropped yet)
    held_ms = (clock.perf_counter() - locked) * 1000
    if detach:
        await _drop_detached(conn)
    log.info(
        "retention: dropped %s (%d rows, %d kept) holding %s for %.0f ms",
        ", ".join(parts),
        total - kept,
        kept,
        parent,
        held_ms,
    )
    return total - kept


async def _drop_detached(conn: Conn) -> None:
    """Drop the partitions retention detached (and any a pass that stopped between its
    detach and its drop left): their foreign keys first, then the tables, so that the
    removal of their files locks no other table (_DETACHED_FIRST). A table still in
    use, or a referenced table busy, leaves them to the next pass."""
    try:
        async with _managing(conn, KEYS_LOCK_TIMEOUT):
            keys = await conn.fetch(
                "SELECT format('ALTER TABLE %I DROP CONSTRAINT %I', c.relname, k.conname) AS s"
                " FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid"
                " WHERE k.contype = 'f' AND starts_with(c.relname, $1)"
                " AND c.relnamespace = current_schema()::regnamespace ORDER BY 1",
                DETACHED,
            )
            if keys:
                # dropping a key locks the table it references: both at once, in the
                # order an ingest takes them (it reads the tenant, then its insert checks
                # the keys), or each drop deadlocks with the ingests under way
                await conn.execute(
                    f"LOCK TABLE {', '.join(_KEYS_REFERENCE)} IN ACCESS EXCLUSIVE MODE"
                )
            for row in keys:
                await conn.execute(row["s"])
        async with _managing(conn, LOCK_TIMEOUT):
            names = await conn.fetch(
                "SELECT format('%I', relname) AS name FROM pg_class"
                " WHERE relkind = 'r' AND starts_with(relname, $1)"
                " AND relnamespace = current_schema()::regnamespace"
                " AND NOT EXISTS (SELECT 1 FROM pg_constraint k"
                "                 WHERE k.conrelid = pg_class.oid AND k.contype = 'f')",
                DETACHED,
            )
            if names:
                await conn.execute(f"DROP TABLE {', '.join(r['name'] for r in names)}")
    except asyncpg.LockNotAvailableError:
        log.warning("retention: detached partitions stay until the next pass (in use)")


async def drop_expired_partitions(conn: Conn, retention_days: int) -> dict[str, int]:
    """Drop every day of the history entirely past the retention; rows dropped per table.

    The days' attempts go first, then their sent deliveries, then their events, each
    table's days (up to DROP_DAYS_AT_ONCE) in one short transaction: what is still to
    be sent (a delivery in deliveries_open, its event, its attempts) moves to the
    DEFAULT partition.
    """
    dropped = {parent: 0 for parent, _ in HISTORY}
    await _drop_detached(conn)
    rows = await conn.fetch(_EXPIRED, [t for t, _ in HISTORY], retention_days)
    days = sorted({r["day"] for r in rows})
    if not days:
        return dropped
    for first in range(0, len(days), DROP_DAYS_AT_ONCE):
        some = days[first : first + DROP_DAYS_AT_ONCE]
        for parent, prefix in (HISTORY[2], HISTORY[1], HISTORY[0]):
            for attempt in range(LOCK_TRIES):
                n = await _drop_partitions(conn, parent, prefix, some)
                if n is not None:
                    dropped[parent] += n
                    break
                await asyncio.sleep(0.05 * (attempt + 1))
            else:
                log.warning(
                    "retention: %s of %s..%s stays until the next pass (busy)",
                    parent,
                    some[0],
                    some[-1],
                )
                return dropped
    return dropped


async def purge_old_events(
    conn: Conn, retention_days: int, batch: int = 1000, *, grace_s: float = 30.0
) -> tuple[int, list[Replayed]]:
    """Retention: remove the history past ``retention_days``; the sweeper's one entry point.

    Makes the partitions of the days ahead, then removes dead letters of events
    past the retention (a key that waited behind one, ``on_dead: "block"``, goes
    on: its next delivery becomes due and is returned to be woken; ``grace_s``:
    how long the sweeper leaves it to that wake-up), then drops every day of
    events, sent deliveries and attempts entirely past the retention, whole
    partitions at a time; what is still to be sent (a pending or retrying
    delivery, its event and attempts) is kept until it finishes. The few rows
    kept that way are deleted ``batch`` at a time once past retention and
    finished. The record of when deliveries died (the console's chart) goes
    with the same retention. Returns how many events were removed, and the
    deliveries made due. Everything past the retention is removed by one call.
    """
    await ensure_partitions(conn)
    while True:
        gone = await conn.execute(
            """
            DELETE FROM delivery_deaths WHERE ctid IN (
                SELECT ctid FROM delivery_deaths
                WHERE died_at < now() - make_interval(days => $1) LIMIT $2
            )
            """,
            retention_days,
            batch,
        )
        if int(gone.split()[-1]) < batch:
            break
    removed = 0
    promoted: list[Replayed] = []
    while True:
        async with conn.transaction():
            picked = await conn.fetch(_OLD_DEAD, retention_days, batch)
            if not picked:
                break
            keys = sorted({(r["target_id"], r["order_key"]) for r in picked if r["order_key"]})
            await lock_keys(conn, keys)
            await conn.execute(
                "DELETE FROM deliveries d WHERE d.id = ANY($1::text[]) AND d.status = 'dead'",
                [r["id"] for r in picked],
            )
            promoted += await promote_keys(conn, keys, grace_s=grace_s)
        if len(picked) < batch:
            break
    dropped = await drop_expired_partitions(conn, retention_days)
    removed += dropped["events"]
    while True:
        row = await conn.fetchrow(_PURGE_DEFAULTS, retention_days, batch)
        assert row is not None
        removed += row["events"]
        if row["events"] < batch and row["others"] < batch:
            break
    return removed, promoted


async def backlog(conn: Queries) -> tuple[int, int, int]:
    """(due but unsent, dead) deliveries and targets whose breaker is not closed.

    The due ones are read by their index (as many as are due); the dead are counted.
    """
    row = await conn.fetchrow(
        """
        SELECT
          (SELECT count(*) FROM deliveries WHERE status IN ('pending', 'retrying')
             AND next_attempt_at <= now()) AS due,
          (SELECT coalesce(sum(n), 0) FROM delivery_counts_now WHERE status = 'dead') AS dead,
          (SELECT count(*) FROM target_health WHERE breaker <> 'closed') AS open_breakers
        """
    )
    assert row is not None  # one row of counts, always
    return int(row["due"]), int(row["dead"]), int(row["open_breakers"])
