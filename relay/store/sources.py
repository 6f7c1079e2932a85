"""Sources: where an upstream sends a tenant's events."""

from __future__ import annotations

from typing import Any

from relay.store.db import Pool, Queries
from relay.store.rows import Source
from relay.store.sql import bump_config, keyset_page, set_clause
from relay.store.tenants import lock_and_count_live

_UPDATABLE = frozenset({"name", "auth_config", "rate_limit"})


async def create_source(
    pool: Pool,
    tenant_id: str,
    *,
    source_id: str,
    name: str,
    auth_type: str,
    auth_config: dict[str, Any],
    secret_enc: bytes,
    rate_limit: int | None,
    max_live: int,
) -> Source | None:
    """Insert a source; None if the tenant already has ``max_live`` live sources.

    The quota is counted and the row inserted in one transaction of a connection of ``pool``.
    """
    async with pool.acquire() as conn, conn.transaction():
        if await lock_and_count_live(conn, tenant_id, "sources") >= max_live:
            return None
        row = await conn.fetchrow(
            f"""
            WITH changed AS (
                INSERT INTO sources
                    (id, tenant_id, name, auth_type, auth_config, secret_enc, rate_limit)
                VALUES ($2, $1, $3, $4, $5, $6, $7) RETURNING *
            ), bumped AS ({bump_config("changed")})
            SELECT * FROM changed
            """,
            tenant_id,
            source_id,
            name,
            auth_type,
            auth_config,
            secret_enc,
            rate_limit,
        )
    return Source.maybe(row)


async def get_source(conn: Queries, tenant_id: str, source_id: str) -> Source | None:
    """A live source of this tenant, or None."""
    row = await conn.fetchrow(
        "SELECT * FROM sources WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
        tenant_id,
        source_id,
    )
    return Source.maybe(row)


async def list_sources(
    conn: Queries, tenant_id: str, limit: int, cursor: str | None
) -> tuple[list[Source], str | None]:
    """A tenant's live sources, newest first."""
    rows = await conn.fetch(
        """
        SELECT * FROM sources
        WHERE tenant_id = $1 AND deleted_at IS NULL AND ($2::text IS NULL OR id < $2)
        ORDER BY id DESC LIMIT $3
        """,
        tenant_id,
        cursor,
        limit + 1,
    )
    page, next_cursor = keyset_page(rows, limit)
    return [Source.from_row(r) for r in page], next_cursor


async def update_source(
    conn: Queries, tenant_id: str, source_id: str, changes: dict[str, Any]
) -> Source | None:
    """Apply a PATCH; None if the tenant has no such source."""
    if not changes:
        return await get_source(conn, tenant_id, source_id)
    clause, values = set_clause(changes, _UPDATABLE, first_param=3)
    row = await conn.fetchrow(
        f"""
        WITH changed AS (
            UPDATE sources SET {clause}
            WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING *
        ), bumped AS ({bump_config("changed")})
        SELECT * FROM changed
        """,
        tenant_id,
        source_id,
        *values,
    )
    return Source.maybe(row)


async def delete_source(conn: Queries, tenant_id: str, source_id: str) -> bool:
    """Soft-delete (its events keep their history); False if there is no such source."""
    row = await conn.fetchrow(
        f"""
        WITH changed AS (
            UPDATE sources SET deleted_at = now(), updated_at = now()
            WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING id
        ), bumped AS ({bump_config("changed")})
        SELECT id FROM changed
        """,
        tenant_id,
        source_id,
    )
    return row is not None


async def rotate_source_secret(
    conn: Queries, tenant_id: str, source_id: str, secret_enc: bytes
) -> Source | None:
    """Replace the secret, keeping the previous one (and when) for the overlap."""
    row = await conn.fetchrow(
        f"""
        WITH changed AS (
            UPDATE sources
            SET previous_secret_enc = secret_enc, secret_enc = $3,
                secret_rotated_at = now(), updated_at = now()
            WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING *
        ), bumped AS ({bump_config("changed")})
        SELECT * FROM changed
        """,
        tenant_id,
        source_id,
        secret_enc,
    )
    return Source.maybe(row)


async def live_source_ids(conn: Queries, tenant_id: str, source_ids: list[str]) -> set[str]:
    """Which of ``source_ids`` are this tenant's live sources."""
    rows = await conn.fetch(
        "SELECT id FROM sources WHERE tenant_id = $1 AND id = ANY($2::text[]) "
        "AND deleted_at IS NULL",
        tenant_id,
        source_ids,
    )
    return {r["id"] for r in rows}


async def get_source_for_ingest(conn: Queries, source_id: str) -> Source | None:
    """A live source by id alone: ingest authenticates with the source's own secret."""
    row = await conn.fetchrow(
        """
        SELECT s.*, t.config_version, t.ingest_bytes_per_s, t.deliveries_per_s
        FROM sources s JOIN tenants t ON t.id = s.tenant_id
        WHERE s.id = $1 AND s.deleted_at IS NULL
        """,
        source_id,
    )
    return Source.maybe(row)
