"""Operator endpoints for tenants and their API keys."""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from aiohttp import web

from relay.api.fields import Name
from relay.api.routing import ListQuery, Route, no_content, page, read_body, read_query, respond
from relay.api.sources import integral
from relay.core import errors
from relay.core.config import MAX_PER_S
from relay.core.crypto import hash_api_key, new_api_key, new_id
from relay.store import tenants as store
from relay.store.rows import ApiKey, Tenant
from relay.web.app_keys import POOL

#: A budget per second: a JSON integer, whether written ``39`` or ``39.0``, of at most
#: the relay's largest (bytes, a bigint column) or an integer column's range (counts).
BytesPerSecond = Annotated[
    int, pydantic.Field(ge=0, le=MAX_PER_S), pydantic.BeforeValidator(integral)
]
CountPerSecond = Annotated[
    int, pydantic.Field(ge=0, le=(1 << 31) - 1), pydantic.BeforeValidator(integral)
]


class TenantCreate(pydantic.BaseModel):
    """Body of POST /v1/tenants."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    name: Name


class TenantLimits(pydantic.BaseModel):
    """A tenant's budget on the shared relay; null (or absent at creation): the relay's
    default (RELAY_TENANT_INGEST_BYTES_PER_S, RELAY_TENANT_DELIVERIES_PER_S,
    RELAY_TENANT_API_REQUESTS_PER_S); 0: none for this tenant, whatever the default."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    #: body bytes its sources may send per second, all gateway processes together
    ingest_bytes_per_s: BytesPerSecond | None = None
    #: deliveries its ingest may create per second (a second's worth may go at once)
    deliveries_per_s: CountPerSecond | None = None
    #: requests with its API keys per second (a second's worth may go at once)
    api_requests_per_s: CountPerSecond | None = None


class TenantPatch(pydantic.BaseModel):
    """Body of PATCH /v1/tenants/{id}: present fields change; in ``limits``, null means
    the relay's default."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    # absent: unchanged (the default None, which pydantic does not validate); null is
    # refused with a 422 naming the field alone (a union with None would name its branch)
    name: Name = pydantic.Field(default=None)  # type: ignore[assignment]
    limits: TenantLimits = pydantic.Field(default=None)  # type: ignore[assignment]


def render_tenant(row: Tenant) -> dict[str, Any]:
    """A tenant as the API shows it (never a key), with its budget (null: the default)."""
    return {
        **_created(row),
        "limits": {
            "ingest_bytes_per_s": row.ingest_bytes_per_s,
            "deliveries_per_s": row.deliveries_per_s,
            "api_requests_per_s": row.api_requests_per_s,
        },
    }


def _created(row: Tenant) -> dict[str, Any]:
    """What POST /v1/tenants answers of the tenant, exactly API.md's fields."""
    return {"id": row.id, "name": row.name, "created_at": row.created_at}


def render_key(row: ApiKey) -> dict[str, Any]:
    """An API key's metadata (never the key or its hash)."""
    return {"id": row.id, "created_at": row.created_at, "revoked_at": row.revoked_at}


async def create_tenant(request: web.Request) -> web.Response:
    """Create a tenant with its first API key, shown once."""
    body = await read_body(request, TenantCreate)
    api_key = new_api_key()
    async with request.app[POOL].acquire() as conn:
        tenant, key = await store.create_tenant(
            conn, new_id("ten"), body.name, new_id("key"), hash_api_key(api_key)
        )
    return respond({**_created(tenant), "api_key": api_key, "api_key_id": key.id}, status=201)


async def list_tenants(request: web.Request) -> web.Response:
    """All tenants, newest first."""
    query = read_query(request, ListQuery)
    rows, cursor = await store.list_tenants(request.app[POOL], query.limit, query.cursor)
    return page([render_tenant(r) for r in rows], cursor)


async def get_tenant(request: web.Request) -> web.Response:
    """One tenant."""
    row = await store.get_tenant(request.app[POOL], request.match_info["tenant_id"])
    if row is None:
        raise errors.NotFound("no such tenant")
    return respond(render_tenant(row))


async def update_tenant(request: web.Request) -> web.Response:
    """Rename a tenant or change its budget; every gateway process applies a new budget
    to the next request."""
    body = await read_body(request, TenantPatch)
    changes: dict[str, Any] = {}
    if body.name is not None:
        changes["name"] = body.name
    if body.limits is not None:
        for name in body.limits.model_fields_set:
            changes[name] = getattr(body.limits, name)
    tenant_id = request.match_info["tenant_id"]
    pool = request.app[POOL]
    if changes:
        row = await store.update_tenant(pool, tenant_id, changes)
    else:
        row = await store.get_tenant(pool, tenant_id)
    if row is None:
        raise errors.NotFound("no such tenant")
    return respond(render_tenant(row))


async def create_api_key(request: web.Request) -> web.Response:
    """Another API key for a tenant, shown once."""
    api_key = new_api_key()
    row = await store.create_api_key(
        request.app[POOL], request.match_info["tenant_id"], new_id("key"), hash_api_key(api_key)
    )
    if row is None:
        raise errors.NotFound("no such tenant")
    return respond({"id": row.id, "api_key": api_key, "created_at": row.created_at}, 201)


async def list_api_keys(request: web.Request) -> web.Response:
    """A tenant's keys: ids and dates, never a key."""
    pool = request.app[POOL]
    tenant_id = request.match_info["tenant_id"]
    query = read_query(request, ListQuery)
    if await store.get_tenant(pool, tenant_id) is None:
        raise errors.NotFound("no such tenant")
    rows, cursor = await store.list_api_keys(pool, tenant_id, query.limit, query.cursor)
    return page([render_key(r) for r in rows], cursor)


async def revoke_api_key(request: web.Request) -> web.Response:
    """Revoke a key: it fails on the next request."""
    revoked = await store.revoke_api_key(
        request.app[POOL], request.match_info["tenant_id"], request.match_info["key_id"]
    )
    if not revoked:
        raise errors.NotFound("no such API key")
    return no_content()


ROUTES = [
    Route(
        "POST",
        "/v1/tenants",
        create_tenant,
        "Create a tenant",
        "operator",
        TenantCreate,
        status=201,
    ),
    Route("GET", "/v1/tenants", list_tenants, "List tenants", "operator", query=ListQuery),
    Route("GET", "/v1/tenants/{tenant_id}", get_tenant, "Get a tenant", "operator"),
    Route(
        "PATCH",
        "/v1/tenants/{tenant_id}",
        update_tenant,
        "Rename a tenant or change its budget",
        "operator",
        TenantPatch,
    ),
    Route(
        "GET",
        "/v1/tenants/{tenant_id}/api-keys",
        list_api_keys,
        "List a tenant's API keys",
        "operator",
        query=ListQuery,
    ),
    Route(
        "POST",
        "/v1/tenants/{tenant_id}/api-keys",
        create_api_key,
        "Create an API key",
        "operator",
        status=201,
    ),
    Route(
        "DELETE",
        "/v1/tenants/{tenant_id}/api-keys/{key_id}",
        revoke_api_key,
        "Revoke an API key",
        "operator",
        status=204,
    ),
]
