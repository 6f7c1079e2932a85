"""Deliveries: claiming, recording attempts, and what the sweeper finds due."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from relay.crypto import new_id
from relay.store.db import Conn

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
       t.url, t.headers, t.rate_limit, t.enabled, t.deleted_at, t.secret_enc,
       t.previous_secret_enc, t.secret_rotated_at
FROM claimed c
JOIN events e ON e.id = c.event_id
JOIN targets t ON t.id = c.target_id
"""


async def claim(conn: Conn, delivery_id: str, lease_s: float) -> Any:
    """Claim a due delivery for ``lease_s`` seconds; None if it is not ours to send."""
    return await conn.fetchrow(_CLAIM, delivery_id, lease_s)


async def release(
    conn: Conn, delivery_id: str, lease: datetime, *, delay_s: float, enqueued: bool
) -> None:
    """Give a claim back without spending an attempt (rate limit, disabled target)."""
    await conn.execute(
        """
        UPDATE deliveries
        SET locked_until = NULL,
            next_attempt_at = greatest(next_attempt_at, now() + make_interval(secs => $3)),
            enqueued_until = CASE WHEN $4 THEN now() + make_interval(secs => $3 + 30) END,
            updated_at = now()
        WHERE id = $1 AND locked_until = $2
        """,
        delivery_id,
        lease,
        delay_s,
        enqueued,
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
    """Record one attempt and the delivery's new state atomically; False if the lease was lost."""
    async with conn.transaction():
        updated = await conn.fetchval(
            """
            UPDATE deliveries
            SET status = $3, attempt_count = attempt_count + 1,
                next_attempt_at = now() + make_interval(secs => $4::float8),
                enqueued_until = now() + make_interval(secs => $5::float8),
                locked_until = NULL, last_status_code = $6,
                last_error = $7, updated_at = now()
            WHERE id = $1 AND locked_until = $2
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
        if status == "succeeded":
            await conn.execute(
                "UPDATE targets SET failing_since = NULL "
                "WHERE id = $1 AND failing_since IS NOT NULL",
                delivery["target_id"],
            )
        else:
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
