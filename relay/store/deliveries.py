"""A tenant's deliveries: reading them with their attempts, and sending one again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, get_args

from relay.store.db import Conn, Queries, fetch_past_moves
from relay.store.key_queues import lock_keys, promote_keys
from relay.store.rows import AttemptRecord, Delivery, DeliveryStatus
from relay.store.sql import (
    hold_reason,
    holds_key,
    key_queue_order,
    keyset_page,
    made_since,
    newest_first,
    optional_filters,
    pinned_order,
)

# A delivery that is due and not leased: if something holds it, waiting_for says what.
_DUE = (
    "d.status IN ('pending', 'retrying') AND d.next_attempt_at <= now()"
    " AND (d.locked_until IS NULL OR d.locked_until < now())"
)
_PARKED = "d.status = 'pending' AND d.next_attempt_at IS NULL"

# blocked_by: of a parked delivery, the one of its key it waits behind (the
# key's active one, else the first parked one).
# waiting_for: what holds a due delivery (API.md), first of: its target is
# disabled; its breaker is open (or half_open: the probe is out), and then
# next_attempt_at shows the breaker's until; a rate limit deferred the target's
# claims (target_health.rate_limited_until, which the engine sets when its
# limiter defers and which lapses by itself once nothing is deferred); or, for
# a parked delivery, its key.
DELIVERY_COLUMNS = f"""
    d.id, d.tenant_id, d.event_id, d.target_id, d.status, d.attempt_count,
    CASE WHEN {_DUE} THEN coalesce((
        SELECT greatest(d.next_attempt_at, h.open_until)
        FROM targets t JOIN target_health h ON h.target_id = t.id
        WHERE t.id = d.target_id AND t.enabled AND h.breaker <> 'closed'
    ), d.next_attempt_at) ELSE d.next_attempt_at END AS next_attempt_at,
    d.last_status_code, d.last_error, d.created_at, d.updated_at,
    CASE WHEN {_PARKED} THEN (
        SELECT p.id FROM deliveries p JOIN targets pt ON pt.id = p.target_id
        WHERE p.target_id = d.target_id AND p.order_key = d.order_key AND p.id <> d.id
          AND {holds_key("p", "pt")}
          AND (p.status <> 'pending' OR p.next_attempt_at IS NOT NULL OR p.order_pos < d.order_pos)
        ORDER BY {key_queue_order("p")}
        LIMIT 1
    ) END AS blocked_by,
    CASE WHEN {_PARKED} THEN 'key' WHEN {_DUE} THEN (
        SELECT {hold_reason("t", "h")}
        FROM targets t LEFT JOIN target_health h ON h.target_id = t.id
        WHERE t.id = d.target_id
    ) END AS waiting_for
"""


def delivery_page(
    rows: Sequence[Mapping[str, Any]], limit: int
) -> tuple[list[Delivery], str | None]:
    """Rows fetched with ``LIMIT limit + 1`` -> (typed page, next cursor)."""
    page, cursor = keyset_page(rows, limit)
    return [Delivery.from_row(r) for r in page], cursor


async def list_deliveries(
    conn: Queries,
    tenant_id: str | None,
    *,
    limit: int,
    cursor: str | None,
    status: DeliveryStatus | None = None,
    target_id: str | None = None,
    event_id: str | None = None,
) -> tuple[list[Delivery], str | None]:
    """Deliveries newest first; ``tenant_id`` None only for operators."""
    # an event's few deliveries come off its index; else the target's or the
    # tenant's come off theirs, (target_id, id DESC) or (tenant_id, id DESC)
    pin_target = event_id is None and target_id is not None
    pin_tenant = event_id is None and not pin_target and tenant_id is not None
    pins = [("d.target_id", "$3::text", target_id)] if pin_target else []
    pins += [("d.tenant_id", "$1::text", tenant_id)] if pin_tenant else []
    pinned, order = pinned_order(pins, "d.id", descending=True)
    if status is not None and status not in get_args(DeliveryStatus):
        raise ValueError(f"no such status: {status!r}")
    # a status is one of four, written as a literal: the plan prunes the partitions and
    # may take a partial index of it (a tenant's dead ones, not its backlog before them)
    of_status = "TRUE" if status is None else f"d.status = '{status}'"

    async def fetch(lo: str | None, hi: str | None, n: int) -> list[Any]:
        where = optional_filters(
            None if pin_tenant else ("$1::text", "d.tenant_id = $1::text", tenant_id),
            ("$2::text", "d.id < $2::text", hi),
            None if pin_target else ("$3::text", "d.target_id = $3::text", target_id),
            ("$4::text", "d.event_id = $4::text", event_id),
            ("$6::text", "d.id >= $6::text", lo),
        )
        return await conn.fetch(
            f"SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE {pinned} AND {where}"
            f" AND {of_status} ORDER BY {order} LIMIT $5",
            tenant_id,
            hi,
            target_id,
            event_id,
            n,
            lo,
        )

    if event_id is not None:  # an event's: made since it (deliveries_of_event)
        rows = await fetch(made_since("dlv", event_id), cursor, limit + 1)
    else:
        rows = await newest_first(fetch, "dlv", cursor, limit + 1)
    return delivery_page(rows, limit)


async def get_delivery(conn: Queries, tenant_id: str, delivery_id: str) -> Delivery | None:
    """One delivery of this tenant, or None."""
    row = await conn.fetchrow(
        f"SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.tenant_id = $1 AND d.id = $2",
        tenant_id,
        delivery_id,
    )
    return Delivery.maybe(row)


async def get_delivery_any_tenant(conn: Queries, delivery_id: str) -> Delivery | None:
    """One delivery whoever owns it (operators' CLI)."""
    row = await conn.fetchrow(
        f"SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.id = $1", delivery_id
    )
    return Delivery.maybe(row)


async def deliveries_of_event(
    conn: Queries, tenant_id: str, event_id: str, *, limit: int, cursor: str | None = None
) -> tuple[list[Delivery], str | None]:
    """A page of an event's deliveries (of this tenant), newest first, after ``cursor``.

    Read from the days since the event's only (``made_since``): an old event's page
    costs what a new one's does, however many days of history are kept.
    """
    since = made_since("dlv", event_id)
    where = optional_filters(
        ("$3::text", "d.id < $3::text", cursor), ("$5::text", "d.id >= $5::text", since)
    )
    rows = await conn.fetch(
        f"""
        SELECT {DELIVERY_COLUMNS} FROM deliveries d
        WHERE d.tenant_id = $1 AND d.event_id = $2 AND {where}
        ORDER BY d.id DESC LIMIT $4
        """,
        tenant_id,
        event_id,
        cursor,
        limit + 1,
        since,
    )
    return delivery_page(rows, limit)


_ATTEMPT_COLUMNS = "id, started_at, duration_ms, status_code, error, response_body"


async def attempts_of(conn: Queries, delivery_id: str) -> list[AttemptRecord]:
    """Every attempt of a delivery, oldest first (operators' CLI; the API and console page)."""
    since = made_since("att", delivery_id)
    rows = await conn.fetch(
        f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE delivery_id = $1"
        f" AND {optional_filters(('$2::text', 'id >= $2::text', since))} ORDER BY id",
        delivery_id,
        since,
    )
    return [AttemptRecord.from_row(r) for r in rows]


async def attempts_page(
    conn: Queries, delivery_id: str, *, limit: int, cursor: str | None = None
) -> tuple[list[AttemptRecord], str | None]:
    """A page of a delivery's attempts, newest first, after ``cursor`` (from the days
    since the delivery only, as ``deliveries_of_event``)."""
    since = made_since("att", delivery_id)
    where = optional_filters(
        ("$2::text", "id < $2::text", cursor), ("$4::text", "id >= $4::text", since)
    )
    rows = await conn.fetch(
        f"""
        SELECT {_ATTEMPT_COLUMNS} FROM attempts
        WHERE delivery_id = $1 AND {where}
        ORDER BY id DESC LIMIT $3
        """,
        delivery_id,
        cursor,
        limit + 1,
        since,
    )
    page, next_cursor = keyset_page(rows, limit)
    return [AttemptRecord.from_row(r) for r in page], next_cursor


class TargetDeleted(Exception):
    """The delivery's target is deleted: it is never sent again."""


async def retry_delivery(
    conn: Conn, tenant_id: str, delivery_id: str, *, enqueue_grace_s: float
) -> Delivery | None:
    """Send a delivery again with a fresh schedule (any status); None if not the tenant's.

    An ordered delivery re-enters its key's order at its own position: it is
    due at once only if nothing of its key is active (else it waits, parked).
    The one lock order: its target row (FOR SHARE: a deletion waits and then
    makes it dead), its key's lock, then its row. Raises TargetDeleted for a
    deleted target's delivery. The lapsed lease goes: a late record of the
    attempt made under it records nothing over the fresh schedule.
    """
    async with conn.transaction():
        found = await conn.fetchrow(
            """
            SELECT d.target_id, d.order_key, t.deleted_at IS NOT NULL AS deleted
            FROM targets t JOIN deliveries d ON d.target_id = t.id
            WHERE d.tenant_id = $1 AND d.id = $2
            FOR SHARE OF t
            """,
            tenant_id,
            delivery_id,
        )
        if found is None:
            return None
        if found["deleted"]:
            raise TargetDeleted(delivery_id)
        key = None if found["order_key"] is None else (found["target_id"], found["order_key"])
        if key is not None:
            await lock_keys(conn, [key])
        moved = await fetch_past_moves(
            conn,
            """
            UPDATE deliveries d
            SET status = 'pending', attempt_count = 0,
                next_attempt_at = CASE WHEN d.order_key IS NULL THEN now() END,
                enqueued_until = CASE WHEN d.order_key IS NULL
                                      THEN now() + make_interval(secs => $3) END,
                locked_until = NULL, round_started_at = now(), updated_at = now()
            WHERE d.tenant_id = $1 AND d.id = $2
              AND (d.locked_until IS NULL OR d.locked_until < now())
              -- its event may be gone past retention (a delivery made later than it)
              AND EXISTS (SELECT 1 FROM events e WHERE e.id = d.event_id)
            RETURNING d.id
            """,
            tenant_id,
            delivery_id,
            enqueue_grace_s,
        )
        if not moved:
            return None
        if key is not None:
            await promote_keys(conn, [key], grace_s=enqueue_grace_s)
        return await get_delivery(conn, tenant_id, delivery_id)
