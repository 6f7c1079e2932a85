"""Deliveries: claiming, recording attempts, and what the sweeper finds due."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from relay.crypto import new_id
from relay.store.db import Conn
from relay.store.rows import keyset_page

# One statement claims the delivery (a lease) and reads what sending needs. A
# duplicated broker message finds the lease held, or the delivery finished,
# and claims nothing.
_CLAIM = """
WITH claimed AS (
    UPDATE deliveries
    SET locked_until = now() + make_interval(secs => $2), updated_at = now()
    WHERE id = $1
      AND status IN ('pending', 'retrying')
      AND next_attempt_at <= now()
      AND (locked_until IS NULL OR locked_until < now())
    RETURNING id, tenant_id, event_id, target_id, attempt_count, locked_until
)
SELECT c.id, c.tenant_id, c.event_id, c.target_id, c.attempt_count, c.locked_until,
       e.payload,
       t.url, t.headers_enc, t.rate_limit, t.enabled, t.deleted_at, t.secret_enc,
       t.previous_secret_enc, t.secret_rotated_at
FROM claimed c
JOIN events e ON e.id = c.event_id
JOIN targets t ON t.id = c.target_id
"""


async def claim(conn: Conn, delivery_id: str, lease_s: float) -> Any:
    """Claim a due delivery for ``lease_s`` seconds; None if it is not ours to send."""
    return await conn.fetchrow(_CLAIM, delivery_id, lease_s)


async def release(
    conn: Conn, delivery_id: str, lease: datetime, *, delay_s: float, grace_s: float | None
) -> None:
    """Give a claim back without spending an attempt (rate limit, disabled target).

    ``grace_s``: a message is enqueued with ``delay_s``; the sweeper leaves the
    delivery to it until ``grace_s`` after that. None: no message, the sweeper's.
    """
    await conn.execute(
        """
        UPDATE deliveries
        SET locked_until = NULL,
            next_attempt_at = greatest(next_attempt_at, now() + make_interval(secs => $3)),
            enqueued_until = now() + make_interval(secs => $3 + $4::float8),
            updated_at = now()
        WHERE id = $1 AND locked_until = $2
        """,
        delivery_id,
        lease,
        delay_s,
        grace_s,
    )


async def record_attempt(
    conn: Conn,
    delivery: Any,
    *,
    started_at: datetime,
    duration_ms: int,
    status_code: int | None,
    error: str | None,
    response_body: str | None,
    status: str,
    delay_s: float | None,
    enqueued_for_s: float | None,
    disable_reason: str | None,
) -> bool:
    """Record one attempt and the delivery's new state atomically; False if the lease was lost.

    Lock order, here as everywhere: a target before its deliveries (``delete_target``
    and PATCH lock the target first). So the target row is locked first, and only
    when its failing state changes; a target that keeps failing is not written again.
    """
    failed = status != "succeeded"
    failing = await conn.fetchval(
        "SELECT failing_since IS NOT NULL FROM targets WHERE id = $1", delivery["target_id"]
    )
    touch_target = (failing and not failed) or (failed and (not failing or disable_reason))
    async with conn.transaction():
        if touch_target:
            await conn.execute(
                "SELECT 1 FROM targets WHERE id = $1 FOR NO KEY UPDATE", delivery["target_id"]
            )
        updated = await conn.fetchval(
            """
            UPDATE deliveries
            SET status = $3, attempt_count = attempt_count + 1,
                next_attempt_at = now() + make_interval(secs => $4::float8),
                enqueued_until = now() + make_interval(secs => $5::float8),
                locked_until = NULL, last_status_code = $6,
                last_error = $7, updated_at = now()
            WHERE id = $1 AND locked_until = $2 AND status IN ('pending', 'retrying')
            RETURNING id
            """,
            delivery["id"],
            delivery["locked_until"],
            status,
            delay_s,
            enqueued_for_s,
            status_code,
            error,
        )
        if updated is None:
            return False
        await conn.execute(
            """
            INSERT INTO attempts (id, tenant_id, delivery_id, started_at, duration_ms,
                                  status_code, error, response_body)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            """,
            new_id("att"),
            delivery["tenant_id"],
            delivery["id"],
            started_at,
            duration_ms,
            status_code,
            error,
            response_body,
        )
        if touch_target and not failed:
            await conn.execute(
                "UPDATE targets SET failing_since = NULL WHERE id = $1", delivery["target_id"]
            )
        elif touch_target:
            await conn.execute(
                """
                UPDATE targets
                SET failing_since = coalesce(failing_since, $2),
                    enabled = CASE WHEN $3::text IS NULL THEN enabled ELSE false END,
                    disabled_reason = coalesce($3, disabled_reason),
                    updated_at = CASE WHEN $3::text IS NULL THEN updated_at ELSE now() END
                WHERE id = $1
                """,
                delivery["target_id"],
                started_at,
                disable_reason,
            )
    return True


async def kill(conn: Conn, delivery: Any, error: str) -> None:
    """Finish a claimed delivery as dead without an attempt (its target is gone)."""
    await conn.execute(
        """
        UPDATE deliveries
        SET status = 'dead', next_attempt_at = NULL, locked_until = NULL, enqueued_until = NULL,
            last_error = $3, updated_at = now()
        WHERE id = $1 AND locked_until = $2
        """,
        delivery["id"],
        delivery["locked_until"],
        error,
    )


async def sweep_due(conn: Conn, *, batch: int, grace_s: float) -> list[str]:
    """Due deliveries that no lease holds and no live message carries, marked as enqueued.

    Deliveries of disabled targets wait (they resume when it is re-enabled).
    """
    rows = await conn.fetch(
        """
        WITH due AS (
            SELECT d.id FROM deliveries d
            JOIN targets t ON t.id = d.target_id
            WHERE d.status IN ('pending', 'retrying')
              AND d.next_attempt_at <= now()
              AND (d.locked_until IS NULL OR d.locked_until < now())
              AND (d.enqueued_until IS NULL OR d.enqueued_until < now())
              AND t.enabled
            ORDER BY d.next_attempt_at
            LIMIT $1
            FOR UPDATE OF d SKIP LOCKED
        )
        UPDATE deliveries d SET enqueued_until = now() + make_interval(secs => $2)
        FROM due WHERE d.id = due.id
        RETURNING d.id
        """,
        batch,
        grace_s,
    )
    return [r["id"] for r in rows]


# --- reading -------------------------------------------------------------------

_DELIVERY_COLUMNS = """
    d.id, d.tenant_id, d.event_id, d.target_id, d.status, d.attempt_count, d.next_attempt_at,
    d.last_status_code, d.last_error, d.created_at, d.updated_at
"""


async def list_deliveries(
    conn: Conn,
    tenant_id: str | None,
    *,
    limit: int,
    cursor: str | None,
    status: str | None = None,
    target_id: str | None = None,
    event_id: str | None = None,
) -> tuple[list[Any], str | None]:
    """Deliveries newest first; ``tenant_id`` None only for operators."""
    rows = await conn.fetch(
        f"""
        SELECT {_DELIVERY_COLUMNS} FROM deliveries d
        WHERE ($1::text IS NULL OR d.tenant_id = $1)
          AND ($2::text IS NULL OR d.id < $2)
          AND ($3::text IS NULL OR d.status = $3)
          AND ($4::text IS NULL OR d.target_id = $4)
          AND ($5::text IS NULL OR d.event_id = $5)
        ORDER BY d.id DESC LIMIT $6
        """,
        tenant_id,
        cursor,
        status,
        target_id,
        event_id,
        limit + 1,
    )
    return keyset_page(rows, limit)


async def get_delivery(conn: Conn, tenant_id: str, delivery_id: str) -> Any:
    """One delivery of this tenant, or None."""
    return await conn.fetchrow(
        f"SELECT {_DELIVERY_COLUMNS} FROM deliveries d WHERE d.tenant_id = $1 AND d.id = $2",
        tenant_id,
        delivery_id,
    )


async def get_delivery_any_tenant(conn: Conn, delivery_id: str) -> Any:
    """One delivery whoever owns it (operators' CLI)."""
    return await conn.fetchrow(
        f"SELECT {_DELIVERY_COLUMNS} FROM deliveries d WHERE d.id = $1", delivery_id
    )


async def deliveries_of_events(conn: Conn, tenant_id: str, event_ids: list[str]) -> list[Any]:
    """The deliveries of some events of this tenant."""
    return list(
        await conn.fetch(
            f"""
            SELECT {_DELIVERY_COLUMNS} FROM deliveries d
            WHERE d.tenant_id = $1 AND d.event_id = ANY($2::text[]) ORDER BY d.id
            """,
            tenant_id,
            event_ids,
        )
    )


async def attempts_of(conn: Conn, delivery_id: str) -> list[Any]:
    """A delivery's attempts, oldest first."""
    return list(
        await conn.fetch(
            """
            SELECT id, started_at, duration_ms, status_code, error, response_body
            FROM attempts WHERE delivery_id = $1 ORDER BY id
            """,
            delivery_id,
        )
    )


# --- retry and replay ------------------------------------------------------------


async def retry_delivery(
    conn: Conn, tenant_id: str, delivery_id: str, *, enqueue_grace_s: float
) -> Any:
    """Send a delivery again with a fresh schedule (any status); None if not the tenant's."""
    return await conn.fetchrow(
        f"""
        UPDATE deliveries d
        SET status = 'pending', attempt_count = 0, next_attempt_at = now(),
            enqueued_until = now() + make_interval(secs => $3), updated_at = now()
        WHERE d.tenant_id = $1 AND d.id = $2
          AND (d.locked_until IS NULL OR d.locked_until < now())
        RETURNING {_DELIVERY_COLUMNS}
        """,
        tenant_id,
        delivery_id,
        enqueue_grace_s,
    )


def _dead_filter(first: int) -> str:
    """WHERE clause of a dead-letter selection; parameters ``$first`` … ``$first+4``."""
    p = [f"${first + i}" for i in range(5)]
    return f"""
        status = 'dead'
        AND ({p[0]}::text IS NULL OR tenant_id = {p[0]})
        AND ({p[1]}::text IS NULL OR target_id = {p[1]})
        AND ({p[2]}::timestamptz IS NULL OR created_at >= {p[2]})
        AND ({p[3]}::text[] IS NULL OR id = ANY({p[3]}))
        AND ({p[4]}::text IS NULL OR id <= {p[4]})
    """


async def list_dead_letters(
    conn: Conn,
    tenant_id: str | None,
    *,
    limit: int,
    cursor: str | None,
    target_id: str | None = None,
    since: datetime | None = None,
) -> tuple[list[Any], str | None]:
    """Dead deliveries newest first; ``tenant_id`` None only for operators."""
    rows = await conn.fetch(
        f"""
        SELECT {_DELIVERY_COLUMNS} FROM deliveries d
        WHERE {_dead_filter(1)} AND ($6::text IS NULL OR d.id < $6)
        ORDER BY d.id DESC LIMIT $7
        """,
        tenant_id,
        target_id,
        since,
        None,
        None,
        cursor,
        limit + 1,
    )
    return keyset_page(rows, limit)


async def count_dead_letters(
    conn: Conn,
    tenant_id: str | None,
    *,
    target_id: str | None,
    since: datetime | None,
    ids: list[str] | None,
    up_to_id: str | None,
) -> int:
    """How many dead letters a selection holds."""
    count: int = await conn.fetchval(
        f"SELECT count(*) FROM deliveries WHERE {_dead_filter(1)}",
        tenant_id,
        target_id,
        since,
        ids,
        up_to_id,
    )
    return count


async def newest_dead_letter_id(conn: Conn) -> str | None:
    """The highest dead-letter id now: a bulk replay stops there."""
    value: str | None = await conn.fetchval("SELECT max(id) FROM deliveries WHERE status = 'dead'")
    return value


async def replay_dead_letters_batch(
    conn: Conn,
    tenant_id: str | None,
    *,
    target_id: str | None,
    since: datetime | None,
    ids: list[str] | None,
    up_to_id: str | None,
    batch: int,
    enqueue_grace_s: float,
    after_id: str | None = None,
) -> list[str]:
    """Put up to ``batch`` selected dead letters back to pending; return their ids.

    One set-based statement with SKIP LOCKED, so concurrent replays never touch
    the same row and none holds a lock for long. What is already pending is
    not selected, so replaying twice does not send twice.
    """
    rows = await conn.fetch(
        f"""
        WITH picked AS (
            SELECT id FROM deliveries
            WHERE {_dead_filter(1)} AND ($8::text IS NULL OR id > $8)
            ORDER BY id LIMIT $6 FOR UPDATE SKIP LOCKED
        )
        UPDATE deliveries d
        SET status = 'pending', attempt_count = 0, next_attempt_at = now(),
            enqueued_until = now() + make_interval(secs => $7), locked_until = NULL,
            updated_at = now()
        FROM picked WHERE d.id = picked.id
        RETURNING d.id
        """,
        tenant_id,
        target_id,
        since,
        ids,
        up_to_id,
        batch,
        enqueue_grace_s,
        after_id,
    )
    return [r["id"] for r in rows]


#: Rows per replay statement: short enough that no lock is held long.
REPLAY_BATCH = 2000


async def replay_in_batches(
    conn: Conn,
    tenant_id: str | None,
    *,
    target_id: str | None,
    since: datetime | None,
    up_to_id: str,
    enqueue_grace_s: float,
) -> AsyncIterator[list[str]]:
    """Replay a whole selection up to ``up_to_id``, yielding each batch's ids once committed.

    A keyset cursor visits each row once, even if it dies again meanwhile.
    """
    after: str | None = None
    while True:
        ids = await replay_dead_letters_batch(
            conn,
            tenant_id,
            target_id=target_id,
            since=since,
            ids=None,
            up_to_id=up_to_id,
            batch=REPLAY_BATCH,
            enqueue_grace_s=enqueue_grace_s,
            after_id=after,
        )
        if ids:
            yield ids
            after = max(ids)
        if len(ids) < REPLAY_BATCH:
            return


async def purge_dead_letters(
    conn: Conn,
    tenant_id: str | None,
    *,
    target_id: str | None,
    older_than: datetime,
    batch: int = 5000,
) -> int:
    """Delete dead letters created before ``older_than``, in batches; return how many."""
    total = 0
    while True:
        deleted: int = await conn.fetchval(
            """
            WITH gone AS (
                DELETE FROM deliveries WHERE id IN (
                    SELECT id FROM deliveries
                    WHERE status = 'dead' AND created_at < $3
                      AND ($1::text IS NULL OR tenant_id = $1)
                      AND ($2::text IS NULL OR target_id = $2)
                    LIMIT $4
                ) RETURNING 1
            ) SELECT count(*) FROM gone
            """,
            tenant_id,
            target_id,
            older_than,
            batch,
        )
        total += deleted
        if deleted < batch:
            return total


async def stats(conn: Conn) -> dict[str, Any]:
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


# --- the sweeper's housekeeping ----------------------------------------------------


async def disable_failing_targets(conn: Conn, failing_for_s: float) -> list[str]:
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


async def purge_old_events(conn: Conn, retention_days: int, batch: int = 1000) -> int:
    """Delete up to ``batch`` events older than the retention (deliveries and attempts cascade).

    An event with a delivery still to be sent (pending or retrying, e.g. behind a
    target disabled for longer than the retention) is kept until it finishes.
    """
    deleted: int = await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM events WHERE id IN (
                SELECT e.id FROM events e
                WHERE e.received_at < now() - make_interval(days => $1)
                  AND NOT EXISTS (
                      SELECT 1 FROM deliveries d
                      WHERE d.event_id = e.id AND d.status IN ('pending', 'retrying')
                  )
                LIMIT $2
            ) RETURNING 1
        ) SELECT count(*) FROM gone
        """,
        retention_days,
        batch,
    )
    return deleted


async def backlog(conn: Conn) -> tuple[int, int]:
    """(due but unsent, dead) deliveries, for the metrics."""
    row = await conn.fetchrow(
        """
        SELECT
          (SELECT count(*) FROM deliveries WHERE status IN ('pending', 'retrying')
             AND next_attempt_at <= now()) AS due,
          (SELECT count(*) FROM deliveries WHERE status = 'dead') AS dead
        """
    )
    return int(row["due"]), int(row["dead"])
