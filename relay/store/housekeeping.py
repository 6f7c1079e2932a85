"""Housekeeping of the sweeper and the operators: auto-disable, retention, backlog figures."""

from __future__ import annotations

from typing import Any

from relay.store.db import Conn, Queries
from relay.store.key_queues import lock_keys, promote_keys
from relay.store.rows import Replayed


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


async def vacuum_rollup_deltas(conn: Queries) -> None:
    """Vacuum the deltas' tables: each fold empties them, and readers scan them whole, so
    their dead rows are reclaimed every few seconds rather than at autovacuum's pace.

    Outside a transaction (VACUUM cannot run in one); a table another holds is skipped.
    """
    await conn.execute(f"VACUUM (SKIP_LOCKED) {', '.join(_DELTA_TABLES)}")


#: The per-minute figures, trimmed by ``purge_old_rollups``.
_MINUTE_TABLES = ("tenant_minutes", "target_minutes", "target_latency_minutes")


async def purge_old_rollups(conn: Queries, retention_days: int, batch: int = 10000) -> int:
    """Delete up to ``batch`` per-minute figures (of each kind) older than the retention."""
    total = 0
    for table in _MINUTE_TABLES:
        deleted: int = await conn.fetchval(
            f"""
            WITH gone AS (
                DELETE FROM {table} WHERE ctid IN (
                    SELECT ctid FROM {table}
                    WHERE minute < now() - make_interval(days => $1) LIMIT $2
                ) RETURNING 1
            ) SELECT count(*) FROM gone
            """,
            retention_days,
            batch,
        )
        total += deleted
    return total


async def disable_failing_targets(conn: Queries, failing_for_s: float) -> list[str]:
    """Disable targets whose every attempt has failed for ``failing_for_s``; return their ids."""
    rows = await conn.fetch(
        """
        UPDATE targets
        SET enabled = false, updated_at = now(),
            disabled_reason = 'every attempt failed since ' ||
                to_char(failing_since AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
        WHERE enabled AND deleted_at IS NULL AND failing_since IS NOT NULL
          AND failing_since < now() - make_interval(secs => $1)
        RETURNING id
        """,
        failing_for_s,
    )
    return [r["id"] for r in rows]


async def purge_old_events(
    conn: Conn, retention_days: int, batch: int = 1000, *, grace_s: float = 30.0
) -> tuple[int, list[Replayed]]:
    """Delete up to ``batch`` events older than the retention (deliveries and attempts cascade).

    An event with a delivery still to be sent (pending or retrying, e.g. behind a
    target disabled for longer than the retention) is kept until it finishes.
    A key that waited behind a dead letter deleted here (``on_dead: "block"``)
    goes on: its next delivery becomes due, and is returned to be woken
    (``grace_s``: how long the sweeper leaves it to that wake-up). The keys'
    locks are taken before the rows (``key_queues``' lock order).
    Returns how many events were deleted and the deliveries made due. The
    record of when deliveries died (the console's chart) goes with the same
    retention.
    """
    await conn.execute(
        """
        DELETE FROM delivery_deaths WHERE ctid IN (
            SELECT ctid FROM delivery_deaths
            WHERE died_at < now() - make_interval(days => $1) LIMIT $2
        )
        """,
        retention_days,
        batch,
    )
    async with conn.transaction():
        picked = await conn.fetch(
            """
            WITH old AS (
                SELECT e.id FROM events e
                WHERE e.received_at < now() - make_interval(days => $1)
                  AND NOT EXISTS (
                      SELECT 1 FROM deliveries d
                      WHERE d.event_id = e.id AND d.status IN ('pending', 'retrying')
                  )
                LIMIT $2
            )
            SELECT old.id, k.target_id, k.order_key FROM old
            LEFT JOIN LATERAL (
                SELECT d.target_id, d.order_key FROM deliveries d
                WHERE d.event_id = old.id AND d.status = 'dead' AND d.order_key IS NOT NULL
            ) k ON true
            """,
            retention_days,
            batch,
        )
        if not picked:
            return 0, []
        keys = sorted({(r["target_id"], r["order_key"]) for r in picked if r["order_key"]})
        await lock_keys(conn, keys)
        deleted: int = await conn.fetchval(
            """
            WITH gone AS (
                DELETE FROM events e
                WHERE e.id = ANY($1::text[])
                  AND NOT EXISTS (
                      SELECT 1 FROM deliveries d
                      WHERE d.event_id = e.id AND d.status IN ('pending', 'retrying')
                  )
                RETURNING 1
            ) SELECT count(*) FROM gone
            """,
            list({r["id"] for r in picked}),
        )
        promoted = await promote_keys(conn, keys, grace_s=grace_s)
    return deleted, promoted


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
