"""Events and the deliveries fanned out from them at ingest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from relay.core import offload
from relay.core.crypto import new_id, new_ids
from relay.ingest.parse import ParsedEvent
from relay.ingest.routes import TargetRoute, order_keys
from relay.store.db import Conn, MaybeCommitted, Queries
from relay.store.rows import Event
from relay.store.sql import (
    KEY_LOCK_BUCKETS,
    ORDER_LOCK,
    about_target,
    int_array,
    key_locks,
    keyset_page,
    newest_first,
    optional_filters,
    pinned_order,
    text_array,
)

# A group's events and its deliveries to unordered targets are stored by one call
# (migration 0017, relay_ingest()): the uuids' locks, the events' insert (a request's
# events only if its tenant's config_version is still the one its routes were read
# at; an event only if its source has no event of its uuid), the events already
# stored for the uuids not inserted, the deliveries of the events inserted. Alone,
# the call is its own transaction: one round trip.
# Its text and integer arrays go as text (relay/store/sql.py, text_array): those of a
# batch of 1,000 events are tens of thousands of elements.
_INGEST_CASTS = {
    **dict.fromkeys((*range(1, 10), 12, *range(16, 20)), "::text::text[]"),
    **dict.fromkeys((11, 13), "::text::int8[]"),
}
_INGEST = (
    "SELECT * FROM relay_ingest("
    + ", ".join(f"${n}{_INGEST_CASTS.get(n, '')}" for n in range(1, 22))
    + ")"
)

#: First key of the advisory locks of (source, uuid) buckets ("uid").
UUID_LOCK = 0x756964
#: Buckets per source: a transaction takes at most this many uuid locks per source, and
#: two groups of k events of one source wait for each other with a chance of about
#: k * k / UUID_LOCK_BUCKETS (16 serialised a busy source's commits: test_dedup_locks).
UUID_LOCK_BUCKETS = 256

#: The locks of the (source, uuid bucket)s of events ($1 sources, $2 uuids), in one
#: order everywhere, held to the commit; taken before any key lock (relay_ingest
#: takes them first).
LOCK_UUIDS = f"SELECT relay_lock_uuids($1, $2, $3, {UUID_LOCK_BUCKETS})"

# The deliveries of ordered targets (order_key set): their keys' advisory locks
# are taken first, in one order everywhere (so no deadlock), and held to commit;
# then their positions are drawn, so positions follow commit order per key.
# (the arrays as text, the positions as one array: 10,000 rows were 10,000 records)
_LOCK_KEYS_AND_NUMBER = f"""
SELECT coalesce(array_agg(s.pos ORDER BY s.pos), '{{}}') FROM (
    SELECT nextval('deliveries_order_pos_seq') AS pos FROM generate_series(1, $3::int)
    WHERE {key_locks("$1::text", "$2::text", "$4")} >= 0
) s
"""

# Deliveries, ordered ones among them (their keys locked and positions drawn):
# migration 0017, relay_insert_deliveries(), parks a key's later deliveries.
_INSERT_DELIVERIES = (
    "SELECT * FROM relay_insert_deliveries($1::text::text[], $2::text::text[],"
    " $3::text::text[], $4::text::text[], $5::text::text[], $6::text::int8[], $7, $8)"
)

#: Deliveries one call of _INSERT_DELIVERIES inserts at most. asyncpg encodes a
#: statement's arguments on the event loop: for a batch of 1,000 events to ten
#: ordered targets, 10,000 rows at once held the loop for tens of milliseconds,
#: and every other request of the gateway waited (issue 21). In chunks, in order,
#: a key's later deliveries still find its earlier ones (inserted by the chunks
#: before, in this transaction) and wait behind them.
INSERT_CHUNK = 1000


@dataclass(frozen=True)
class IngestRequest:
    """The events of one ingest request, with the routes its tenant had when it was read."""

    tenant_id: str
    source_id: str
    events: Sequence[ParsedEvent]
    routes: Sequence[TargetRoute]
    #: the tenant's config_version the source and routes were read at; the events are
    #: stored only if it is still the tenant's (None: not checked)
    config_version: int | None = None
    #: each event's ordering key at each ordered route it matches, by route id
    #: (``relay.ingest.routes.order_keys``); None: computed here, as the request is
    #: made. Either way before the group commit, which only looks them up.
    order_keys: Sequence[Mapping[str, str]] | None = None
    #: the most key locks storing it takes (``KEY_LOCK_BUCKETS`` per ordered target at most)
    lock_count: int = field(default=0, init=False, compare=False)

    def __post_init__(self) -> None:
        if self.order_keys is None:
            keys = order_keys(self.source_id, self.events, self.routes)
            object.__setattr__(self, "order_keys", keys)
        assert self.order_keys is not None
        per_target: dict[str, set[str]] = {}
        for keys_of_event in self.order_keys:
            for target_id, key in keys_of_event.items():
                per_target.setdefault(target_id, set()).add(key)
        locks = sum(min(len(k), KEY_LOCK_BUCKETS) for k in per_target.values())
        object.__setattr__(self, "lock_count", locks)

    def keys_of(self, index: int) -> Mapping[str, str]:
        """The ordering keys of the body's event ``index``, by route id."""
        assert self.order_keys is not None  # set by __post_init__
        return self.order_keys[index]


@dataclass(frozen=True)
class IngestResult:
    """Event ids in the order of the body (duplicates map to the original) and new deliveries."""

    event_ids: list[str]
    delivery_ids: list[str]
    duplicates: int
    #: the targets that got new deliveries, once each
    target_ids: list[str]
    #: nothing was stored: the tenant's sources or targets changed since they were read
    stale: bool = False


#: The result of a request routed by a stale read: nothing stored.
STALE = IngestResult([], [], 0, [], stale=True)


#: A delivery to insert: (id, tenant, event, target, ordering key or None).
DeliveryRow = tuple[str, str, str, str, "str | None"]


@dataclass
class _Plan:
    """One request's events, numbered: what it asks to insert."""

    request: IngestRequest
    #: the event id each event of the body gets (a repeat in the body: the first one's)
    assigned: list[str]
    #: (event id, event) of the first sighting of each uuid in the body
    fresh: list[tuple[str, ParsedEvent]]
    #: a delivery of each fresh event to each route it matches, with its ordering key
    deliveries: list[DeliveryRow]


def _plan(request: IngestRequest) -> _Plan:
    # Within the body, a repeated uuid is the first one's duplicate.
    assigned: list[str] = []
    fresh: list[tuple[str, ParsedEvent]] = []
    keyed: list[tuple[str, ParsedEvent, Mapping[str, str]]] = []
    first_by_uuid: dict[str, str] = {}
    ids = iter(new_ids("evt", len(request.events)))
    for index, event in enumerate(request.events):
        if event.uuid is not None and event.uuid in first_by_uuid:
            assigned.append(first_by_uuid[event.uuid])
            continue
        event_id = next(ids)
        if event.uuid is not None:
            first_by_uuid[event.uuid] = event_id
        assigned.append(event_id)
        fresh.append((event_id, event))
        keyed.append((event_id, event, request.keys_of(index)))
    source_id, tenant_id = request.source_id, request.tenant_id
    routed = [
        (event_id, route.id, keys.get(route.id))
        for event_id, event, keys in keyed
        for route in request.routes
        if route.matches(source_id, event.object_type, event.action)
    ]
    deliveries: list[DeliveryRow] = [
        (delivery_id, tenant_id, event_id, target_id, key)
        for delivery_id, (event_id, target_id, key) in zip(
            new_ids("dlv", len(routed)), routed, strict=True
        )
    ]
    return _Plan(request, assigned, fresh, deliveries)


@dataclass
class _Prepared:
    """A group's plans and its events' columns, made before its transaction begins."""

    plans: list[_Plan]
    event_columns: list[list[Any]]


#: Events x routes a group may plan on the event loop; a bigger group is planned in a
#: thread (relay/core/offload.py): 1,000 events to 10 targets took the loop ~100 ms.
PLAN_ON_LOOP = 1000


def _prepare(requests: Sequence[IngestRequest]) -> _Prepared:
    """Number a group's events and deliveries: pure work, no I/O."""
    plans = [_plan(r) for r in requests]
    event_rows = [
        (
            i,
            p.request.tenant_id,
            p.request.source_id,
            e.uuid,
            e.date,
            e.object_type,
            e.action,
            e.object_id,
            e.tenant_ref,
            e.payload,
        )
        for p in plans
        for i, e in p.fresh
    ]
    return _Prepared(plans, _columns(event_rows, 10))


def _version(request: IngestRequest) -> int:
    """The version a request's events are checked against (-1: not checked)."""
    return -1 if request.config_version is None else request.config_version


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows -> ``width`` column lists (empty lists for no rows), for ``unnest``."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


async def record_event_groups(
    conn: Conn,
    requests: Sequence[IngestRequest],
    *,
    enqueue_grace_s: float,
    first_delay_s: float = 0.0,
) -> list[IngestResult]:
    """Store the events of several requests and their deliveries in one transaction.

    A uuid seen before, in an earlier transaction, an earlier request of the
    group or earlier in the body, maps to the event first stored for it. A
    failure once the COMMIT (or the one call that is its own transaction) was
    sent raises :class:`MaybeCommitted` from it: the events may be stored, so
    they must not be written again. Any other failure leaves nothing written.
    """
    planned = sum(len(r.events) * max(1, len(r.routes)) for r in requests)
    prepared = (
        _prepare(requests) if planned <= PLAN_ON_LOOP else await offload.run(_prepare, requests)
    )
    plans = prepared.plans
    pairs = sorted({(p.request.tenant_id, _version(p.request)) for p in plans})
    unordered = [row[:4] for p in plans for row in p.deliveries if row[4] is None]
    ordered = [row for p in plans for row in p.deliveries if row[4] is not None]
    *texts, payloads = prepared.event_columns
    args = (
        *(text_array(column) for column in texts),
        payloads,
        int_array([_version(p.request) for p in plans for _ in p.fresh]),
        text_array([t for t, _ in pairs]),
        int_array([v for _, v in pairs]),
        UUID_LOCK,
        UUID_LOCK_BUCKETS,
        *(text_array(column) for column in _columns(unordered, 4)),
        enqueue_grace_s,
        first_delay_s,
    )
    if ordered:
        # the ordered deliveries' keys are locked after the uuids: one transaction
        committing = False
        try:
            async with conn.transaction():
                stored = await _ingest(conn, args)
                inserted = set(stored["inserted"])
                created = await _insert_deliveries(
                    conn,
                    [row for row in ordered if row[2] in inserted],
                    enqueue_grace_s=enqueue_grace_s,
                    first_delay_s=first_delay_s,
                )
                committing = True  # leaving the block sends the COMMIT
        except Exception as exc:
            if committing:
                raise MaybeCommitted(f"{type(exc).__name__} once the COMMIT was sent") from exc
            raise
    else:
        # one statement, its own transaction
        try:
            stored = await _ingest(conn, args)
        except asyncpg.PostgresConnectionError as exc:  # the connection went: unknown
            raise MaybeCommitted(f"{type(exc).__name__} once the call was sent") from exc
        except (asyncpg.PostgresError, asyncpg.exceptions._base.DataError):
            # Postgres answered an error (a call alone is rolled back before any error
            # is sent), or the arguments were refused before they were sent
            raise
        except Exception as exc:  # a timeout, a lost socket: the call may have committed
            raise MaybeCommitted(f"{type(exc).__name__} once the call was sent") from exc
        inserted = set(stored["inserted"])
        created = {}
    created.update(dict.fromkeys(stored["delivery_ids"], True))
    fresh = set(zip(stored["fresh_tenants"], stored["fresh_versions"], strict=True))
    plans = [p for p in plans if (p.request.tenant_id, _version(p.request)) in fresh]
    existing = {
        (source_id, upstream_uuid): event_id
        for source_id, upstream_uuid, event_id in zip(
            stored["existing_sources"],
            stored["existing_uuids"],
            stored["existing_ids"],
            strict=True,
        )
    }
    delivery_rows = [row for p in plans for row in p.deliveries if row[2] in inserted]
    answered = _results(plans, inserted, existing, delivery_rows, created)
    # a request routed by a stale read stored nothing: it is read and routed again
    return [answered.get(id(r), STALE) for r in requests]


async def _ingest(conn: Queries, args: Sequence[Any]) -> Mapping[str, Any]:
    stored = await conn.fetchrow(_INGEST, *args)
    assert stored is not None  # relay_ingest returns one row
    return stored


def _results(
    plans: Sequence[_Plan],
    inserted: set[str],
    existing: dict[tuple[str, str], str],
    delivery_rows: Sequence[DeliveryRow],
    created: dict[str, bool],
) -> dict[int, IngestResult]:
    """Each stored request's answer (by ``id`` of its request), once its group has committed."""
    by_event: dict[str, list[tuple[str, str]]] = {}
    for delivery_id, _, event_id, target_id, _ in delivery_rows:
        if delivery_id in created:
            by_event.setdefault(event_id, []).append((delivery_id, target_id))
    results = {}
    for p in plans:
        source_id = p.request.source_id
        replaced = {
            i: existing[(source_id, e.uuid)]
            for i, e in p.fresh
            if i not in inserted and e.uuid is not None
        }
        mine = [i for i, _ in p.fresh if i in inserted]
        deliveries = [d for i in mine for d in by_event.get(i, ())]
        results[id(p.request)] = IngestResult(
            [replaced.get(i, i) for i in p.assigned],
            [d for d, _ in deliveries],
            duplicates=len(p.request.events) - len(mine),
            target_ids=list(dict.fromkeys(t for d, t in deliveries if created[d])),
        )
    return results


async def _insert_deliveries(
    conn: Queries,
    rows: Sequence[DeliveryRow],
    *,
    enqueue_grace_s: float,
    first_delay_s: float,
) -> dict[str, bool]:
    """Insert pending deliveries (id, tenant, event, target, order key); {id: due now}.

    Rows of targets that are disabled or deleted by now are not inserted. Call
    inside a transaction: the rows go in chunks of ``INSERT_CHUNK``.
    """
    if not rows:
        return {}
    ordered = [(r[3], r[4]) for r in rows if r[4] is not None]
    positions: list[int | None] = [None] * len(rows)
    if ordered:
        targets, keys = _columns(ordered, 2)
        drawn = iter(
            await conn.fetchval(
                _LOCK_KEYS_AND_NUMBER,
                text_array(targets),
                text_array(keys),
                len(ordered),
                ORDER_LOCK,
            )
        )
        positions = [None if r[4] is None else next(drawn) for r in rows]
    created: dict[str, bool] = {}
    for start in range(0, len(rows), INSERT_CHUNK):
        end = start + INSERT_CHUNK
        inserted = await conn.fetch(
            _INSERT_DELIVERIES,
            *(text_array(column) for column in _columns(rows[start:end], 5)),
            int_array(positions[start:end]),
            enqueue_grace_s,
            first_delay_s,
        )
        created.update((r["delivery_id"], r["due"]) for r in inserted)
    return created


async def record_events(
    conn: Conn,
    tenant_id: str,
    source_id: str,
    events: Sequence[ParsedEvent],
    routes: Sequence[TargetRoute],
    *,
    enqueue_grace_s: float,
    first_delay_s: float = 0.0,
) -> IngestResult:
    """Store ``events`` and one pending delivery per matching target, in one transaction."""
    (result,) = await record_event_groups(
        conn,
        [IngestRequest(tenant_id, source_id, events, routes)],
        enqueue_grace_s=enqueue_grace_s,
        first_delay_s=first_delay_s,
    )
    return result


_EVENT_COLUMNS = (
    "id, source_id, received_at, object_type, action, object_id, payload,"
    " octet_length(payload) AS payload_size, operational"
)


async def list_events(
    conn: Queries,
    tenant_id: str,
    *,
    limit: int,
    cursor: str | None,
    source_id: str | None = None,
    object_type: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    payload_bytes: int,
) -> tuple[list[Event], str | None]:
    """A tenant's events newest first; type and action match case-insensitively.

    Operational events (the relay's own) are listed apart: ``list_operational_events``.

    Payloads are read, newest first, only while the page's total stays within
    ``payload_bytes``; the others are None (their sizes come from the rows' TOAST
    headers, without reading them). So a page costs at most ``payload_bytes`` of
    payload whatever the events' sizes.
    """
    tenant, order = pinned_order([("tenant_id", "$1::text", tenant_id)], "id", descending=True)
    spent = 0  # the payload bytes of the rows read before (newest_first's first read)

    async def fetch(lo: str | None, hi: str | None, n: int) -> list[Any]:
        nonlocal spent
        where = optional_filters(
            ("$2::text", "id < $2::text", hi),
            ("$3::text", "source_id = $3::text", source_id),
            ("$4::text", "lower(object_type) = lower($4::text)", object_type),
            ("$5::text", "lower(action) = lower($5::text)", action),
            ("$6::timestamptz", "received_at >= $6::timestamptz", since),
            ("$7::timestamptz", "received_at < $7::timestamptz", until),
            ("$10::text", "id >= $10::text", lo),
        )
        # (the payloads' read too: a join by id prunes only as it runs, after it has
        # opened every day's partition)
        of_lo = optional_filters(("$10::text", "e.id >= $10::text", lo))
        rows = await conn.fetch(
            f"""
            WITH page AS (
                SELECT id, source_id, received_at, object_type, action, object_id,
                       octet_length(payload) AS payload_size
                FROM events
                WHERE {tenant} AND NOT operational AND {where}
                ORDER BY {order} LIMIT $8
            )
            SELECT p.*,
                   CASE WHEN sum(p.payload_size) OVER (ORDER BY p.id DESC) <= $9
                        THEN (SELECT e.payload FROM events e WHERE e.id = p.id AND {of_lo})
                   END AS payload
            FROM page p
            ORDER BY p.id DESC
            """,
            tenant_id,
            hi,
            source_id,
            object_type,
            action,
            since,
            until,
            n,
            payload_bytes - spent,
            lo,
        )
        spent += sum(r["payload_size"] or 0 for r in rows)
        return rows

    rows = await newest_first(fetch, "evt", cursor, limit + 1)
    page, next_cursor = keyset_page(rows, limit)
    return [Event.from_row(r) for r in page], next_cursor


async def list_operational_events(
    conn: Queries,
    tenant_id: str,
    *,
    limit: int,
    cursor: str | None = None,
    object_type: str | None = None,
    since: datetime | None = None,
    target_id: str | None = None,
) -> tuple[list[Event], str | None]:
    """A tenant's operational events newest first, with their (small) payloads.

    ``object_type`` matches case-insensitively; ``target_id``: those about this
    target (a Target event of it, or the death of one of its deliveries).
    """
    rows = await conn.fetch(
        f"""
        SELECT {_EVENT_COLUMNS} FROM events e
        WHERE e.tenant_id = $1 AND e.operational
          AND ($2::text IS NULL OR e.id < $2)
          AND ($3::text IS NULL OR lower(e.object_type) = lower($3))
          AND ($4::timestamptz IS NULL OR e.received_at >= $4)
          AND {about_target("e", "$5")}
        ORDER BY e.id DESC LIMIT $6
        """,
        tenant_id,
        cursor,
        object_type,
        since,
        target_id,
        limit + 1,
    )
    page, next_cursor = keyset_page(rows, limit)
    return [Event.from_row(r) for r in page], next_cursor


async def get_event(conn: Queries, tenant_id: str, event_id: str) -> Event | None:
    """One event of this tenant, or None."""
    row = await conn.fetchrow(
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE tenant_id = $1 AND id = $2",
        tenant_id,
        event_id,
    )
    return Event.maybe(row)


async def add_deliveries(
    conn: Queries,
    tenant_id: str,
    event_id: str,
    targets: Sequence[tuple[str, str | None]],
    *,
    enqueue_grace_s: float,
) -> list[str]:
    """New pending deliveries of an event to live, enabled targets of this tenant.

    ``targets``: (target id, ordering key or None). Call inside a transaction
    (a key's lock, and the event's partition's, are held to the commit). None are
    made if the event is gone (past retention).
    """
    # The event may have been dropped past retention since it was read: its row is
    # read again here, and its partition's lock held to the commit, so retention
    # (which takes it) either waits for these deliveries, and keeps the event for
    # them, or has dropped it first, and nothing is made.
    if not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM events WHERE id = $1 AND tenant_id = $2)",
        event_id,
        tenant_id,
    ):
        return []
    rows = [(new_id("dlv"), tenant_id, event_id, t, key) for t, key in targets]
    created = await _insert_deliveries(
        conn, rows, enqueue_grace_s=enqueue_grace_s, first_delay_s=0.0
    )
    return [r[0] for r in rows if r[0] in created]


async def create_test_event(
    conn: Conn, tenant_id: str, target_id: str, payload: bytes, *, enqueue_grace_s: float
) -> tuple[str, str | None]:
    """A synthetic Test/ping event and its one delivery to ``target_id``."""
    event_id = new_id("evt")
    async with conn.transaction():
        await conn.execute(
            """
            INSERT INTO events (id, tenant_id, source_id, object_type, action, payload)
            VALUES ($1, $2, NULL, 'Test', 'ping', $3)
            """,
            event_id,
            tenant_id,
            payload,
        )
        ids = await add_deliveries(
            conn, tenant_id, event_id, [(target_id, None)], enqueue_grace_s=enqueue_grace_s
        )
    return event_id, ids[0] if ids else None
