"""Tenant endpoints for events: list, inspect, replay."""

from __future__ import annotations

import json
from typing import Annotated, Any

import pydantic
from aiohttp import web

from relay.api.deliveries import Id, Timestamp, render_delivery
from relay.api.routing import (
    ListQuery,
    Route,
    dumps,
    encoded_page,
    read_body,
    read_query,
    respond,
    respond_encoded,
    tenant_id,
)
from relay.core import errors, offload
from relay.ingest.parse import ParsedEvent
from relay.ingest.routes import EventKeys
from relay.store import deliveries as delivery_store
from relay.store import events as store
from relay.store import targets as target_store
from relay.store.rows import Event
from relay.store.targets import TargetKind
from relay.web.app_keys import ENQUEUER, POOL, SETTINGS

#: Payload bytes one page of ``GET /v1/events`` carries at most: payloads are included,
#: newest first, while they fit; the others are null (``GET /v1/events/{id}`` has them).
LIST_PAYLOAD_BYTES = 1024 * 1024
#: Deliveries an event's detail shows at most (its latest); the rest are listed at
#: ``GET /v1/deliveries?event_id=`` from ``deliveries_next_cursor``.
DETAIL_DELIVERIES = 100


class EventsQuery(ListQuery):
    """Filters of GET /v1/events (``since`` inclusive, ``until`` exclusive)."""

    source_id: Id | None = None
    object_type: Annotated[str, pydantic.StringConstraints(max_length=255)] | None = None
    action: Annotated[str, pydantic.StringConstraints(max_length=255)] | None = None
    since: Timestamp | None = None
    until: Timestamp | None = None


class EventReplay(pydantic.BaseModel):
    """Body of POST /v1/events/{id}/replay: absent ``target_ids`` means every matching target."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    target_ids: Annotated[list[Id], pydantic.Field(min_length=1, max_length=100)] | None = None


def encode_event(row: Event) -> bytes:
    """``render_event(row)`` as JSON text, its payload the stored JSON text itself.

    A payload is stored as JSON (the body as received, or a batch element made
    compact), so a list sends it as it is: parsing up to 1 MB of payloads to encode
    them again took a list of 500 events tens of milliseconds of the event loop.
    """
    head = dumps(
        {
            "id": row.id,
            "source_id": row.source_id,
            "received_at": row.received_at,
            "object_type": row.object_type,
            "action": row.action,
            "object_id": row.object_id,
        }
    ).encode()
    payload = b"null" if row.payload is None else bytes(row.payload)
    size = dumps(row.payload_size).encode()
    return head[:-1] + b',"payload":' + payload + b',"payload_size":' + size + b"}"


def _encode_list(rows: list[Event], cursor: str | None) -> bytes:
    return encoded_page([encode_event(r) for r in rows], cursor)


#: Events of a page encoded on the event loop; a bigger page is encoded in a thread
#: (relay/core/offload.py).
ENCODE_ON_LOOP = 50


def render_event(row: Event) -> dict[str, Any]:
    """An event with its payload as JSON (null: left out of a list) and the payload's size."""
    return {
        "id": row.id,
        "source_id": row.source_id,
        "received_at": row.received_at,
        "object_type": row.object_type,
        "action": row.action,
        "object_id": row.object_id,
        "payload": None if row.payload is None else json.loads(bytes(row.payload)),
        "payload_size": row.payload_size,
    }


async def list_events(request: web.Request) -> web.Response:
    """The tenant's events, newest first."""
    query = read_query(request, EventsQuery)
    rows, cursor = await store.list_events(
        request.app[POOL],
        tenant_id(request),
        limit=query.limit,
        cursor=query.cursor,
        source_id=query.source_id,
        object_type=query.object_type,
        action=query.action,
        since=query.since,
        until=query.until,
        payload_bytes=LIST_PAYLOAD_BYTES,
    )
    if len(rows) <= ENCODE_ON_LOOP:
        return respond_encoded(_encode_list(rows, cursor))
    return respond_encoded(await offload.run(_encode_list, rows, cursor))


async def _event_or_404(request: web.Request) -> Event:
    row = await store.get_event(
        request.app[POOL], tenant_id(request), request.match_info["event_id"]
    )
    if row is None:
        raise errors.NotFound("no such event")
    return row


async def get_event(request: web.Request) -> web.Response:
    """One event with its payload and latest deliveries (oldest first), and a cursor to the
    earlier ones."""
    row = await _event_or_404(request)
    deliveries, cursor = await delivery_store.deliveries_of_event(
        request.app[POOL], tenant_id(request), row.id, limit=DETAIL_DELIVERIES
    )
    return respond(
        {
            **render_event(row),
            "deliveries": [render_delivery(d) for d in reversed(deliveries)],
            "deliveries_next_cursor": cursor,
        }
    )


async def replay_event(request: web.Request) -> web.Response:
    """New deliveries of the event, with a fresh schedule."""
    body = await read_body(request, EventReplay, empty_ok=True)
    event = await _event_or_404(request)
    owner = tenant_id(request)
    pool = request.app[POOL]
    # an operational event goes to the operational targets, an upstream one to the others
    kind: TargetKind = "operational" if event.operational else "events"
    routes = (await target_store.routable_targets(pool, owner, kind=kind)).targets
    if body.target_ids is not None:
        wanted = list(dict.fromkeys(body.target_ids))
        live = {r.id for r in routes}
        unknown = [t for t in wanted if t not in live]
        if unknown:
            known = [
                t for t in unknown if await target_store.get_target(pool, owner, t) is not None
            ]
            reason = (
                ("disabled or not operational" if event.operational else "disabled or operational")
                if known
                else "unknown"
            )
            raise errors.ValidationFailed.field(
                "target_ids", f"{reason} targets: {', '.join(unknown)}"
            )
        targets = wanted
    else:
        targets = [
            r.id
            for r in routes
            if r.matches(event.source_id or "", event.object_type, event.action)
        ]
    # an ordered target's new delivery joins the back of its key's queue
    assert event.payload is not None  # one event is read with its payload
    parsed = ParsedEvent(
        payload=bytes(event.payload),
        uuid=None,
        date=None,
        object_type=event.object_type,
        action=event.action,
        object_id=event.object_id,
        tenant_ref=None,
    )
    by_id = {r.id: r for r in routes}
    keys = EventKeys(parsed)  # the payload parsed once, whatever the number of targets
    keyed = [(t, keys.at(by_id[t])) for t in targets]
    async with pool.acquire() as conn, conn.transaction():
        ids = await store.add_deliveries(
            conn, owner, event.id, keyed, enqueue_grace_s=request.app[SETTINGS].requeue_after_s
        )
    if ids:
        request.app[ENQUEUER].wake_soon((t, owner) for t in targets)
    return respond({"delivery_ids": ids}, status=202)


ROUTES = [
    Route("GET", "/v1/events", list_events, "List events", "tenant", query=EventsQuery),
    Route("GET", "/v1/events/{event_id}", get_event, "Get an event and its deliveries", "tenant"),
    Route(
        "POST",
        "/v1/events/{event_id}/replay",
        replay_event,
        "Replay an event",
        "tenant",
        EventReplay,
        status=202,
        body_optional=True,
    ),
]
