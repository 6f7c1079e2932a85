"""The route table: each API module declares its routes here once, with their auth.

The same declarations register the aiohttp routes and produce the OpenAPI
document, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import pydantic
import redis.exceptions
from aiohttp import web

from relay.core import errors, strict_json
from relay.core.auth_throttle import MANAGEMENT
from relay.core.crypto import constant_time_equals, hash_api_key
from relay.core.ratelimit import budget_of, spend_budget
from relay.store import tenants as tenant_store
from relay.store.db import POSTGRES_DOWN
from relay.web.app_keys import LIMITER, POOL, SETTINGS, TENANT_ID, THROTTLE

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Every id the relay makes: a type prefix and a ULID (relay.crypto.new_id).
ID_PATTERN = r"^[a-z]{3}_[0-9A-HJKMNP-TV-Z]{26}$"
_ID = re.compile(ID_PATTERN)
Auth = Literal["operator", "tenant", "none", "source"]
M = TypeVar("M", bound=pydantic.BaseModel)


@dataclass(frozen=True)
class Route:
    """One endpoint: what it is, who may call it, and what it takes."""

    method: str
    path: str
    handler: Handler
    summary: str
    auth: Auth
    body: type[pydantic.BaseModel] | None = None
    query: type[pydantic.BaseModel] | None = None
    status: int = 200
    tags: tuple[str, ...] = field(default_factory=tuple)
    #: The handler takes an absent body as ``{}`` (``read_body(..., empty_ok=True)``).
    body_optional: bool = False


def add_routes(app: web.Application, routes: list[Route]) -> None:
    """Register ``routes`` with their authentication wrapped around the handler."""
    for route in routes:
        app.router.add_route(route.method, route.path, _with_ids_checked(_with_auth(route)))


def _with_ids_checked(handler: Handler) -> Handler:
    """A path id that is not an id is a missing thing (404), found without a query."""

    async def checked(request: web.Request) -> web.StreamResponse:
        for name, value in request.match_info.items():
            if name.endswith("_id") and not _ID.match(value):
                raise errors.NotFound()
        return await handler(request)

    return checked


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _with_auth(route: Route) -> Handler:
    handler = route.handler
    if route.auth == "operator":

        async def operator(request: web.Request) -> web.StreamResponse:
            token = _bearer(request)
            expected = request.app[SETTINGS].admin_token
            throttle = request.app[THROTTLE]
            if token is None or not expected or not constant_time_equals(token, expected):
                if token is not None:  # a value was tried: it costs the guesser
                    await throttle.failed("operator", MANAGEMENT, request.remote)
                raise errors.Unauthorized("a valid operator token is required")
            await throttle.admit("operator", MANAGEMENT, request.remote)
            return await handler(request)

        return operator
    if route.auth == "tenant":

        async def tenant(request: web.Request) -> web.StreamResponse:
            token = _bearer(request)
            if token is None:
                raise errors.Unauthorized("a tenant API key is required")
            app = request.app
            holder = await tenant_store.key_holder(app[POOL], hash_api_key(token))
            throttle = app[THROTTLE]
            if holder is None:
                await throttle.failed("api_key", MANAGEMENT, request.remote)
                raise errors.Unauthorized("invalid or revoked API key")
            await throttle.admit("api_key", MANAGEMENT, request.remote)
            rate = budget_of(holder.api_requests_per_s, app[SETTINGS].tenant_api_requests_per_s)
            if rate is not None:
                # the tenant's budget of API requests, one for every process (a second's
                # worth may go at once): a client listing in a loop cannot take the gateway
                await spend_budget(
                    app[LIMITER],
                    "api_requests",
                    holder.tenant_id,
                    rate=rate,
                    burst=rate,
                    units=1,
                    unit="API requests",
                )
            request[TENANT_ID] = holder.tenant_id
            return await handler(request)

        return tenant
    return handler


def tenant_id(request: web.Request) -> str:
    """The authenticated tenant (never taken from the body or the path)."""
    return request[TENANT_ID]


# --- bodies and queries ---------------------------------------------------


def validation_details(exc: pydantic.ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as API.md's per-field ``details``."""
    details = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(part) for part in error["loc"] if part not in ("body",))
        details.append({"field": loc or "body", "message": error["msg"]})
    return details


def _invalid(exc: pydantic.ValidationError) -> errors.ValidationFailed:
    details = validation_details(exc)
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:3])
    return errors.ValidationFailed(summary or "invalid input", details=details)


#: Failures of a dependency, not of the request: the API answers 503, the console
#: its error page (unless the caller itself is gone: ``caller_gone``).
DEPENDENCY_ERRORS = (
    *POSTGRES_DOWN,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
#: The status logged and counted for a request whose caller hung up before its
#: answer (nginx's 499): neither the caller's error nor the relay's.
CALLER_GONE = 499


def caller_gone(request: web.Request, exc: BaseException) -> bool:
    """Whether ``exc`` is the caller hanging up before its answer, not a failure.

    aiohttp then fails the body's read with ConnectionResetError (an OSError, as
    Postgres's are), or cancels the handler under ``handler_cancellation``.
    """
    if not isinstance(exc, ConnectionResetError | asyncio.CancelledError):
        return False
    transport = request.transport
    return transport is None or transport.is_closing()


def is_json_content_type(request: web.Request) -> bool:
    """True for application/json and application/*+json."""
    ctype = request.content_type.lower()
    return ctype == "application/json" or (
        ctype.startswith("application/") and ctype.endswith("+json")
    )


async def read_json(request: web.Request) -> Any:
    """The request's JSON body: 415 if not JSON, 400 if not standard JSON, 422 for bad text."""
    if not is_json_content_type(request):
        raise errors.UnsupportedMediaType()
    raw = await request.read()
    try:
        return strict_json.loads(raw)
    except strict_json.BadString as exc:
        raise errors.ValidationFailed.field(exc.path or "body", exc.message) from None
    except strict_json.NotStandardJSON as exc:
        raise errors.InvalidJSON(str(exc)) from None


async def read_body(request: web.Request, model: type[M], *, empty_ok: bool = False) -> M:
    """Parse and validate the body into ``model`` (400/415/422 on bad input)."""
    if empty_ok and not request.can_read_body:
        data: Any = {}
    else:
        data = await read_json(request)
    if not isinstance(data, dict):
        raise errors.InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _invalid(exc) from None


def read_query(request: web.Request, model: type[M]) -> M:
    """Validate the query string into ``model`` (422 naming each bad parameter)."""
    for name, value in request.query.items():
        if (
            problem := strict_json.string_problem(name) or strict_json.string_problem(value)
        ) is not None:
            raise errors.ValidationFailed.field(name.encode("utf-8", "replace").decode(), problem)
    try:
        return model.model_validate(dict(request.query))
    except pydantic.ValidationError as exc:
        raise _invalid(exc) from None


class ListQuery(pydantic.BaseModel):
    """``?limit=&cursor=`` of every list."""

    model_config = pydantic.ConfigDict(extra="forbid")

    limit: int = pydantic.Field(50, ge=1, le=500)
    #: A cursor is the id of the last row of the previous page.
    cursor: str | None = pydantic.Field(None, pattern=ID_PATTERN)


# --- answers ----------------------------------------------------------------


def timestamp(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with milliseconds: ``2026-11-28T12:00:00.123Z``.

    (``isoformat`` in C, and no conversion of a value already in UTC, as asyncpg
    answers them: a list of 500 events formatted 1,500 timestamps with strftime.)
    """
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(timespec="milliseconds")[:-6] + "Z"


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return timestamp(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# One encoder for every answer: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(default=_default, separators=(",", ":"))


def dumps(data: Any) -> str:
    """JSON text for an answer."""
    return _ENCODER.encode(data)


def respond(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON answer."""
    return web.json_response(data, status=status, headers=headers, dumps=dumps)


def page(data: list[Any], next_cursor: str | None) -> web.Response:
    """A list answer: ``{"data": [...], "next_cursor": ...}``."""
    return respond({"data": data, "next_cursor": next_cursor})


def encoded_page(items: list[bytes], next_cursor: str | None) -> bytes:
    """The JSON text of ``page``'s answer, its items already encoded."""
    return (
        b'{"data":[' + b",".join(items) + b'],"next_cursor":' + dumps(next_cursor).encode() + b"}"
    )


def respond_encoded(body: bytes) -> web.Response:
    """A 200 JSON answer whose text is ``body`` (as ``respond`` would send it)."""
    return web.Response(body=body, content_type="application/json", charset="utf-8")


def no_content() -> web.Response:
    """204."""
    return web.Response(status=204)
