"""Operator endpoints across tenants: dead letters and stats."""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from aiohttp import web

from relay.api.deliveries import MAX_REPLAY_IDS, Id, Timestamp, render_delivery, replay_dead_letters
from relay.api.routing import ListQuery, Route, page, read_body, read_query, respond
from relay.store import dead_letters, housekeeping
from relay.store.dead_letters import DeadLetterFilter
from relay.store.rows import Delivery
from relay.web.app_keys import POOL


class AdminDeadLettersQuery(ListQuery):
    """Filters of GET /v1/admin/dead-letters."""

    tenant_id: Id | None = None
    target_id: Id | None = None


class AdminDeadLetterReplay(pydantic.BaseModel):
    """Body of POST /v1/admin/dead-letters/replay."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    tenant_id: Id | None = None
    target_id: Id | None = None
    ids: Annotated[list[Id], pydantic.Field(min_length=1, max_length=MAX_REPLAY_IDS)] | None = None
    since: Timestamp | None = None


def render_dead_letter(row: Delivery) -> dict[str, Any]:
    """A dead delivery with its tenant (operators see every tenant's)."""
    return {**render_delivery(row), "tenant_id": row.tenant_id}


async def list_all_dead_letters(request: web.Request) -> web.Response:
    """Dead deliveries of every tenant, newest first."""
    query = read_query(request, AdminDeadLettersQuery)
    rows, cursor = await dead_letters.list_dead_letters(
        request.app[POOL],
        query.tenant_id,
        DeadLetterFilter(target_id=query.target_id),
        limit=query.limit,
        cursor=query.cursor,
    )
    return page([render_dead_letter(r) for r in rows], cursor)


async def replay_all_dead_letters(request: web.Request) -> web.Response:
    """Replay dead letters of any tenant; 202 with the count."""
    body = await read_body(request, AdminDeadLetterReplay, empty_ok=True)
    count = await replay_dead_letters(
        request, body.tenant_id, target_id=body.target_id, since=body.since, ids=body.ids
    )
    return respond({"replayed": count}, status=202)


async def get_stats(request: web.Request) -> web.Response:
    """Deliveries by status, the oldest due delivery's age, dead letters per tenant."""
    return respond(await housekeeping.stats(request.app[POOL]))


ROUTES = [
    Route(
        "GET",
        "/v1/admin/dead-letters",
        list_all_dead_letters,
        "List every tenant's dead letters",
        "operator",
        query=AdminDeadLettersQuery,
    ),
    Route(
        "POST",
        "/v1/admin/dead-letters/replay",
        replay_all_dead_letters,
        "Replay dead letters of any tenant",
        "operator",
        AdminDeadLetterReplay,
        status=202,
        body_optional=True,
    ),
    Route("GET", "/v1/admin/stats", get_stats, "Delivery statistics", "operator"),
]
