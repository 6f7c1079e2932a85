"""Tenant endpoints for sources: where an upstream sends the tenant's events."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import pydantic
from aiohttp import web
from pydantic.json_schema import SkipJsonSchema

from relay.api.fields import Name, Username
from relay.api.routing import (
    ListQuery,
    Route,
    no_content,
    page,
    read_body,
    read_query,
    respond,
    tenant_id,
)
from relay.core import errors
from relay.core.crypto import new_id, new_source_secret, new_webhook_secret
from relay.store import sources as store
from relay.store.rows import Source
from relay.web.app_keys import CACHE, POOL, SECRETS, SETTINGS

HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$")


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)


class TokenAuth(_Strict):
    """`?token=<secret>` or `Authorization: Bearer <secret>`."""

    type: Literal["token"]


class BasicAuth(_Strict):
    """HTTP Basic with this username; the secret is the password."""

    type: Literal["basic"]
    username: Username


class HmacAuth(_Strict):
    """HMAC-SHA256 of the raw body (hex or base64) in ``header``, after ``prefix``."""

    type: Literal["hmac"]
    header: Annotated[str, pydantic.StringConstraints(pattern=HEADER_NAME.pattern)] = "X-Signature"
    prefix: Annotated[str, pydantic.StringConstraints(max_length=32, pattern=r"^[\x21-\x7e]*$")] = (
        ""
    )
    #: When set, the signature covers ``timestamp + "." + body`` and the timestamp
    #: (Unix seconds, in this header) must be within 5 minutes: a captured request
    #: cannot be replayed later.
    timestamp_header: (
        Annotated[str, pydantic.StringConstraints(pattern=HEADER_NAME.pattern)] | None
    ) = None


class StandardWebhooksAuth(_Strict):
    """webhook-id / webhook-timestamp / webhook-signature with a ``whsec_`` secret."""

    type: Literal["standard-webhooks"]


SourceAuth = Annotated[
    TokenAuth | BasicAuth | HmacAuth | StandardWebhooksAuth, pydantic.Field(discriminator="type")
]


def integral(value: Any) -> Any:
    """``39.0`` is the integer 39, as in JSON Schema; ``39.5`` stays refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: Most events (deliveries) per second: a JSON integer, whether written ``39`` or ``39.0``.
RateLimit = Annotated[int, pydantic.Field(gt=0, le=1_000_000), pydantic.BeforeValidator(integral)]


class SourceCreate(_Strict):
    """Body of POST /v1/sources."""

    name: Name
    auth: SourceAuth
    rate_limit: RateLimit | None = None


class SourcePatch(_Strict):
    """Body of PATCH /v1/sources/{id}: what is present changes; ``rate_limit: null`` clears."""

    # null is refused for name and auth (422): the schema says so.
    name: Name | SkipJsonSchema[None] = None
    auth: SourceAuth | SkipJsonSchema[None] = None
    rate_limit: RateLimit | None = None


def over_quota(kind: str, quota: int) -> errors.ValidationFailed:
    """The 422 for a create past the tenant's quota of ``kind`` (sources, targets)."""
    return errors.ValidationFailed(
        f"this tenant already has {quota} {kind}, the most allowed; delete one first",
        details=[{"field": "body", "message": f"at most {quota} {kind} per tenant"}],
    )


def _auth_config(auth: pydantic.BaseModel) -> dict[str, Any]:
    return auth.model_dump(exclude={"type"}, exclude_none=True)


def _new_secret(auth_type: str) -> str:
    return new_webhook_secret() if auth_type == "standard-webhooks" else new_source_secret()


def render_source(request: web.Request, row: Source) -> dict[str, Any]:
    """A source as the API shows it (no secret)."""
    return {
        "id": row.id,
        "name": row.name,
        "auth": {"type": row.auth_type, **row.auth_config},
        "rate_limit": row.rate_limit,
        "ingest_url": f"{request.app[SETTINGS].public_url}/in/{row.id}",
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


async def create_source(request: web.Request) -> web.Response:
    """Create a source; its secret is in this answer and on rotation only."""
    body = await read_body(request, SourceCreate)
    source_id = new_id("src")
    secret = _new_secret(body.auth.type)
    row = await store.create_source(
        request.app[POOL],
        tenant_id(request),
        source_id=source_id,
        name=body.name,
        auth_type=body.auth.type,
        auth_config=_auth_config(body.auth),
        secret_enc=request.app[SECRETS].seal(secret, bound_to=source_id),
        rate_limit=body.rate_limit,
        max_live=request.app[SETTINGS].max_sources_per_tenant,
    )
    if row is None:
        raise over_quota("sources", request.app[SETTINGS].max_sources_per_tenant)
    return respond({**render_source(request, row), "secret": secret}, status=201)


async def list_sources(request: web.Request) -> web.Response:
    """The tenant's sources, newest first."""
    query = read_query(request, ListQuery)
    rows, cursor = await store.list_sources(
        request.app[POOL], tenant_id(request), query.limit, query.cursor
    )
    return page([render_source(request, r) for r in rows], cursor)


async def _get_or_404(request: web.Request) -> Source:
    row = await store.get_source(
        request.app[POOL], tenant_id(request), request.match_info["source_id"]
    )
    if row is None:
        raise errors.NotFound("no such source")
    return row


async def get_source(request: web.Request) -> web.Response:
    """One source."""
    return respond(render_source(request, await _get_or_404(request)))


async def update_source(request: web.Request) -> web.Response:
    """Change a source's name, auth settings (same type) or rate limit."""
    body = await read_body(request, SourcePatch)
    current = await _get_or_404(request)
    changes: dict[str, Any] = {}
    for name in body.model_fields_set:
        if name == "auth":
            if body.auth is None:
                raise errors.ValidationFailed.field("auth", "may not be null")
            if body.auth.type != current.auth_type:
                # A valid body that conflicts with the source (the schema cannot say so): 409.
                raise errors.Conflict(
                    "auth.type cannot change; create a new source for another auth type",
                    details=[{"field": "auth.type", "message": "cannot change"}],
                )
            changes["auth_config"] = _auth_config(body.auth)
        elif name == "name":
            if body.name is None:
                raise errors.ValidationFailed.field("name", "may not be null")
            changes["name"] = body.name
        else:
            changes[name] = getattr(body, name)
    row = await store.update_source(request.app[POOL], tenant_id(request), current.id, changes)
    if row is None:
        raise errors.NotFound("no such source")
    request.app[CACHE].forget_source(row.id)
    return respond(render_source(request, row))


async def delete_source(request: web.Request) -> web.Response:
    """Delete a source: its ingest URL answers 404 from now on."""
    source_id = request.match_info["source_id"]
    if not await store.delete_source(request.app[POOL], tenant_id(request), source_id):
        raise errors.NotFound("no such source")
    request.app[CACHE].forget_source(source_id)
    return no_content()


async def rotate_source_secret(request: web.Request) -> web.Response:
    """A new secret; the previous one keeps working for RELAY_SECRET_OVERLAP_S."""
    current = await _get_or_404(request)
    secret = _new_secret(current.auth_type)
    row = await store.rotate_source_secret(
        request.app[POOL],
        tenant_id(request),
        current.id,
        request.app[SECRETS].seal(secret, bound_to=current.id),
    )
    if row is None:
        raise errors.NotFound("no such source")
    request.app[CACHE].forget_source(row.id)
    return respond({**render_source(request, row), "secret": secret})


ROUTES = [
    Route(
        "POST", "/v1/sources", create_source, "Create a source", "tenant", SourceCreate, status=201
    ),
    Route("GET", "/v1/sources", list_sources, "List sources", "tenant", query=ListQuery),
    Route("GET", "/v1/sources/{source_id}", get_source, "Get a source", "tenant"),
    Route(
        "PATCH", "/v1/sources/{source_id}", update_source, "Update a source", "tenant", SourcePatch
    ),
    Route(
        "DELETE", "/v1/sources/{source_id}", delete_source, "Delete a source", "tenant", status=204
    ),
    Route(
        "POST",
        "/v1/sources/{source_id}/rotate-secret",
        rotate_source_secret,
        "Rotate a source's secret",
        "tenant",
    ),
]
