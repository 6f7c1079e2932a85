"""Ordered delivery's key queues: key locks, positions, and promoting the next of a key.

Of a key's undelivered deliveries one is active (due, leased or retrying);
the others are parked (``pending`` with no ``next_attempt_at``). The transaction
that ends the active one promotes the next.

Lock order, in every writer: a target's row, its health, then the keys'
advisory locks (``lock_keys``, sorted), then the rows of deliveries. Promoting
a key's next delivery writes a row while the key's lock is held, so a writer
that held a delivery's row while waiting for its key would deadlock with it
(a retry holding the parked row, a record promoting that row under the key):
whoever changes a delivery of an ordered key takes the key's lock first.

A key's lock is its bucket's (``relay.store.sql.key_lock``: ``KEY_LOCK_BUCKETS``
per target), so a transaction holds a bounded number of locks whatever the
number of keys; keys of one bucket exclude each other, which costs waiting,
never order or a deadlock (a transaction locks more keys later only among those
it already holds).
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.store.db import Conn
from relay.store.rows import Replayed
from relay.store.sql import ORDER_LOCK, holds_key, key_locks, key_queue_order

Key = tuple[str, str]

# Keys' advisory locks, in one order everywhere; taken before the statement whose
# snapshot must see what the keys' other writers committed.
_LOCK_KEYS = f"SELECT {key_locks('$1', '$2', '$3')}"


# For each key: when none of its undelivered deliveries is active (due, leased,
# retrying, or dead while the target blocks on dead letters), the parked one
# with the lowest position becomes due. Its retry window starts then (claims.end_past_window).
def _promote(targets: str, keys: str, grace_s: str, *, returning: bool = True) -> str:
    """The promotion of the keys (``targets``/``keys``: parallel text arrays) as SQL."""
    answer = "RETURNING d.id, d.target_id, d.tenant_id" if returning else ""
    return f"""
WITH head AS MATERIALIZED (
    SELECT h.id FROM (SELECT DISTINCT * FROM unnest({targets}, {keys})) AS k(target_id, key)
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
SET next_attempt_at = now(), enqueued_until = now() + make_interval(secs => {grace_s}),
    round_started_at = now(), updated_at = now()
WHERE d.id = ANY (ARRAY(SELECT id FROM head))
  AND d.status = 'pending' AND coalesce(d.next_attempt_at, '-infinity') = '-infinity'
{answer}
"""


_PROMOTE = _promote("$1::text[]", "$2::text[]", "$3::float8")
# (MATERIALIZED: the heads are found key by key first, then updated by primary key;
# without it, and without statistics, Postgres walked every parked row instead. The
# primary key is the only index the UPDATE's conditions can use: written as
# ``next_attempt_at IS NULL`` (or joined with ``head``), the check let Postgres pick
# deliveries_target_due_idx, whose NULL entries are every delivered row too: ~800 ms
# per record of a busy ordered target with 90,000 deliveries stored, 4 backends at once.)


# The record of attempts of an ordered target, in one call (migration 0020, made from
# this module's statements by relay/store/migrations.py, so they are written once):
# the ended keys' locks (_LOCK_KEYS), the record (relay_record, migration 0018), then,
# for each ended key whose delivery was recorded, the promotion of its next (_PROMOTE).
# A PL/pgSQL function takes a new snapshot per statement, so the record and the
# promotion see what the keys' other writers committed before their locks were
# given. One round trip, where BEGIN, the locks, the record, the promotion and
# COMMIT were five. It answers as relay_record: nothing is written (and nothing
# promoted) if the target's failing state is not p_expect_failing.
RECORD_ORDERED_FUNCTION = f"""
CREATE OR REPLACE FUNCTION relay_record_ordered(
    p_ids text[], p_leases timestamptz[], p_statuses text[], p_delays float8[],
    p_carried float8[], p_codes int[], p_errors text[], p_attempt_ids text[],
    p_started timestamptz[], p_durations int[], p_bodies text[], p_target text,
    p_expect_failing bool,
    -- the deliveries among p_ids that ended (succeeded or dead), and their keys
    p_ended_ids text[], p_ended_keys text[], p_lock int, p_grace_s float8
) RETURNS TABLE (failing bool, ids text[])
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
DECLARE
    v_targets text[];
    v_keys text[];
BEGIN
    SELECT array_agg(p_target), array_agg(k.key) INTO v_targets, v_keys
    FROM (SELECT DISTINCT unnest(p_ended_keys) AS key) k;
    IF v_keys IS NOT NULL THEN
        PERFORM {key_locks("v_targets", "v_keys", "p_lock")};
    END IF;
    SELECT r.failing, r.ids INTO failing, ids
    FROM relay_record(p_ids, p_leases, p_statuses, p_delays, p_carried, p_codes, p_errors,
                      p_attempt_ids, p_started, p_durations, p_bodies, p_target,
                      p_expect_failing) r;
    IF p_expect_failing IS NOT NULL AND failing IS DISTINCT FROM p_expect_failing THEN
        RETURN NEXT;  -- nothing was written
        RETURN;
    END IF;
    SELECT array_agg(p_target), array_agg(k.key) INTO v_targets, v_keys
    FROM (SELECT DISTINCT e.key FROM unnest(p_ended_ids, p_ended_keys) AS e(id, key)
          WHERE e.id = ANY(ids)) k;
    IF v_keys IS NOT NULL THEN
        {_promote("v_targets", "v_keys", "p_grace_s", returning=False)};
    END IF;
    RETURN NEXT;
END
$fn$
"""


async def create_record_ordered(conn: Conn) -> None:
    """(Re)create relay_record_ordered() from this module's statements."""
    await conn.execute(RECORD_ORDERED_FUNCTION)


async def lock_keys(conn: Conn, keys: Sequence[Key]) -> None:
    """Take the advisory lock of each (target, key), held to the commit.

    Call inside a transaction, before touching a row of a delivery of those keys.
    """
    if keys:
        await conn.execute(_LOCK_KEYS, [t for t, _ in keys], [k for _, k in keys], ORDER_LOCK)


async def promote_keys(
    conn: Conn, keys: Sequence[Key], *, grace_s: float, locked: bool = False
) -> list[Replayed]:
    """Make the next delivery of each (target, key) due if nothing of its key is active.

    Call inside a transaction, after the change that may have ended a key's
    active delivery; the keys' locks (if not taken before) are held from here to
    the commit. ``locked``: the caller holds every one of them already (a round
    trip fewer).
    """
    if not keys:
        return []
    if not locked:
        await lock_keys(conn, keys)
    rows = await conn.fetch(_PROMOTE, [t for t, _ in keys], [k for _, k in keys], grace_s)
    return [Replayed(r["id"], r["target_id"], r["tenant_id"]) for r in rows]


# Up to $3 distinct keys of the key-queue index after ($1, $2), one index probe
# each (a loose index scan), in index order, and whether each is stranded: it has
# a parked delivery and nothing else that holds its queue, so nothing would ever
# make its next delivery due. Read without locks: ``promote_keys`` checks again.
_WALK_KEYS = f"""
WITH RECURSIVE walk(target_id, order_key, n) AS (
    (SELECT d.target_id, d.order_key, 1 FROM deliveries d
     WHERE d.order_key IS NOT NULL AND d.status IN ('pending', 'retrying', 'dead')
       AND (d.target_id, d.order_key) > ($1::text, $2::text)
     ORDER BY d.target_id, d.order_key LIMIT 1)
    UNION ALL
    SELECT nxt.target_id, nxt.order_key, w.n + 1 FROM walk w CROSS JOIN LATERAL (
        SELECT d.target_id, d.order_key FROM deliveries d
        WHERE d.order_key IS NOT NULL AND d.status IN ('pending', 'retrying', 'dead')
          AND (d.target_id, d.order_key) > (w.target_id, w.order_key)
        ORDER BY d.target_id, d.order_key LIMIT 1
    ) nxt
    WHERE w.n < $3
)
SELECT w.target_id, w.order_key,
       EXISTS (
           SELECT 1 FROM deliveries p
           WHERE p.target_id = w.target_id AND p.order_key = w.order_key
             AND p.status = 'pending' AND p.next_attempt_at IS NULL
       ) AND NOT EXISTS (
           SELECT 1 FROM deliveries p
           WHERE p.target_id = w.target_id AND p.order_key = w.order_key
             AND {holds_key("p", "t")}
             AND NOT (p.status = 'pending' AND p.next_attempt_at IS NULL)
       ) AS stranded
FROM walk w JOIN targets t ON t.id = w.target_id
ORDER BY w.n
"""


async def stranded_keys(
    conn: Conn, *, after: Key | None, limit: int
) -> tuple[list[Key], Key | None]:
    """Check up to ``limit`` keys after ``after`` (None: from the first); return the stranded.

    Also returns where the next check goes on (None: this one reached the last
    key). Each call costs ``limit`` index probes at most, whatever the backlog.
    """
    rows = await conn.fetch(_WALK_KEYS, *(after or ("", "")), limit)
    stranded = [(r["target_id"], r["order_key"]) for r in rows if r["stranded"]]
    last = (rows[-1]["target_id"], rows[-1]["order_key"]) if len(rows) == limit else None
    return stranded, last


async def repair_keys(conn: Conn, keys: Sequence[Key], *, grace_s: float) -> list[Replayed]:
    """Promote the head of each stranded key (checked again under the key's lock)."""
    async with conn.transaction():
        return await promote_keys(conn, keys, grace_s=grace_s)


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
                    round_started_at = now(), updated_at = now()
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
