"""Tenants and their API keys."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from relay.store.db import Conn, Queries
from relay.store.rows import ApiKey, Tenant
from relay.store.sql import keyset_page


async def create_tenant(
    conn: Conn, tenant_id: str, name: str, key_id: str, key_hash: bytes
) -> tuple[Tenant, ApiKey]:
    """Insert a tenant and its first API key, atomically."""
    async with conn.transaction():
        tenant = await conn.fetchrow(
            "INSERT INTO tenants (id, name) VALUES ($1, $2) RETURNING *", tenant_id, name
        )
        key = await conn.fetchrow(
            "INSERT INTO api_keys (id, tenant_id, key_hash) VALUES ($1, $2, $3) RETURNING *",
            key_id,
            tenant_id,
            key_hash,
        )
    assert tenant is not None and key is not None  # INSERT … RETURNING: one row each
    return Tenant.from_row(tenant), ApiKey.from_row(key)


async def get_tenant(conn: Queries, tenant_id: str) -> Tenant | None:
    """One tenant, or None."""
    return Tenant.maybe(await conn.fetchrow("SELECT * FROM tenants WHERE id = $1", tenant_id))


#: What PATCH /v1/tenants/{id} may change.
_UPDATABLE = frozenset({"name", "ingest_bytes_per_s", "deliveries_per_s", "api_requests_per_s"})


async def update_tenant(conn: Queries, tenant_id: str, changes: dict[str, Any]) -> Tenant | None:
    """Change a tenant's name or budget; None if there is no such tenant.

    A change bumps the tenant's ``config_version``, as one of its sources or targets
    does: every gateway process reads its budget afresh for the next request.
    """
    unknown = set(changes) - _UPDATABLE
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    names = sorted(changes)
    sets = "".join(f", {name} = ${i}" for i, name in enumerate(names, start=2))
    row = await conn.fetchrow(
        f"UPDATE tenants SET config_version = config_version + 1{sets} WHERE id = $1 RETURNING *",
        tenant_id,
        *(changes[name] for name in names),
    )
    return Tenant.maybe(row)


async def list_tenants(
    conn: Queries, limit: int, cursor: str | None
) -> tuple[list[Tenant], str | None]:
    """Tenants, newest first."""
    rows = await conn.fetch(
        "SELECT * FROM tenants WHERE ($1::text IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
        cursor,
        limit + 1,
    )
    page, next_cursor = keyset_page(rows, limit)
    return [Tenant.from_row(r) for r in page], next_cursor


async def create_api_key(
    conn: Queries, tenant_id: str, key_id: str, key_hash: bytes
) -> ApiKey | None:
    """A new key for an existing tenant, or None if there is no such tenant."""
    row = await conn.fetchrow(
        """
        INSERT INTO api_keys (id, tenant_id, key_hash)
        SELECT $2, id, $3 FROM tenants WHERE id = $1
        RETURNING *
        """,
        tenant_id,
        key_id,
        key_hash,
    )
    return ApiKey.maybe(row)


async def list_api_keys(
    conn: Queries, tenant_id: str, limit: int, cursor: str | None
) -> tuple[list[ApiKey], str | None]:
    """A tenant's keys (ids and dates, never the hash), newest first."""
    rows = await conn.fetch(
        """
        SELECT id, created_at, revoked_at FROM api_keys
        WHERE tenant_id = $1 AND ($2::text IS NULL OR id < $2)
        ORDER BY id DESC LIMIT $3
        """,
        tenant_id,
        cursor,
        limit + 1,
    )
    page, next_cursor = keyset_page(rows, limit)
    return [ApiKey.from_row(r) for r in page], next_cursor


async def revoke_api_key(conn: Queries, tenant_id: str, key_id: str) -> bool:
    """Revoke a key; False if the tenant has no such key. Revoking twice is harmless."""
    row = await conn.fetchrow(
        """
        UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
        WHERE tenant_id = $1 AND id = $2 RETURNING id
        """,
        tenant_id,
        key_id,
    )
    return row is not None


class KeyHolder(NamedTuple):
    """The tenant an API key authenticates, with its own budget of API requests."""

    tenant_id: str
    api_requests_per_s: int | None


async def key_holder(conn: Queries, key_hash: bytes) -> KeyHolder | None:
    """The tenant owning a live key with this hash, or None."""
    row = await conn.fetchrow(
        """
        SELECT k.tenant_id, t.api_requests_per_s
        FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
        WHERE k.key_hash = $1 AND k.revoked_at IS NULL
        """,
        key_hash,
    )
    return None if row is None else KeyHolder(row["tenant_id"], row["api_requests_per_s"])


async def lock_and_count_live(
    conn: Queries, tenant_id: str, table: Literal["sources", "targets"]
) -> int:
    """Lock the tenant's row until the transaction ends, then count its live ``table`` rows.

    Creates that check a quota call this first in their transaction, so two of
    them for one tenant run one after the other and cannot both take the last slot.
    """
    await conn.execute("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", tenant_id)
    count: int = await conn.fetchval(
        f"SELECT count(*) FROM {table} WHERE tenant_id = $1 AND deleted_at IS NULL", tenant_id
    )
    return count
