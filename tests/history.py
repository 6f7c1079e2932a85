"""Old history for retention tests.

events, deliveries and attempts are partitioned by the time in their ids
(migration 0012): a row is as old as its id says. ``backdate`` moves events,
with their deliveries and attempts, into the past by giving them the ids they
would have had then (same random part), into that day's partitions.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from relay.store.housekeeping import HISTORY
from relay.store.migrations import load_migrations, migrate
from relay.store.sql import floor_id
from tests.conftest import _admin, with_database


class Planned:
    """A connection that also keeps the plan Postgres makes of each statement it runs."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.plans: list[str] = []

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        plan = await self.conn.fetch("EXPLAIN " + query, *args)
        self.plans.append("\n".join(r[0] for r in plan))
        return await self.conn.fetch(query, *args)

    def partitions_of(self, days: Sequence[date | datetime]) -> list[str]:
        """The partitions of ``days`` that the plans kept hold (none: each read pruned
        them when it was planned)."""
        names = [f"_p{day:%Y%m%d}" for day in days]
        return [name for plan in self.plans for name in names if name in plan]


async def make_old_days(conn: asyncpg.Connection, ago: range = range(2, 22)) -> list[datetime]:
    """The history's partitions of the days ``ago`` days ago (as a relay keeping them
    for its retention has); those days."""
    days = [datetime.now(UTC) - timedelta(days=n) for n in ago]
    for day in days:
        await make_partitions(conn, day)
    return days


def aged_id(row_id: str, at: datetime) -> str:
    """The id ``row_id`` would have had if made at ``at`` (its random part kept)."""
    prefix = row_id.split("_", 1)[0]
    return floor_id(prefix, at)[: len(prefix) + 11] + row_id[-16:]


async def make_partitions(conn: asyncpg.Connection, at: datetime) -> None:
    """The history's partitions of the UTC day of ``at``."""
    for parent, prefix in HISTORY:
        await conn.execute(
            "SELECT relay_ensure_partition($1, $2, $3::date)", parent, prefix, at.date()
        )


async def backdate(
    conn: asyncpg.Connection, event_ids: Sequence[str], days: float, *, partitions: bool = True
) -> dict[str, str]:
    """Make events ``days`` old, with their deliveries and attempts; {old id: new id}.

    ``partitions``: make that day's partitions first (else the rows land in the
    DEFAULT partitions).
    """
    at = datetime.now(UTC) - timedelta(days=days)
    if partitions:
        await make_partitions(conn, at)
    deliveries = await conn.fetch(
        "SELECT id FROM deliveries WHERE event_id = ANY($1::text[])", list(event_ids)
    )
    attempts = await conn.fetch(
        "SELECT id FROM attempts WHERE delivery_id = ANY($1::text[])",
        [r["id"] for r in deliveries],
    )
    moved = {
        i: aged_id(i, at)
        for i in [*event_ids, *(r["id"] for r in deliveries), *(r["id"] for r in attempts)]
    }
    old, new = list(moved), list(moved.values())
    async with conn.transaction():
        await conn.execute(
            """
            UPDATE attempts a SET id = m.new, started_at = $3,
                delivery_id = coalesce((SELECT n.new FROM unnest($1::text[], $2::text[])
                                        AS n(old, new) WHERE n.old = a.delivery_id),
                                       a.delivery_id)
            FROM unnest($1::text[], $2::text[]) AS m(old, new) WHERE a.id = m.old
            """,
            old,
            new,
            at,
        )
        await conn.execute(
            """
            UPDATE deliveries d SET id = m.new, created_at = $3,
                event_id = (SELECT n.new FROM unnest($1::text[], $2::text[]) AS n(old, new)
                            WHERE n.old = d.event_id)
            FROM unnest($1::text[], $2::text[]) AS m(old, new) WHERE d.id = m.old
            """,
            old,
            new,
            at,
        )
        await conn.execute(
            """
            UPDATE events e SET id = m.new, received_at = $3
            FROM unnest($1::text[], $2::text[]) AS m(old, new) WHERE e.id = m.old
            """,
            old,
            new,
            at,
        )
    return moved


async def partition_exists(conn: asyncpg.Connection, parent: str, at: datetime) -> bool:
    """Whether ``parent`` has its partition of the UTC day of ``at``."""
    name = f"{parent}_p{at:%Y%m%d}"
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


@asynccontextmanager
async def migrated_before(
    admin: str, tmp_path: Path, version: int
) -> AsyncIterator[tuple[Path, str]]:
    """A database of its own migrated up to the migration before ``version``: the
    directory of those migrations, and its URL. Dropped after."""
    name = f"relay_m{version}_{uuid.uuid4().hex[:12]}"
    await _admin(admin, f'CREATE DATABASE "{name}"')
    old = tmp_path / f"before_{version}"
    old.mkdir()
    for migration in load_migrations():
        if migration.version < version:
            (old / migration.name).write_text(migration.sql)
    url = with_database(admin, name)
    try:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn, old)
        finally:
            await conn.close()
        yield old, url
    finally:
        await _admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
