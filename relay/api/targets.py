"""Tenant endpoints for targets: where the tenant receives its events."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import pydantic
from aiohttp import web
from pydantic.json_schema import SkipJsonSchema
from yarl import URL

from relay.api.fields import WHITESPACE
from relay.api.routing import (
    ListQuery,
    Route,
    no_content,
    page,
    read_body,
    read_query,
    respond,
    tenant_id,
    timestamp,
)
from relay.api.sources import HEADER_NAME, RateLimit, integral, over_quota
from relay.core import errors
from relay.core.crypto import new_id, new_webhook_secret, open_headers, seal_headers
from relay.delivery.egress import EgressRefused, host_is_forbidden, parse_host
from relay.delivery.ordering import OnDead, Ordering, check_pointer
from relay.ingest.parse import compact
from relay.store import events as event_store
from relay.store import sources as source_store
from relay.store import targets as store
from relay.store.rows import Target
from relay.web.app_keys import CACHE, ENQUEUER, POOL, SECRETS, SETTINGS

MAX_URL = 2048
#: Headers a target may not set: hop-by-hop, framing, and what the relay signs.
FORBIDDEN_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "content-encoding",
    }
)

#: RFC 9110 field-value without obs-text: visible ASCII, space and tab.
HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")

#: How many attempts to one target may be in flight at once, across every worker.
MaxInFlight = Annotated[int, pydantic.Field(ge=1, le=1000), pydantic.BeforeValidator(integral)]


def _pointer(value: str) -> str:
    problem = check_pointer(value)
    if problem is not None:
        raise ValueError(problem)
    return value


#: A JSON pointer into the payload naming the ordering key (RFC 6901).
OrderingKey = Annotated[
    str,
    pydantic.StringConstraints(min_length=2, max_length=200, pattern=r"^/"),
    pydantic.AfterValidator(_pointer),
]

FilterValue = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=200)]

_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
#: What a target URL looks like: http(s), a host (name, IPv4 or [IPv6]), an optional
#: port and userinfo, then visible ASCII. Stated in the schema and enforced.
URL_PATTERN = (
    rf"^[Hh][Tt][Tt][Pp][Ss]?://([^@/?#\x00{WHITESPACE}]+@)?"
    # a DNS name (labels of 1 to 63 characters, an optional trailing dot) or an IPv6 literal
    r"((?:[A-Za-z0-9_~-]{1,63}\.)*[A-Za-z0-9_~-]{1,63}\.?|\[[0-9A-Fa-f:.]+\])"
    rf"(:{_PORT})?"
    r"([/?#][\x21-\x7e]*)?$"
)


def _any_case(word: str) -> str:
    """A regex matching ``word`` in any case (JSON Schema patterns have no flags)."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in word)


#: HEADER_NAME without the names a target may not set, for the schema.
_ALLOWED_HEADER_NAME = (
    "^(?!(" + "|".join(_any_case(h) for h in sorted(FORBIDDEN_HEADERS)) + ")$)"
    "(?!" + _any_case("webhook-") + ")" + HEADER_NAME.pattern.removeprefix("^")
)


def _check_url(value: str) -> str:
    if len(value) > MAX_URL:
        raise ValueError(f"at most {MAX_URL} characters")
    try:
        url = URL(value)
    except ValueError:
        raise ValueError("not a URL") from None
    if url.scheme not in ("http", "https") or not url.is_absolute():
        raise ValueError("must be an absolute http:// or https:// URL")
    if not url.host:
        raise ValueError("must have a host")
    try:
        parse_host(url.host)
    except EgressRefused as exc:
        raise ValueError(str(exc)) from None
    return value


def _check_headers(value: dict[str, str]) -> dict[str, str]:
    for name, header_value in value.items():
        lower = name.lower()
        if not HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid header name")
        if lower in FORBIDDEN_HEADERS or lower.startswith("webhook-"):
            raise ValueError(f"{name!r} may not be set by a target")
        if len(header_value) > 4096:
            raise ValueError(f"the value of {name!r} is longer than 4096 characters")
        if not HEADER_VALUE.fullmatch(header_value):
            raise ValueError(
                f"the value of {name!r} may hold only visible ASCII characters, spaces and tabs"
            )
    return value


TargetUrl = Annotated[
    str,
    pydantic.StringConstraints(max_length=MAX_URL, pattern=URL_PATTERN),
    pydantic.AfterValidator(_check_url),
    pydantic.Field(json_schema_extra={"format": "uri"}),
]
Headers = Annotated[
    dict[str, str],
    pydantic.Field(
        max_length=20,
        json_schema_extra={
            "propertyNames": {"pattern": _ALLOWED_HEADER_NAME},
            "additionalProperties": {
                "type": "string",
                "maxLength": 4096,
                "pattern": r"^[\t\x20-\x7e]*$",
            },
        },
    ),
    pydantic.AfterValidator(_check_headers),
]
Description = Annotated[str, pydantic.StringConstraints(max_length=1000)]
SourceIds = Annotated[
    list[Annotated[str, pydantic.StringConstraints(max_length=64)]],
    pydantic.Field(
        max_length=100,
        description="Only events of these sources. Each must name a live source of the "
        "tenant: an id that names none is 422, naming the field (a schema cannot say which "
        "ids exist).",
    ),
]


class TargetFilter(pydantic.BaseModel):
    """Which events a target wants; an absent or empty list matches everything."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    object_type: Annotated[list[FilterValue], pydantic.Field(max_length=100)] = pydantic.Field(
        default_factory=list, alias="objectType"
    )
    action: Annotated[list[FilterValue], pydantic.Field(max_length=100)] = pydantic.Field(
        default_factory=list
    )


TargetKind = Annotated[
    Literal["events", "operational"],
    pydantic.Field(
        description='"events": the tenant\'s upstream events; "operational": the relay\'s '
        "events about the tenant's targets and deliveries (Target disabled, circuit_opened, "
        "circuit_closed, recovered, key_blocked; Delivery dead), never an upstream event. "
        "Set at creation. An operational target is not ordered and names no sources."
    ),
]


class TargetCreate(pydantic.BaseModel):
    """Body of POST /v1/targets."""

    model_config = pydantic.ConfigDict(
        extra="forbid",
        strict=True,
        # an operational target receives the relay's events: not ordered, no sources
        json_schema_extra={
            "if": {"properties": {"kind": {"const": "operational"}}, "required": ["kind"]},
            "then": {"properties": {"ordering": {"const": "none"}, "source_ids": {"type": "null"}}},
        },
    )
    url: TargetUrl
    kind: TargetKind = "events"
    description: Description | None = None
    filter: TargetFilter | None = None
    source_ids: SourceIds | None = None
    headers: Headers | None = None
    rate_limit: RateLimit | None = None
    max_in_flight: MaxInFlight = 10
    ordering: Ordering = "none"
    ordering_key: OrderingKey | None = None
    on_dead: OnDead = "skip"
    enabled: bool = True


class TargetPatch(pydantic.BaseModel):
    """Body of PATCH /v1/targets/{id}: present fields change, null clears optional ones."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    # null is refused for url, filter, headers and enabled (422): the schema says so.
    url: TargetUrl | SkipJsonSchema[None] = None
    #: set at creation: the target's own kind is accepted (and changes nothing), another is 422
    kind: TargetKind | SkipJsonSchema[None] = None
    description: Description | None = None
    filter: TargetFilter | SkipJsonSchema[None] = None
    source_ids: SourceIds | None = None
    headers: Headers | SkipJsonSchema[None] = None
    rate_limit: RateLimit | None = None
    max_in_flight: MaxInFlight | SkipJsonSchema[None] = None
    ordering: Ordering | SkipJsonSchema[None] = None
    ordering_key: OrderingKey | None = None
    on_dead: OnDead | SkipJsonSchema[None] = None
    enabled: bool | SkipJsonSchema[None] = None


MASK = "••••"


def render_target(request: web.Request, row: Target) -> dict[str, Any]:
    """A target as the API shows it: no secret, header values masked."""
    headers = open_headers(request.app[SECRETS], row.id, row.headers_enc)
    return {
        "id": row.id,
        "kind": row.kind,
        "url": row.url,
        "description": row.description,
        "filter": {"objectType": row.filter_object_types, "action": row.filter_actions},
        "source_ids": row.source_ids,
        "headers": dict.fromkeys(headers, MASK),
        "rate_limit": row.rate_limit,
        "max_in_flight": row.max_in_flight,
        "ordering": row.ordering,
        "ordering_key": row.ordering_key,
        "on_dead": row.on_dead,
        "blocked": {"keys": row.blocked_keys, "waiting": row.blocked_waiting},
        "enabled": row.enabled,
        "disabled_reason": row.disabled_reason,
        "circuit": {
            "state": row.breaker,
            "reason": row.breaker_reason,
            "until": row.breaker_open_until,
        },
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


async def _check_destination(request: web.Request, url: str) -> None:
    if request.app[SETTINGS].allow_private_targets:
        return
    host = URL(url).host or ""
    try:
        forbidden = await host_is_forbidden(host)
    except EgressRefused as exc:
        raise errors.ValidationFailed.field("url", str(exc)) from None
    if forbidden:
        raise errors.ValidationFailed.field(
            "url", "resolves to a loopback, private, link-local or metadata address"
        )


async def _check_sources(request: web.Request, source_ids: list[str] | None) -> list[str] | None:
    if source_ids is None:
        return None
    unique = list(dict.fromkeys(source_ids))
    known = await source_store.live_source_ids(request.app[POOL], tenant_id(request), unique)
    missing = [s for s in unique if s not in known]
    if missing:
        raise errors.ValidationFailed.field("source_ids", f"unknown sources: {', '.join(missing)}")
    return unique


def _check_operational(kind: str, ordering: str, source_ids: list[str] | None) -> None:
    """An operational target receives the relay's events: no ordering key, no sources."""
    if kind != "operational":
        return
    if ordering != "none":
        raise errors.ValidationFailed.field(
            "ordering", 'an operational target is not ordered: "none" only'
        )
    if source_ids is not None:
        raise errors.ValidationFailed.field(
            "source_ids", "an operational target receives no upstream event: no sources"
        )


async def create_target(request: web.Request) -> web.Response:
    """Create a target; its signing secret is in this answer."""
    body = await read_body(request, TargetCreate)
    _check_operational(body.kind, body.ordering, body.source_ids)
    await _check_destination(request, body.url)
    source_ids = await _check_sources(request, body.source_ids)
    target_id = new_id("tgt")
    secret = new_webhook_secret()
    flt = body.filter or TargetFilter()
    row = await store.create_target(
        request.app[POOL],
        tenant_id(request),
        target_id=target_id,
        max_live=request.app[SETTINGS].max_targets_per_tenant,
        kind=body.kind,
        url=body.url,
        description=body.description,
        filter_object_types=flt.object_type,
        filter_actions=flt.action,
        source_ids=source_ids,
        headers_enc=seal_headers(request.app[SECRETS], target_id, body.headers or {}),
        rate_limit=body.rate_limit,
        max_in_flight=body.max_in_flight,
        ordering=body.ordering,
        ordering_key=body.ordering_key,
        on_dead=body.on_dead,
        enabled=body.enabled,
        disabled_reason=None if body.enabled else "disabled through the API",
        secret_enc=request.app[SECRETS].seal(secret, bound_to=target_id),
    )
    if row is None:
        raise over_quota("targets", request.app[SETTINGS].max_targets_per_tenant)
    request.app[CACHE].forget_tenant(tenant_id(request))
    return respond({**render_target(request, row), "secret": secret}, status=201)


async def list_targets(request: web.Request) -> web.Response:
    """The tenant's targets, newest first."""
    query = read_query(request, ListQuery)
    rows, cursor = await store.list_targets(
        request.app[POOL], tenant_id(request), query.limit, query.cursor
    )
    return page([render_target(request, r) for r in rows], cursor)


async def _get_or_404(request: web.Request) -> Target:
    row = await store.get_target(
        request.app[POOL], tenant_id(request), request.match_info["target_id"]
    )
    if row is None:
        raise errors.NotFound("no such target")
    return row


async def get_target(request: web.Request) -> web.Response:
    """One target."""
    return respond(render_target(request, await _get_or_404(request)))


async def update_target(request: web.Request) -> web.Response:
    """Change a target; ``enabled: true`` re-enables a disabled one."""
    body = await read_body(request, TargetPatch)
    current = await _get_or_404(request)
    changes: dict[str, Any] = {}
    fields = body.model_fields_set
    for required in ("url", "filter", "headers", "enabled", "max_in_flight", "ordering", "on_dead"):
        if required in fields and getattr(body, required) is None:
            raise errors.ValidationFailed.field(required, "may not be null")
    if "kind" in fields and body.kind != current.kind:
        raise errors.ValidationFailed.field(
            "kind", f'is set at creation: this target is "{current.kind}"'
        )
    _check_operational(
        current.kind,
        body.ordering or current.ordering,
        body.source_ids if "source_ids" in fields else current.source_ids,
    )
    if body.url is not None:
        await _check_destination(request, body.url)
        changes["url"] = body.url
    if "description" in fields:
        changes["description"] = body.description
    if body.filter is not None:
        changes["filter_object_types"] = body.filter.object_type
        changes["filter_actions"] = body.filter.action
    if "source_ids" in fields:
        changes["source_ids"] = await _check_sources(request, body.source_ids)
    if body.headers is not None:
        changes["headers_enc"] = seal_headers(request.app[SECRETS], current.id, body.headers)
    if "rate_limit" in fields:
        changes["rate_limit"] = body.rate_limit
    if body.max_in_flight is not None:
        changes["max_in_flight"] = body.max_in_flight
    if body.ordering is not None and body.ordering != current.ordering:
        changes["ordering"] = body.ordering
    if "ordering_key" in fields:
        changes["ordering_key"] = body.ordering_key
    if body.on_dead is not None and body.on_dead != current.on_dead:
        changes["on_dead"] = body.on_dead
    if body.enabled is not None and body.enabled != current.enabled:
        changes["enabled"] = body.enabled
        changes["disabled_reason"] = None if body.enabled else "disabled through the API"
        changes["failing_since"] = None
    async with request.app[POOL].acquire() as conn:
        row = await store.update_target(
            conn,
            tenant_id(request),
            current.id,
            changes,
            grace_s=request.app[SETTINGS].requeue_after_s,
        )
    if row is None:
        raise errors.NotFound("no such target")
    request.app[CACHE].forget_tenant(tenant_id(request))
    return respond(render_target(request, row))


async def delete_target(request: web.Request) -> web.Response:
    """Delete a target: nothing more is sent to it."""
    async with request.app[POOL].acquire() as conn:
        deleted = await store.delete_target(
            conn, tenant_id(request), request.match_info["target_id"]
        )
    if not deleted:
        raise errors.NotFound("no such target")
    request.app[CACHE].forget_tenant(tenant_id(request))
    return no_content()


async def get_target_secret(request: web.Request) -> web.Response:
    """The target's current signing secret."""
    row = await _get_or_404(request)
    return respond({"secret": request.app[SECRETS].open(row.secret_enc, bound_to=row.id)})


async def get_target_headers(request: web.Request) -> web.Response:
    """The target's custom headers with their values in clear."""
    row = await _get_or_404(request)
    return respond({"headers": open_headers(request.app[SECRETS], row.id, row.headers_enc)})


async def rotate_target_secret(request: web.Request) -> web.Response:
    """A new signing secret; deliveries carry both signatures during the overlap."""
    current = await _get_or_404(request)
    secret = new_webhook_secret()
    row = await store.rotate_target_secret(
        request.app[POOL],
        tenant_id(request),
        current.id,
        request.app[SECRETS].seal(secret, bound_to=current.id),
    )
    if row is None:
        raise errors.NotFound("no such target")
    return respond({"secret": secret})


def test_payload() -> bytes:
    """The body of a test event: a SoftLedger-shaped Test/ping (the API's and the console's)."""
    return compact(
        {
            "uuid": str(uuid.uuid4()),
            "date": timestamp(datetime.now(UTC)),
            "objectType": "Test",
            "action": "ping",
            "objectId": None,
            "tenantId": None,
        }
    )


async def test_target(request: web.Request) -> web.Response:
    """Send a synthetic Test/ping event to this target alone."""
    target = await _get_or_404(request)
    if not target.enabled:
        raise errors.Conflict("the target is disabled; enable it first")
    async with request.app[POOL].acquire() as conn:
        event_id, delivery_id = await event_store.create_test_event(
            conn,
            tenant_id(request),
            target.id,
            test_payload(),
            enqueue_grace_s=request.app[SETTINGS].requeue_after_s,
        )
    if delivery_id is None:  # deleted or disabled between the two statements
        raise errors.NotFound("no such target")
    request.app[ENQUEUER].wake_soon([(target.id, tenant_id(request))])
    return respond({"event_id": event_id, "delivery_id": delivery_id}, status=202)


ROUTES = [
    Route(
        "POST", "/v1/targets", create_target, "Create a target", "tenant", TargetCreate, status=201
    ),
    Route("GET", "/v1/targets", list_targets, "List targets", "tenant", query=ListQuery),
    Route("GET", "/v1/targets/{target_id}", get_target, "Get a target", "tenant"),
    Route(
        "PATCH", "/v1/targets/{target_id}", update_target, "Update a target", "tenant", TargetPatch
    ),
    Route(
        "DELETE", "/v1/targets/{target_id}", delete_target, "Delete a target", "tenant", status=204
    ),
    Route(
        "GET",
        "/v1/targets/{target_id}/secret",
        get_target_secret,
        "Get a target's signing secret",
        "tenant",
    ),
    Route(
        "GET",
        "/v1/targets/{target_id}/headers",
        get_target_headers,
        "Get a target's custom headers in clear",
        "tenant",
    ),
    Route(
        "POST",
        "/v1/targets/{target_id}/rotate-secret",
        rotate_target_secret,
        "Rotate a target's signing secret",
        "tenant",
    ),
    Route(
        "POST",
        "/v1/targets/{target_id}/test",
        test_target,
        "Send a test event to this target alone",
        "tenant",
        status=202,
    ),
]
