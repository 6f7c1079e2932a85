"""Targets: where a tenant receives its events."""

from __future__ import annotations

import logging
from typing import Any, Literal

from relay.ingest.routes import Routes, TargetRoute
from relay.store.db import Conn, Pool, Queries, fetch_past_moves
from relay.store.key_queues import reorder_target
from relay.store.rows import Target
from relay.store.sql import bump_config, keyset_page, set_clause
from relay.store.tenants import lock_and_count_live

log = logging.getLogger("relay.breaker")

TargetKind = Literal["events", "operational"]

#: The target's columns and its breaker (a target without a health row is healthy).
_WITH_HEALTH = """
    t.*, coalesce(h.breaker, 'closed') AS breaker, h.reason AS breaker_reason,
    CASE WHEN h.breaker = 'closed' THEN NULL ELSE h.open_until END AS breaker_open_until,
    coalesce(h.consecutive_failures, 0) AS consecutive_failures,
    CASE WHEN t.ordering = 'object' AND t.on_dead = 'block' THEN (
        SELECT count(*) FROM (
            SELECT DISTINCT order_key FROM deliveries
            WHERE target_id = t.id AND status = 'dead' AND order_key IS NOT NULL
        ) k
    ) ELSE 0 END AS blocked_keys,
    CASE WHEN t.ordering = 'object' AND t.on_dead = 'block' THEN (
        SELECT count(*) FROM deliveries w
        WHERE w.target_id = t.id AND w.status = 'pending' AND w.next_attempt_at IS NULL
          AND EXISTS (SELECT 1 FROM deliveries x WHERE x.target_id = t.id
                      AND x.order_key = w.order_key AND x.status = 'dead')
    ) ELSE 0 END AS blocked_waiting
"""

_UPDATABLE = frozenset(
    {
        "url",
        "description",
        "filter_object_types",
        "filter_actions",
        "source_ids",
        "headers_enc",
        "rate_limit",
        "max_in_flight",
        "ordering",
        "ordering_key",
        "on_dead",
        "enabled",
        "disabled_reason",
        "failing_since",
    }
)


async def create_target(
    pool: Pool, tenant_id: str, *, target_id: str, max_live: int, **fields: Any
) -> Target | None:
    """Insert a target; None if the tenant already has ``max_live`` live targets.

    ``fields`` are column values (url, secret_enc, filters…). The quota is counted
    and the row inserted in one transaction of a connection of ``pool``.
    """
    columns = ["id", "tenant_id", *fields]
    placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
    async with pool.acquire() as conn, conn.transaction():
        if await lock_and_count_live(conn, tenant_id, "targets") >= max_live:
            return None
        return Target.maybe(
            await conn.fetchrow(
                f"""
            WITH t AS (
                INSERT INTO targets ({", ".join(columns)}) VALUES ({placeholders}) RETURNING *
            ), bumped AS ({bump_config("t", "$2")})
            SELECT {_WITH_HEALTH} FROM t LEFT JOIN target_health h ON h.target_id = t.id
            """,
                target_id,
                tenant_id,
                *fields.values(),
            )
        )


async def get_target(conn: Queries, tenant_id: str, target_id: str) -> Target | None:
    """A live target of this tenant, or None."""
    row = await conn.fetchrow(
        f"""
        SELECT {_WITH_HEALTH} FROM targets t LEFT JOIN target_health h ON h.target_id = t.id
        WHERE t.tenant_id = $1 AND t.id = $2 AND t.deleted_at IS NULL
        """,
        tenant_id,
        target_id,
    )
    return Target.maybe(row)


async def list_targets(
    conn: Queries, tenant_id: str, limit: int, cursor: str | None
) -> tuple[list[Target], str | None]:
    """A tenant's live targets, newest first."""
    rows = await conn.fetch(
        f"""
        SELECT {_WITH_HEALTH} FROM targets t LEFT JOIN target_health h ON h.target_id = t.id
        WHERE t.tenant_id = $1 AND t.deleted_at IS NULL AND ($2::text IS NULL OR t.id < $2)
        ORDER BY t.id DESC LIMIT $3
        """,
        tenant_id,
        cursor,
        limit + 1,
    )
    page, next_cursor = keyset_page(rows, limit)
    return [Target.from_row(r) for r in page], next_cursor


async def update_target(
    conn: Conn, tenant_id: str, target_id: str, changes: dict[str, Any], *, grace_s: float = 30.0
) -> Target | None:
    """Apply a PATCH; None if the tenant has no such target.

    A change of ``ordering`` or ``on_dead`` lets what waited under the old rule go
    (``grace_s``: how long the sweeper leaves the deliveries made due to a wake-up).
    """
    if not changes:
        return await get_target(conn, tenant_id, target_id)
    clause, values = set_clause(changes, _UPDATABLE, first_param=3)
    # A new URL, or enabling the target again, starts its breaker afresh.
    reset = "url" in changes or changes.get("enabled") is True
    closed_breaker = False
    async with conn.transaction():
        row = await conn.fetchrow(
            f"""
            WITH changed AS (
                UPDATE targets SET {clause}
                WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING id
            ), bumped AS ({bump_config("changed")})
            SELECT id FROM changed
            """,
            tenant_id,
            target_id,
            *values,
        )
        if row is not None and reset:
            was = await conn.fetchval(
                """
                WITH before AS (
                    SELECT breaker FROM target_health WHERE target_id = $1 FOR UPDATE
                ), reset AS (
                    UPDATE target_health
                    SET breaker = 'closed', consecutive_failures = 0, opened_count = 0,
                        open_until = NULL, reason = NULL, changed_at = now()
                    WHERE target_id = $1
                )
                SELECT breaker FROM before
                """,
                target_id,
            )
            closed_breaker = was is not None and was != "closed"
        if row is not None and ({"ordering", "on_dead"} & changes.keys()):
            await reorder_target(conn, target_id, grace_s=grace_s)
    if closed_breaker:
        log.info(
            "circuit breaker closed",
            extra={
                "target_id": target_id,
                "tenant_id": tenant_id,
                "reason": "its URL changed" if "url" in changes else "it was enabled again",
            },
        )
    return None if row is None else await get_target(conn, tenant_id, target_id)


async def delete_target(conn: Conn, tenant_id: str, target_id: str) -> bool:
    """Soft-delete: its history stays, and what was still to be sent becomes dead.

    Two statements: the second reads the deliveries only once the target row is
    locked, so a replay or retry that held the target (FOR SHARE) and committed
    first has its deliveries made dead here too; none is left pending.
    """
    async with conn.transaction():
        deleted = await conn.fetchval(
            f"""
            WITH gone AS (
                UPDATE targets SET deleted_at = now(), updated_at = now(), enabled = false
                WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING id
            ), bumped AS ({bump_config("gone")})
            SELECT id FROM gone
            """,
            tenant_id,
            target_id,
        )
        if deleted is None:
            return False
        # (past moves: one of them may succeed meanwhile, and move)
        await fetch_past_moves(
            conn,
            """
            UPDATE deliveries
            SET status = 'dead', next_attempt_at = NULL, enqueued_until = NULL,
                last_error = 'the target was deleted', updated_at = now()
            WHERE target_id = $1 AND status IN ('pending', 'retrying')
            """,
            target_id,
        )
    return True


async def rotate_target_secret(
    conn: Queries, tenant_id: str, target_id: str, secret_enc: bytes
) -> Target | None:
    """Replace the signing secret, keeping the previous one for the overlap."""
    row = await conn.fetchrow(
        """
        UPDATE targets
        SET previous_secret_enc = secret_enc, secret_enc = $3,
            secret_rotated_at = now(), updated_at = now()
        WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING *
        """,
        tenant_id,
        target_id,
        secret_enc,
    )
    return Target.maybe(row)


async def routable_targets(conn: Queries, tenant_id: str, *, kind: TargetKind = "events") -> Routes:
    """The enabled, live targets of a tenant, as routing sees them, with the tenant's
    config_version in the same snapshot (read your writes: relay/store/events.py).

    ``kind``: those that receive upstream events (ingest's routes), or the
    operational ones (a replay of an operational event).
    """
    rows = await conn.fetch(
        """
        SELECT t.config_version, r.id, r.filter_object_types, r.filter_actions, r.source_ids,
               r.ordering, r.ordering_key
        FROM tenants t
        LEFT JOIN targets r ON r.tenant_id = t.id AND r.enabled AND r.deleted_at IS NULL
                           AND r.kind = $2
        WHERE t.id = $1
        """,
        tenant_id,
        kind,
    )
    version = rows[0]["config_version"] if rows else 0
    return Routes(version, tuple(TargetRoute.from_row(r) for r in rows if r["id"] is not None))
