"""Portal links: a tenant (or the operator for a tenant) mints a one-time console sign-in.

The link's URL carries a random token, shown in this answer only; the store
keeps its SHA-256. Opening the link is the console's business
(``relay/console/portal.py``).
"""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from aiohttp import web

from relay.api.routing import Route, read_body, respond, tenant_id
from relay.api.sources import integral
from relay.core import errors
from relay.core.crypto import hash_portal_token, new_id, new_portal_token
from relay.store import portal_links as store
from relay.store.portal_links import PortalLink
from relay.web.app_keys import POOL, SETTINGS

#: Where a link opens, under the public URL; the console routes it.
PORTAL_PATH = "/console/portal/"


class PortalLinkCreate(pydantic.BaseModel):
    """Body of POST /v1/portal-links and POST /v1/tenants/{id}/portal-links (may be absent)."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    expires_in: Annotated[int, pydantic.BeforeValidator(integral)] = pydantic.Field(
        900,
        ge=60,
        le=86400,
        description="Seconds the link may be opened in, and the most its session lasts.",
    )
    read_only: bool = pydantic.Field(
        False,
        description="The session shows everything and changes nothing: no replay, purge, "
        "rotate, enable/disable or test.",
    )


def render_portal_link(request: web.Request, row: PortalLink, token: str) -> dict[str, Any]:
    """A new link with its URL, shown once."""
    return {
        "id": row.id,
        "url": request.app[SETTINGS].public_url + PORTAL_PATH + token,
        "expires_at": row.expires_at,
        "read_only": row.read_only,
    }


async def _mint(request: web.Request, owner: str) -> web.Response:
    body = await read_body(request, PortalLinkCreate, empty_ok=True)
    token = new_portal_token()
    row = await store.create_portal_link(
        request.app[POOL],
        owner,
        new_id("prl"),
        hash_portal_token(token),
        read_only=body.read_only,
        expires_in_s=body.expires_in,
    )
    if row is None:
        raise errors.NotFound("no such tenant")
    return respond(render_portal_link(request, row, token), status=201)


async def create_portal_link(request: web.Request) -> web.Response:
    """A portal link into the calling tenant's console."""
    return await _mint(request, tenant_id(request))


async def create_tenant_portal_link(request: web.Request) -> web.Response:
    """A portal link into a tenant's console, minted by the operator."""
    return await _mint(request, request.match_info["tenant_id"])


ROUTES = [
    Route(
        "POST",
        "/v1/portal-links",
        create_portal_link,
        "Create a portal link into the tenant's console",
        "tenant",
        PortalLinkCreate,
        status=201,
        body_optional=True,
    ),
    Route(
        "POST",
        "/v1/tenants/{tenant_id}/portal-links",
        create_tenant_portal_link,
        "Create a portal link into a tenant's console",
        "operator",
        PortalLinkCreate,
        status=201,
        body_optional=True,
    ),
]
