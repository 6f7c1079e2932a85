"""Tenant endpoint for operational events: what the relay told the tenant about its own
targets and deliveries (also sent to its targets of kind "operational")."""

from __future__ import annotations

import json
from typing import Annotated, Any

import pydantic
from aiohttp import web

from relay.api.deliveries import Timestamp
from relay.api.routing import ListQuery, Route, page, read_query, tenant_id
from relay.store import events as store
from relay.store.rows import Event
from relay.web.app_keys import POOL


class OperationalQuery(ListQuery):
    """Filters of GET /v1/operational-events (``since`` inclusive)."""

    since: Timestamp | None = None
    object_type: Annotated[str, pydantic.StringConstraints(max_length=255)] | None = None


def render_operational(row: Event) -> dict[str, Any]:
    """An operational event: what it is about and its ``data``, as its receivers get them."""
    body = json.loads(bytes(row.payload)) if row.payload is not None else {}
    return {
        "id": row.id,
        "uuid": body.get("uuid"),
        "object_type": row.object_type,
        "action": row.action,
        "object_id": row.object_id,
        "data": body.get("data", {}),
        "created_at": row.received_at,
    }


async def list_operational_events(request: web.Request) -> web.Response:
    """The tenant's operational events, newest first."""
    query = read_query(request, OperationalQuery)
    rows, cursor = await store.list_operational_events(
        request.app[POOL],
        tenant_id(request),
        limit=query.limit,
        cursor=query.cursor,
        object_type=query.object_type,
        since=query.since,
    )
    return page([render_operational(r) for r in rows], cursor)


ROUTES = [
    Route(
        "GET",
        "/v1/operational-events",
        list_operational_events,
        "List operational events",
        "tenant",
        query=OperationalQuery,
    ),
]
