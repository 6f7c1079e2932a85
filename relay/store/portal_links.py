"""Portal links: one-time, expiring console sign-ins for a tenant, kept as a hash of their token.

Every time is Postgres's ``now()``, so the gateways' clocks never decide
whether a link is still open. Opening a link is one conditional ``UPDATE``: of
any number of openings racing on any number of gateway processes, one finds
``used_at`` empty and sets it; the others find nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from relay.store.db import Queries
from relay.store.rows import Row

#: What a link is when someone opens it.
LinkState = Literal["open", "used", "expired"]
#: How long a tenant's expired links are kept (the refused page can say "expired") before
#: the tenant's next mint deletes them.
KEEP_EXPIRED_S = 86400


@dataclass(frozen=True, slots=True)
class PortalLink(Row):
    """A minted link (never its token or hash)."""

    id: str
    tenant_id: str
    read_only: bool
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class PortalGrant(Row):
    """What a link signs in as: its tenant, whether read-only, and until when."""

    id: str
    tenant_id: str
    tenant_name: str
    read_only: bool
    expires_at: datetime


async def create_portal_link(
    conn: Queries,
    tenant_id: str,
    link_id: str,
    token_hash: bytes,
    *,
    read_only: bool,
    expires_in_s: int,
) -> PortalLink | None:
    """Store a new link of ``tenant_id``; None if there is no such tenant.

    The tenant's links that expired more than ``KEEP_EXPIRED_S`` ago go in the
    same statement, so the table holds about a day of each tenant's links.
    """
    row = await conn.fetchrow(
        """
        WITH purged AS (
            DELETE FROM portal_links
            WHERE tenant_id = $1 AND expires_at < now() - make_interval(secs => $6)
        )
        INSERT INTO portal_links (id, tenant_id, token_hash, read_only, expires_at)
        SELECT $2, t.id, $3, $4, now() + make_interval(secs => $5) FROM tenants t WHERE t.id = $1
        RETURNING id, tenant_id, read_only, created_at, expires_at
        """,
        tenant_id,
        link_id,
        token_hash,
        read_only,
        expires_in_s,
        KEEP_EXPIRED_S,
    )
    return PortalLink.maybe(row)


async def look_up_portal_link(
    conn: Queries, token_hash: bytes
) -> tuple[PortalGrant, LinkState] | None:
    """The link with this token hash and whether it may still be opened; None if unknown.

    Uses nothing up: the console shows what a link opens before anyone presses its button.
    """
    row = await conn.fetchrow(
        """
        SELECT l.id, l.tenant_id, t.name AS tenant_name, l.read_only, l.expires_at,
               CASE WHEN l.used_at IS NOT NULL THEN 'used'
                    WHEN l.expires_at <= now() THEN 'expired'
                    ELSE 'open' END AS state
        FROM portal_links l JOIN tenants t ON t.id = l.tenant_id
        WHERE l.token_hash = $1
        """,
        token_hash,
    )
    if row is None:
        return None
    state: LinkState = row["state"]
    return PortalGrant.from_row(row), state


async def use_portal_link(conn: Queries, token_hash: bytes) -> PortalGrant | None:
    """Mark the link used and return what it grants, if it is unused and unexpired; else None.

    One statement: two openings at once, on any processes, cannot both get a grant.
    """
    row = await conn.fetchrow(
        """
        WITH used AS (
            UPDATE portal_links SET used_at = now()
            WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
            RETURNING id, tenant_id, read_only, expires_at
        )
        SELECT used.*, t.name AS tenant_name FROM used JOIN tenants t ON t.id = used.tenant_id
        """,
        token_hash,
    )
    return PortalGrant.maybe(row)


async def portal_session_grant(conn: Queries, link_id: str) -> PortalGrant | None:
    """What the used link ``link_id`` grants while it lasts (a console session's check)."""
    row = await conn.fetchrow(
        """
        SELECT l.id, l.tenant_id, t.name AS tenant_name, l.read_only, l.expires_at
        FROM portal_links l JOIN tenants t ON t.id = l.tenant_id
        WHERE l.id = $1 AND l.used_at IS NOT NULL AND l.expires_at > now()
        """,
        link_id,
    )
    return PortalGrant.maybe(row)
