"""Embedded Postgres and Redis for a test run when DATABASE_URL/REDIS_URL are unset."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from relay.cli.embedded import embedded_services


@contextmanager
def start_embedded() -> Iterator[tuple[str, str]]:
    """Start both in a temporary directory, removed afterwards."""
    data_dir = Path(tempfile.mkdtemp(prefix="relay-test-"))
    try:
        with embedded_services(data_dir) as (database_url, redis_url):
            yield database_url, redis_url
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
