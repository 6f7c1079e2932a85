"""Dead letters: what never succeeded, listed, counted, replayed and purged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from relay.store.db import Conn, Queries
from relay.store.deliveries import DELIVERY_COLUMNS, delivery_page
from relay.store.key_queues import lock_keys, promote_keys
from relay.store.rows import Delivery, Replayed
from relay.store.sql import optional_filters, pinned_order


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """A selection of dead letters, as the API, the console and the CLI make them.

    ``since``/``until`` bound when the delivery was made (when its event was
    received), as the API's ``since`` does; ``ids`` and ``up_to_id`` pin a
    selection (a replay by ids, a bulk replay stopping at what was dead when it
    was asked for). ``replayable`` keeps only those whose target is not deleted:
    what a replay selects and counts (a deleted target's stay dead, listed).
    """

    target_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    status_code: int | None = None
    #: a case-insensitive part of the last error
    error: str | None = None
    ids: list[str] | None = None
    up_to_id: str | None = None
    replayable: bool = False

    @property
    def api_selectable(self) -> bool:
        """True when the API's replay can select exactly this (target and since only)."""
        return self.until is None and self.status_code is None and self.error is None


#: How many parameters ``dead_letter_match`` takes.
DEAD_LETTER_PARAMS = 9
#: The first parameter after those of ``dead_letter_match``.
_NEXT = DEAD_LETTER_PARAMS + 1


def dead_letter_match(args: Sequence[Any], *, descending: bool = True) -> tuple[str, str]:
    """The one rule of what a dead-letter selection holds, on ``deliveries d``: its
    condition and its ORDER BY (newest first, or oldest with ``descending`` False).

    Parameters ``$1`` … ``$9`` are ``args`` (``dead_letter_args``); a filter not
    given is left out of the statement (``optional_filters``). The tenant and the
    target are pinned (``pinned_order``): a tenant's dead letters are read off
    ``(tenant_id, id DESC)`` (migration 0025), a target's off
    ``(tenant_id, target_id, id DESC)`` or ``(target_id, id DESC)``, never past
    other tenants'.
    """
    tenant_id, target_id, since, until, status_code, error, ids, up_to_id, replayable = args
    pinned, order = pinned_order(
        [("d.tenant_id", "$1::text", tenant_id), ("d.target_id", "$2::text", target_id)],
        "d.id",
        descending=descending,
    )
    live_target = "SELECT 1 FROM targets t WHERE t.id = d.target_id AND t.deleted_at IS NULL"
    where = optional_filters(
        ("$3::timestamptz", "d.created_at >= $3::timestamptz", since),
        ("$4::timestamptz", "d.created_at < $4::timestamptz", until),
        ("$5::int", "d.last_status_code = $5::int", status_code),
        ("$6::text", "d.last_error ILIKE $6::text", error),
        ("$7::text[]", "d.id = ANY($7::text[])", ids),
        ("$8::text", "d.id <= $8::text", up_to_id),
        ("$9::bool", f"$9::bool AND EXISTS ({live_target})", replayable),
    )
    return f"d.status = 'dead' AND {pinned} AND {where}", order


def dead_letter_args(tenant_id: str | None, flt: DeadLetterFilter) -> list[Any]:
    """The parameters of ``dead_letter_match`` for a tenant (None: every tenant)."""
    return [
        tenant_id,
        flt.target_id,
        flt.since,
        flt.until,
        flt.status_code,
        None if flt.error is None else _like(flt.error),
        flt.ids,
        flt.up_to_id,
        True if flt.replayable else None,
    ]


def _like(text: str) -> str:
    """``text`` as a LIKE pattern matching it anywhere, its wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def list_dead_letters(
    conn: Queries, tenant_id: str | None, flt: DeadLetterFilter, *, limit: int, cursor: str | None
) -> tuple[list[Delivery], str | None]:
    """Dead letters matching ``flt``, newest first; ``tenant_id`` None only for operators."""
    args = dead_letter_args(tenant_id, flt)
    match, order = dead_letter_match(args)
    before = optional_filters((f"${_NEXT}::text", f"d.id < ${_NEXT}::text", cursor))
    rows = await conn.fetch(
        f"""
        SELECT {DELIVERY_COLUMNS} FROM deliveries d
        WHERE {match} AND {before}
        ORDER BY {order} LIMIT ${_NEXT + 1}
        """,
        *args,
        cursor,
        limit + 1,
    )
    return delivery_page(rows, limit)


async def count_dead_letters(conn: Queries, tenant_id: str | None, flt: DeadLetterFilter) -> int:
    """How many dead letters match ``flt``."""
    args = dead_letter_args(tenant_id, flt)
    count: int = await conn.fetchval(
        f"SELECT count(*) FROM deliveries d WHERE {dead_letter_match(args)[0]}", *args
    )
    return count


#: The most a dead-letter page counts of a selection the counters cannot answer.
COUNT_CAP = 1000


async def count_dead_letters_shown(
    conn: Queries, tenant_id: str | None, flt: DeadLetterFilter, *, cap: int = COUNT_CAP
) -> tuple[int, bool]:
    """How many dead letters match ``flt``, for a page: (count, capped).

    A tenant's or a target's dead letters (or all) are counted exactly from the
    counters (migration 0011); a narrower selection (time, status, error) is
    counted up to ``cap`` (capped True: more than ``cap`` match), so a page
    never reads more than that, whatever the history.
    """
    plain = DeadLetterFilter(target_id=flt.target_id)
    if flt == plain:
        exact = await conn.fetchval(
            """
            SELECT coalesce(sum(n), 0)::bigint FROM delivery_counts_now
            WHERE status = 'dead' AND ($1::text IS NULL OR tenant_id = $1)
              AND ($2::text IS NULL OR target_id = $2)
            """,
            tenant_id,
            flt.target_id,
        )
        return int(exact), False
    args = dead_letter_args(tenant_id, flt)
    count: int = await conn.fetchval(
        f"SELECT count(*) FROM (SELECT 1 FROM deliveries d WHERE {dead_letter_match(args)[0]} "
        f"LIMIT ${_NEXT}) x",
        *args,
        cap + 1,
    )
    return min(count, cap), count > cap


async def dead_letter_ids(
    conn: Queries, tenant_id: str | None, flt: DeadLetterFilter, *, limit: int
) -> list[str]:
    """Ids of up to ``limit`` dead letters matching ``flt``, oldest first."""
    args = dead_letter_args(tenant_id, flt)
    match, order = dead_letter_match(args, descending=False)
    rows = await conn.fetch(
        f"SELECT d.id FROM deliveries d WHERE {match} ORDER BY {order} LIMIT ${_NEXT}",
        *args,
        limit,
    )
    return [r["id"] for r in rows]


async def newest_dead_letter_id(conn: Queries) -> str | None:
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
) -> list[Replayed]:
    """Put up to ``batch`` selected dead letters back to pending; return them.

    Short statements with SKIP LOCKED, so concurrent replays never touch the
    same row and none holds a lock for long. What is already pending is not
    selected, so replaying twice does not send twice. A deleted target's dead
    letters are never selected.
    """
    flt = DeadLetterFilter(
        target_id=target_id, since=since, ids=ids, up_to_id=up_to_id, replayable=True
    )
    replayed, _ = await _replay_batch(
        conn, tenant_id, flt, batch=batch, enqueue_grace_s=enqueue_grace_s, after_id=after_id
    )
    return replayed


async def _replay_batch(
    conn: Conn,
    tenant_id: str | None,
    flt: DeadLetterFilter,
    *,
    batch: int,
    enqueue_grace_s: float,
    after_id: str | None,
) -> tuple[list[Replayed], str | None]:
    """Replay up to ``batch`` dead letters after ``after_id``.

    Returns them and the last one selected (None: the selection has no more).
    The one lock order: the live targets of the batch (FOR SHARE, in id order,
    so a deletion waits for the replay and then makes what it put back dead
    again, or wins and leaves them out), then the keys' locks, then the rows.
    """
    args = dead_letter_args(tenant_id, flt)
    match, order = dead_letter_match(args, descending=False)
    after = optional_filters((f"${_NEXT + 1}::text", f"d.id > ${_NEXT + 1}::text", after_id))
    async with conn.transaction():
        picked = await conn.fetch(
            f"""
            SELECT d.id, d.target_id, d.order_key FROM deliveries d
            WHERE {match} AND {after}
            ORDER BY {order} LIMIT ${_NEXT}
            """,
            *args,
            batch,
            after_id,
        )
        if not picked:
            return [], None
        live = await conn.fetch(
            "SELECT id FROM targets WHERE id = ANY($1::text[]) AND deleted_at IS NULL "
            "ORDER BY id FOR SHARE",
            sorted({r["target_id"] for r in picked}),
        )
        await lock_keys(conn, _keys_of(picked))
        rows = await conn.fetch(
            f"""
            WITH picked AS (
                SELECT d.id FROM deliveries d
                WHERE d.id = ANY(${_NEXT}::text[]) AND d.target_id = ANY(${_NEXT + 2}::text[])
                  AND {match}
                FOR UPDATE SKIP LOCKED
            )
            UPDATE deliveries d
            SET status = 'pending', attempt_count = 0,
                next_attempt_at = CASE WHEN d.order_key IS NULL THEN now() END,
                enqueued_until = CASE WHEN d.order_key IS NULL
                                      THEN now() + make_interval(secs => ${_NEXT + 1}) END,
                locked_until = NULL, round_started_at = now(), updated_at = now()
            FROM picked WHERE d.id = picked.id AND d.status = 'dead'
            RETURNING d.id, d.target_id, d.tenant_id, d.order_key
            """,
            *args,
            [r["id"] for r in picked],
            enqueue_grace_s,
            [r["id"] for r in live],
        )
        # ordered ones were parked: each key's first (by position) goes when nothing is active
        await promote_keys(conn, _keys_of(rows), grace_s=enqueue_grace_s)
    last = picked[-1]["id"] if len(picked) == batch else None
    return [Replayed(r["id"], r["target_id"], r["tenant_id"]) for r in rows], last


async def dead_letters_of_deleted_targets(
    conn: Conn, tenant_id: str | None, ids: list[str]
) -> list[str]:
    """Which of ``ids`` are dead letters (of this tenant; None: any) whose target is deleted."""
    rows = await conn.fetch(
        """
        SELECT d.id FROM deliveries d JOIN targets t ON t.id = d.target_id
        WHERE d.status = 'dead' AND d.id = ANY($2::text[])
          AND ($1::text IS NULL OR d.tenant_id = $1) AND t.deleted_at IS NOT NULL
        ORDER BY d.id
        """,
        tenant_id,
        ids,
    )
    return [r["id"] for r in rows]


def _keys_of(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The distinct (target, ordering key) of rows, in one order."""
    return sorted({(r["target_id"], r["order_key"]) for r in rows if r["order_key"] is not None})


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
) -> AsyncIterator[list[Replayed]]:
    """Replay a whole selection up to ``up_to_id``, yielding each batch once committed.

    A keyset cursor visits each row once, even if it dies again meanwhile.
    """
    flt = DeadLetterFilter(target_id=target_id, since=since, up_to_id=up_to_id, replayable=True)
    after: str | None = None
    while True:
        replayed, last = await _replay_batch(
            conn,
            tenant_id,
            flt,
            batch=REPLAY_BATCH,
            enqueue_grace_s=enqueue_grace_s,
            after_id=after,
        )
        if replayed:
            yield replayed
        if last is None:
            return
        after = last


async def purge_dead_letters(
    conn: Conn,
    tenant_id: str | None,
    *,
    target_id: str | None,
    older_than: datetime,
    batch: int = 5000,
    enqueue_grace_s: float = 30.0,
) -> int:
    """Delete dead letters created before ``older_than``, in batches; return how many.

    The keys' locks are taken before the rows (``key_queues``' lock order).
    """
    args = dead_letter_args(tenant_id, DeadLetterFilter(target_id=target_id, until=older_than))
    match, _ = dead_letter_match(args)
    total = 0
    while True:
        async with conn.transaction():
            picked = await conn.fetch(
                f"""
                SELECT d.id, d.target_id, d.order_key FROM deliveries d
                WHERE {match} LIMIT ${_NEXT}
                """,
                *args,
                batch,
            )
            await lock_keys(conn, _keys_of(picked))
            gone = await conn.fetch(
                f"""
                DELETE FROM deliveries d
                WHERE d.id = ANY(${_NEXT}::text[]) AND {match}
                RETURNING d.target_id, d.order_key
                """,
                *args,
                [r["id"] for r in picked],
            )
            # a key blocked on a dead letter that is purged goes on
            await promote_keys(conn, _keys_of(gone), grace_s=enqueue_grace_s)
        total += len(gone)
        if len(picked) < batch:
            return total
