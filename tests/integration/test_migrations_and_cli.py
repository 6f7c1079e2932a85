"""`relay migrate` and the CLI against a real Postgres, run as subprocesses."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relay.core.crypto import SecretBox, open_headers
from relay.store.migrations import PYTHON_STEPS, load_migrations, migrate
from tests.conftest import ADMIN_TOKEN, SECRET_KEY, _admin, with_database


def relay(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed ``relay`` command."""
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def empty_db(services: dict[str, str]) -> Iterator[str]:
    """A database with nothing in it."""
    name = f"relay_e_{uuid.uuid4().hex[:12]}"
    admin = services["postgres"]
    asyncio.run(_admin(admin, f'CREATE DATABASE "{name}"'))
    yield with_database(admin, name)
    asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _schema(url: str) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        return [
            tuple(r)
            for r in await conn.fetch(
                """
                SELECT table_name, column_name, data_type FROM information_schema.columns
                WHERE table_schema = 'public' ORDER BY table_name, column_name
                """
            )
        ] + [
            tuple(r)
            for r in await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY 1")
        ]
    finally:
        await conn.close()


def test_migrate_twice_changes_nothing(empty_db: str) -> None:
    first = relay("migrate", env={"DATABASE_URL": empty_db})
    assert first.returncode == 0, first.stderr
    assert "0001_init.sql" in first.stdout
    schema = asyncio.run(_schema(empty_db))
    second = relay("migrate", env={"DATABASE_URL": empty_db})
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    assert asyncio.run(_schema(empty_db)) == schema
    versions = [row for row in schema if len(row) == 2]
    assert [v for v, _ in versions] == [m.version for m in load_migrations()]


def test_two_concurrent_migrations_are_safe(empty_db: str) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "migrate"],
            env={"PATH": os.environ["PATH"], "DATABASE_URL": empty_db},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # exactly one of them applied the migrations
    applied = [out for out, _ in outs if "applied" in out]
    assert len(applied) == 1, outs
    schema = asyncio.run(_schema(empty_db))
    assert len([row for row in schema if len(row) == 2]) == len(load_migrations())


def test_serve_without_secret_key_stops_with_one_clear_line(database_url: str) -> None:
    result = relay(
        "serve",
        "--port",
        "0",
        env={
            "DATABASE_URL": database_url,
            "REDIS_URL": "redis://127.0.0.1:6379/9",
            "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
        },
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["relay: configuration error: RELAY_SECRET_KEY is required but not set"]


def test_serve_with_a_malformed_secret_key_names_it(database_url: str) -> None:
    result = relay(
        "serve",
        env={
            "DATABASE_URL": database_url,
            "REDIS_URL": "redis://127.0.0.1:6379/9",
            "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "RELAY_SECRET_KEY": "c2hvcnQ=",
        },
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "relay: configuration error: RELAY_SECRET_KEY must decode to 32 bytes, not 5"
    ]
    assert "Traceback" not in result.stderr


def test_tenants_create_prints_a_working_key(database_url: str) -> None:
    result = relay("tenants", "create", "CLI Corp", env={"DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.strip().splitlines())
    tenant_id, api_key = fields["tenant_id"].strip(), fields["api_key"].strip()
    assert tenant_id.startswith("ten_") and api_key.startswith("rly_")

    async def owner() -> Any:
        from relay.core.crypto import hash_api_key
        from relay.store.tenants import key_holder

        conn = await asyncpg.connect(database_url)
        try:
            holder = await key_holder(conn, hash_api_key(api_key))
            return None if holder is None else holder.tenant_id
        finally:
            await conn.close()

    assert asyncio.run(owner()) == tenant_id


def test_secret_key_is_read_from_env_not_leaked(database_url: str) -> None:
    # The key never appears in what the CLI prints, even on error
    result = relay("serve", env={"DATABASE_URL": "nope://", "RELAY_SECRET_KEY": SECRET_KEY})
    assert result.returncode == 2 and SECRET_KEY not in result.stderr + result.stdout


async def _older_database_with_plaintext_headers(url: str, old: Path) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, old)
        await conn.execute("INSERT INTO tenants (id, name) VALUES ('ten_1', 'Old')")
        await conn.execute(
            """
            INSERT INTO targets (id, tenant_id, url, headers, secret_enc) VALUES
              ('tgt_1', 'ten_1', 'https://a.example/', $1::jsonb, '\\x00'),
              ('tgt_2', 'ten_1', 'https://b.example/', '{}'::jsonb, '\\x00')
            """,
            json.dumps({"Authorization": "Bearer old-sekrit", "X-Env": "prod"}),
        )
    finally:
        await conn.close()


async def _versions(url: str) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch("SELECT version, name FROM schema_migrations")]
    finally:
        await conn.close()


async def _targets(url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id, row_to_json(t)::text AS text, t.* FROM targets t")
        return {r["id"]: r for r in rows}
    finally:
        await conn.close()


def test_migrate_encrypts_the_plaintext_headers_of_existing_targets(
    empty_db: str, tmp_path: Path
) -> None:
    # Given a database of the previous release holding a target with plaintext headers
    old = tmp_path / "old"
    old.mkdir()
    for migration in load_migrations():
        if migration.version <= 2:
            (old / migration.name).write_text(migration.sql)
    asyncio.run(_older_database_with_plaintext_headers(empty_db, old))
    # Without RELAY_SECRET_KEY, `relay migrate` refuses (naming it) and changes nothing
    refused = relay("migrate", env={"DATABASE_URL": empty_db})
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "RELAY_SECRET_KEY" in refused.stderr and "Traceback" not in refused.stderr
    assert [v for v, _ in asyncio.run(_versions(empty_db))] == [1, 2]
    assert "old-sekrit" in asyncio.run(_targets(empty_db))["tgt_1"]["text"]
    # With it, the headers are encrypted, bound to their target, and no plaintext is left
    done = relay("migrate", env={"DATABASE_URL": empty_db, "RELAY_SECRET_KEY": SECRET_KEY})
    assert done.returncode == 0, done.stderr
    rows = asyncio.run(_targets(empty_db))
    assert all("sekrit" not in row["text"] and "prod" not in row["text"] for row in rows.values())
    box = SecretBox(base64.b64decode(SECRET_KEY))
    assert open_headers(box, "tgt_1", rows["tgt_1"]["headers_enc"]) == {
        "Authorization": "Bearer old-sekrit",
        "X-Env": "prod",
    }
    assert open_headers(box, "tgt_2", rows["tgt_2"]["headers_enc"]) == {}
    again = relay("migrate", env={"DATABASE_URL": empty_db, "RELAY_SECRET_KEY": SECRET_KEY})
    assert again.returncode == 0 and "up to date" in again.stdout


def test_every_python_migration_step_names_a_migration_file() -> None:
    assert set(PYTHON_STEPS) <= {m.name for m in load_migrations()}
