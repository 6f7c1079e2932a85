"""Apply migrations/NNNN_*.sql in order, each in its own transaction, under an advisory lock."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from relay.core.config import ConfigError
from relay.core.crypto import SecretBox, seal_headers
from relay.store.db import Conn, Pool, Queries
from relay.store.housekeeping import ensure_partitions
from relay.store.key_queues import create_record_ordered

log = logging.getLogger(__name__)

#: pg_advisory_lock key shared by every `relay migrate` (arbitrary, stable).
MIGRATION_LOCK_KEY = 0x72656C6179  # "relay"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    """One SQL file."""

    version: int
    name: str
    sql: str


def migrations_dir() -> Path:
    """Where the SQL files are: inside the wheel, or at the top of a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "migrations", package.parent / "migrations"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("no migrations directory found next to the relay package")


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Every migration file, ordered by version; duplicate versions are an error."""
    found: dict[int, Migration] = {}
    for path in sorted((directory or migrations_dir()).glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file name {path.name!r} is not NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two migrations share version {version:04d}")
        found[version] = Migration(version, path.name, path.read_text())
    return [found[v] for v in sorted(found)]


async def _encrypt_target_headers(conn: Queries, box: SecretBox | None) -> None:
    """0003: encrypt the plaintext headers of existing targets, then drop the plaintext column."""
    rows = await conn.fetch(
        "SELECT id, headers::text AS headers FROM targets WHERE headers <> '{}'::jsonb FOR UPDATE"
    )
    if rows and box is None:
        raise ConfigError(
            "RELAY_SECRET_KEY is needed: migration 0003 encrypts the custom headers "
            f"of {len(rows)} existing target(s)"
        )
    for row in rows:
        assert box is not None
        await conn.execute(
            "UPDATE targets SET headers_enc = $2 WHERE id = $1",
            row["id"],
            seal_headers(box, row["id"], json.loads(row["headers"])),
        )
    await conn.execute("ALTER TABLE targets DROP COLUMN headers")


#: What SQL cannot do (it has no key): run right after the named file's SQL,
#: in its transaction, so the migration is applied whole or not at all.
PYTHON_STEPS: dict[str, Callable[[Conn, SecretBox | None], Awaitable[None]]] = {
    "0003_target_headers_encrypted.sql": _encrypt_target_headers,
    # a function made of relay/store/key_queues.py's statements, so that they are
    # written once; a later change to them re-creates it in a migration of its own
    # (RECORD_ORDERED_SHA256)
    "0020_ordered_record_in_one_call.sql": lambda conn, _: create_record_ordered(conn),
}

#: sha256 of ``key_queues.RECORD_ORDERED_FUNCTION`` as the last migration that made
#: relay_record_ordered() made it. Databases keep the function their migration made:
#: if that text changes (a statement of key_queues.py, ``KEY_LOCK_BUCKETS``), add a
#: migration whose Python step calls ``create_record_ordered`` again, and pin the new
#: hash here (tests/unit/test_migration_steps.py fails until then).
RECORD_ORDERED_SHA256 = "a2c0f73fbd55158b4bf94a78ec7502cf1afd143a9ce92bc99bc767f5e2293e2a"


async def migrate(
    conn: Conn, directory: Path | None = None, *, secrets: SecretBox | None = None
) -> list[str]:
    """Apply what is pending; return the names applied (empty when up to date).

    ``secrets``: the key, for the steps that encrypt existing rows; without it
    such a step fails with ConfigError if it has rows to encrypt.
    """
    pending_files = load_migrations(directory)
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version     integer PRIMARY KEY,
                name        text NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in pending_files:
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                step = PYTHON_STEPS.get(migration.name)
                if step is not None:
                    await step(conn, secrets)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("applied migration %s", migration.name)
            applied.append(migration.name)
        if await conn.fetchval("SELECT to_regproc('relay_ensure_figures_partition') IS NOT NULL"):
            # the partitions of the days ahead of the history (0012) and of the figures
            # (0028); the sweeper makes them too
            await ensure_partitions(conn)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied


class SchemaBehind(ConfigError):
    """The database lacks migrations this code needs: `relay migrate` has not run."""


async def check_schema(conn: Queries, directory: Path | None = None) -> None:
    """Raise :class:`SchemaBehind` unless every migration this code ships is applied.

    The gateway and the worker call it as they start: code newer than its schema
    would fail at the first statement that needs what a migration adds (a worker
    on a database without 0020 failed every ordered record with "function
    relay_record_ordered does not exist"). A schema ahead of the code passes: a
    migration keeps what the release before it uses.
    """
    wanted = load_migrations(directory)
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NULL"):
        applied: set[int] = set()
    else:
        applied = set(await applied_versions(conn))
    missing = [m.name for m in wanted if m.version not in applied]
    if missing:
        shown = ", ".join(missing[:3])
        if len(missing) > 3:
            shown += f" and {len(missing) - 3} more"
        raise SchemaBehind(
            f"the database lacks {len(missing)} migration(s) this relay needs ({shown}):"
            " run `relay migrate` first"
        )


async def require_schema(pool: Pool) -> None:
    """:func:`check_schema` on a connection of a process's fresh ``pool``; the pool is
    closed if the check fails (the process does not start)."""
    try:
        async with pool.acquire() as conn:
            await check_schema(conn)
    except BaseException:
        await pool.close()
        raise


async def applied_versions(conn: Queries) -> list[int]:
    """The versions recorded in schema_migrations."""
    rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return [r["version"] for r in rows]
