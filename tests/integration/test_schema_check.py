"""A gateway or a worker newer than its database's schema refuses to start.

Before, a worker on a database without migration 0020 started, then failed every
ordered record with "function relay_record_ordered does not exist" (the
deliveries stayed leased until the sweeper). Now `relay serve` and `relay worker`
read schema_migrations as they start, and stop with a line naming what is missing
and `relay migrate`. Real processes on a database whose last migration is undone
in the book (the row removed, as on a database the previous release migrated).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.store.migrations import load_migrations
from tests.conftest import stack_env
from tests.services import GatewayProcess
from tests.stack import WorkerProcess, fetch

pytestmark = pytest.mark.slow

LAST = load_migrations()[-1]


@pytest.fixture
def behind(database_url: str) -> Iterator[str]:
    """The test's database, its last migration missing from schema_migrations."""
    undo = "DELETE FROM schema_migrations WHERE version = $1"
    asyncio.run(fetch(database_url, undo, LAST.version))
    try:
        yield database_url
    finally:
        asyncio.run(
            fetch(
                database_url,
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                LAST.version,
                LAST.name,
            )
        )


def refused(process: WorkerProcess, what: str) -> None:
    """``process`` (started) stops at once with exit code 2, saying what is missing."""
    code = process.exit_code(60, f"{what} on a schema behind it")
    log = process.log()
    assert code == 2, log[-3000:]
    assert f"lacks 1 migration(s) this relay needs ({LAST.name})" in log
    assert "run `relay migrate` first" in log
    assert "Traceback" not in log


def test_relay_serve_on_a_schema_behind_stops_and_says_to_migrate(
    behind: str, clean_redis: str, tmp_path: Path
) -> None:
    gateway = GatewayProcess(stack_env(behind, clean_redis), tmp_path / "gw.log")
    WorkerProcess.start(gateway)  # (not GatewayProcess.start: it waits for the port)
    refused(gateway, "relay serve")


def test_relay_worker_on_a_schema_behind_does_not_run(
    behind: str, clean_redis: str, tmp_path: Path
) -> None:
    # (before, the worker started, and its processes ran without an engine: dramatiq
    # logs a middleware's failure at boot and goes on)
    worker = WorkerProcess(stack_env(behind, clean_redis), tmp_path / "worker.log").start()
    refused(worker, "relay worker")
