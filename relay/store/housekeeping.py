"""Housekeeping of the sweeper and the operators: auto-disable, retention, backlog figures."""

from __future__ import annotations

from typing import Any

from relay.store.db import Conn, Queries
from relay.store.key_queues import lock_keys, promote_keys
from relay.store.rows import Replayed


async def stats(conn: Queries) -> dict[str, Any]:
    """Deliveries by status, the oldest due delivery's age, dead letters per tenant."""
    by_status = {
        r["status"]: r["n"]
        for r in await conn.fetch("SELECT status, count(*) AS n FROM deliveries GROUP BY status")
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
        "SELECT tenant_id, count(*) AS n FROM deliveries WHERE status = 'dead' "
        "GROUP BY tenant_id ORDER BY n DESC LIMIT 100"
    )
    return {
        "deliveries": {
            s: by_status.get(s, 0) for s in ("pending", "retrying", "succeeded", "dead")
        },
        "oldest_due_age_s": float(oldest_due) if oldest_due is not None else None,
        "oldest_pending_age_s": float(oldest_pending) if oldest_pending is not None else None,
        "dead_letters_by_tenant": [{"tenant_id": r["tenant_id"], "count": r["n"]} for r in dead],
    }


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
    """(due but unsent, dead) deliveries and targets whose breaker is not closed."""
    row = await conn.fetchrow(
        """
        SELECT
          (SELECT count(*) FROM deliveries WHERE status IN ('pending', 'retrying')
             AND next_attempt_at <= now()) AS due,
          (SELECT count(*) FROM deliveries WHERE status = 'dead') AS dead,
          (SELECT count(*) FROM target_health WHERE breaker <> 'closed') AS open_breakers
        """
    )
    assert row is not None  # one row of counts, always
    return int(row["due"]), int(row["dead"]), int(row["open_breakers"])
