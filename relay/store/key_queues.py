"""Ordered delivery's key queues: key locks, positions, and promoting the next of a key.

Of a key's undelivered deliveries one is active (due, leased or retrying);
the others are parked (``pending`` with no ``next_attempt_at``). The transaction
that ends the active one promotes the next.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.store.db import Conn, Queries
from relay.store.rows import Replayed
from relay.store.sql import ORDER_LOCK, holds_key, key_locks, key_queue_order

# Keys' advisory locks, in one order everywhere; taken before the statement whose
# snapshot must see what the keys' other writers committed.
_LOCK_KEYS = f"SELECT {key_locks('$1', '$2', '$3')}"

# For each key: when none of its undelivered deliveries is active (due, leased,
# retrying, or dead while the target blocks on dead letters), the parked one
# with the lowest position becomes due.
_PROMOTE = f"""
WITH head AS MATERIALIZED (
    SELECT h.id FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::text[])) AS k(target_id, key)
    JOIN targets t ON t.id = k.target_id
    CROSS JOIN LATERAL (
        SELECT p.id, p.status, p.next_attempt_at FROM deliveries p
        WHERE p.target_id = k.target_id AND p.order_key = k.key
          AND {holds_key("p", "t")}
        ORDER BY {key_queue_order("p")}
        LIMIT 1
    ) h
    WHERE h.status = 'pending' AND h.next_attempt_at IS NULL
)
UPDATE deliveries d
SET next_attempt_at = now(), enqueued_until = now() + make_interval(secs => $3::float8),
    updated_at = now()
FROM head
WHERE d.id = head.id AND d.status = 'pending' AND d.next_attempt_at IS NULL
RETURNING d.id, d.target_id, d.tenant_id
"""
# (MATERIALIZED: the heads are found key by key first, then updated by primary key;
# without it, and without statistics, Postgres walked every parked row instead.)


async def promote_keys(
    conn: Queries, keys: Sequence[tuple[str, str]], *, grace_s: float
) -> list[Replayed]:
    """Make the next delivery of each (target, key) due if nothing of its key is active.

    Call inside a transaction, after the change that may have ended a key's
    active delivery; the keys' locks are held from here to the commit.
    """
    if not keys:
        return []
    targets = [t for t, _ in keys]
    order_keys = [k for _, k in keys]
    await conn.execute(_LOCK_KEYS, targets, order_keys, ORDER_LOCK)
    rows = await conn.fetch(_PROMOTE, targets, order_keys, grace_s)
    return [Replayed(r["id"], r["target_id"], r["tenant_id"]) for r in rows]


async def reorder_target(conn: Conn, target_id: str, *, grace_s: float) -> None:
    """After a target's ``ordering`` or ``on_dead`` changed: release or promote what waits.

    Unordered now: every parked delivery becomes due. Still ordered: each key
    with parked deliveries gets its next one due if nothing of it is active.
    """
    async with conn.transaction():
        ordering = await conn.fetchval("SELECT ordering FROM targets WHERE id = $1", target_id)
        if ordering == "none":
            await conn.execute(
                """
                UPDATE deliveries
                SET next_attempt_at = now(), enqueued_until = now() + make_interval(secs => $2),
                    updated_at = now()
                WHERE target_id = $1 AND status = 'pending' AND next_attempt_at IS NULL
                """,
                target_id,
                grace_s,
            )
            return
        keys = await conn.fetch(
            """
            SELECT DISTINCT order_key FROM deliveries
            WHERE target_id = $1 AND status = 'pending' AND next_attempt_at IS NULL
            """,
            target_id,
        )
        await promote_keys(conn, [(target_id, r["order_key"]) for r in keys], grace_s=grace_s)
