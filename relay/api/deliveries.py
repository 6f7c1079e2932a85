"""Tenant endpoints for deliveries and dead letters, and the shared replay logic."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import pydantic
from aiohttp import web

from relay.api import responses
from relay.api.routing import ListQuery, Route, page, read_body, read_query, respond, tenant_id
from relay.core import errors
from relay.delivery.wakeups import REPLAY_ACTOR, REPLAY_QUEUE
from relay.store import dead_letters
from relay.store import deliveries as store
from relay.store.dead_letters import DeadLetterFilter
from relay.store.rows import AttemptRecord, Delivery
from relay.web.app_keys import ENQUEUER, POOL, SETTINGS

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]")


def _date_time_text(value: Any) -> Any:
    """Only RFC 3339 text, as the schema says (lax pydantic would take ``0`` as 1970)."""
    if not isinstance(value, str) or not _DATE.match(value):
        raise ValueError("must be an RFC 3339 date-time such as 2026-11-28T12:00:00Z")
    return value


def _in_range(value: datetime) -> datetime:
    """A date Postgres and Python can hold once in UTC (``0001-01-01T00:00:00+14:00`` is not)."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None


Timestamp = Annotated[
    pydantic.AwareDatetime,
    pydantic.Strict(False),
    pydantic.BeforeValidator(_date_time_text),
    pydantic.AfterValidator(_in_range),
]
Id = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=64)]
#: Replays by id are done in the request; larger selections by a worker job.
MAX_REPLAY_IDS = 1000
#: Attempts a delivery's detail shows at most (its latest); the rest are listed at
#: ``GET /v1/deliveries/{id}/attempts`` from ``attempts_next_cursor``.
DETAIL_ATTEMPTS = 100


#: The fields a delivery shows: declared once, by the API's model of it (and its OpenAPI
#: schema); the store's row has each of them (tests/unit/test_rows.py).
DELIVERY_FIELDS = tuple(responses.Delivery.model_fields)


def render_delivery(row: Delivery) -> dict[str, Any]:
    """A delivery as API.md shows it (``blocked_by`` while it waits behind another,
    ``waiting_for`` while something holds it)."""
    shown = {name: getattr(row, name) for name in DELIVERY_FIELDS}
    for optional in ("blocked_by", "waiting_for"):
        if shown[optional] is None:
            del shown[optional]
    return shown


def render_attempt(row: AttemptRecord) -> dict[str, Any]:
    """One attempt: when, how long, what came back."""
    return dataclasses.asdict(row)


class DeliveriesQuery(ListQuery):
    """Filters of GET /v1/deliveries."""

    status: Literal["pending", "retrying", "succeeded", "dead"] | None = None
    target_id: Id | None = None
    event_id: Id | None = None


class DeadLettersQuery(ListQuery):
    """Filters of GET /v1/dead-letters."""

    target_id: Id | None = None


class DeadLetterReplay(pydantic.BaseModel):
    """Body of POST /v1/dead-letters/replay: what is given narrows the selection."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    target_id: Id | None = None
    ids: Annotated[list[Id], pydantic.Field(min_length=1, max_length=MAX_REPLAY_IDS)] | None = None
    since: Timestamp | None = None


class DeletedTargetLetters(errors.ValidationFailed):
    """Some dead letters to replay are a deleted target's: nothing is replayed."""

    def __init__(self, ids: list[str]) -> None:
        message = f"dead letters of deleted targets, never sent again: {', '.join(ids)}"
        super().__init__(f"ids: {message}", details=[{"field": "ids", "message": message}])
        self.ids = ids


async def replay_dead_letters(
    request: web.Request,
    owner: str | None,
    *,
    target_id: str | None,
    since: datetime | None,
    ids: list[str] | None,
) -> int:
    """Replay a selection of dead letters (``owner`` None: every tenant's); return the count.

    A deleted target's dead letters are never replayed: named by ``ids``, they are
    a 422 naming them (nothing replayed); selected by target or time, not counted.
    """
    app = request.app
    grace = app[SETTINGS].requeue_after_s
    async with app[POOL].acquire() as conn:
        if ids is not None:
            gone = await dead_letters.dead_letters_of_deleted_targets(conn, owner, ids)
            if gone:
                raise DeletedTargetLetters(gone)
            replayed = await dead_letters.replay_dead_letters_batch(
                conn,
                owner,
                target_id=target_id,
                since=since,
                ids=ids,
                up_to_id=None,
                batch=len(ids),
                enqueue_grace_s=grace,
            )
            app[ENQUEUER].wake_soon(r.wake for r in replayed)
            return len(replayed)
        up_to = await dead_letters.newest_dead_letter_id(conn)
        if up_to is None:
            return 0
        # what the job will select: a deleted target's dead letters are not replayed
        selection = DeadLetterFilter(
            target_id=target_id, since=since, up_to_id=up_to, replayable=True
        )
        count = await dead_letters.count_dead_letters(conn, owner, selection)
    if count:
        job = {
            "tenant_id": owner,
            "target_id": target_id,
            "since": since.isoformat() if since else None,
            "up_to_id": up_to,
        }
        if not await app[ENQUEUER].enqueue_job(REPLAY_QUEUE, REPLAY_ACTOR, job):
            raise errors.Unavailable("the broker is unreachable; nothing was replayed")
    return count


async def list_deliveries(request: web.Request) -> web.Response:
    """The tenant's deliveries, newest first."""
    query = read_query(request, DeliveriesQuery)
    rows, cursor = await store.list_deliveries(
        request.app[POOL],
        tenant_id(request),
        limit=query.limit,
        cursor=query.cursor,
        status=query.status,
        target_id=query.target_id,
        event_id=query.event_id,
    )
    return page([render_delivery(r) for r in rows], cursor)


async def _delivery_or_404(request: web.Request) -> Delivery:
    row = await store.get_delivery(
        request.app[POOL], tenant_id(request), request.match_info["delivery_id"]
    )
    if row is None:
        raise errors.NotFound("no such delivery")
    return row


async def get_delivery(request: web.Request) -> web.Response:
    """One delivery with its latest attempts (oldest first) and a cursor to the earlier ones."""
    row = await _delivery_or_404(request)
    attempts, cursor = await store.attempts_page(request.app[POOL], row.id, limit=DETAIL_ATTEMPTS)
    return respond(
        {
            **render_delivery(row),
            "attempts": [render_attempt(a) for a in reversed(attempts)],
            "attempts_next_cursor": cursor,
        }
    )


async def list_attempts(request: web.Request) -> web.Response:
    """A delivery's attempts, newest first."""
    query = read_query(request, ListQuery)
    row = await _delivery_or_404(request)
    attempts, cursor = await store.attempts_page(
        request.app[POOL], row.id, limit=query.limit, cursor=query.cursor
    )
    return page([render_attempt(a) for a in attempts], cursor)


async def retry_delivery(request: web.Request) -> web.Response:
    """Send one delivery again, with a fresh schedule."""
    pool = request.app[POOL]
    delivery_id = request.match_info["delivery_id"]
    try:
        async with pool.acquire() as conn:
            row = await store.retry_delivery(
                conn,
                tenant_id(request),
                delivery_id,
                enqueue_grace_s=request.app[SETTINGS].requeue_after_s,
            )
    except store.TargetDeleted:
        raise errors.ValidationFailed.field(
            "delivery_id", f"{delivery_id} belongs to a deleted target and is never sent again"
        ) from None
    if row is None:
        if await store.get_delivery(pool, tenant_id(request), delivery_id) is None:
            raise errors.NotFound("no such delivery")
        raise errors.Conflict("an attempt of this delivery is in flight; retry when it ends")
    request.app[ENQUEUER].wake_soon([(row.target_id, row.tenant_id)])
    return respond(render_delivery(row), status=202)


async def list_dead_letters(request: web.Request) -> web.Response:
    """The tenant's dead deliveries, newest first."""
    query = read_query(request, DeadLettersQuery)
    rows, cursor = await dead_letters.list_dead_letters(
        request.app[POOL],
        tenant_id(request),
        DeadLetterFilter(target_id=query.target_id),
        limit=query.limit,
        cursor=query.cursor,
    )
    return page([render_delivery(r) for r in rows], cursor)


async def replay_tenant_dead_letters(request: web.Request) -> web.Response:
    """Replay the tenant's dead letters by ids, target or time; 202 with the count."""
    body = await read_body(request, DeadLetterReplay, empty_ok=True)
    count = await replay_dead_letters(
        request, tenant_id(request), target_id=body.target_id, since=body.since, ids=body.ids
    )
    return respond({"replayed": count}, status=202)


ROUTES = [
    Route(
        "GET", "/v1/deliveries", list_deliveries, "List deliveries", "tenant", query=DeliveriesQuery
    ),
    Route(
        "GET",
        "/v1/deliveries/{delivery_id}",
        get_delivery,
        "Get a delivery and its latest attempts",
        "tenant",
    ),
    Route(
        "GET",
        "/v1/deliveries/{delivery_id}/attempts",
        list_attempts,
        "List a delivery's attempts",
        "tenant",
        query=ListQuery,
    ),
    Route(
        "POST",
        "/v1/deliveries/{delivery_id}/retry",
        retry_delivery,
        "Retry a delivery",
        "tenant",
        status=202,
    ),
    Route(
        "GET",
        "/v1/dead-letters",
        list_dead_letters,
        "List dead letters",
        "tenant",
        query=DeadLettersQuery,
    ),
    Route(
        "POST",
        "/v1/dead-letters/replay",
        replay_tenant_dead_letters,
        "Replay dead letters",
        "tenant",
        DeadLetterReplay,
        status=202,
        body_optional=True,
    ),
]
