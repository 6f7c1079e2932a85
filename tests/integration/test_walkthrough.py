"""The README's walkthrough, run as written: docs/walkthrough.sh against `relay dev`.

A newcomer's path with nothing set (no DATABASE_URL, REDIS_URL or BROKER_URL):
relay dev on embedded services, tenant, source, target, an event delivered and
its signature verified by a receiver, a dead letter after a short schedule, found
and replayed by id with `relay dlq` against relay dev's own database.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_the_readme_walkthrough_works_as_written() -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "BROKER_URL") and not k.startswith("RELAY_")
    }
    done = subprocess.run(
        ["bash", str(ROOT / "docs" / "walkthrough.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    assert "walkthrough: every step worked" in done.stdout


def test_relay_dlq_without_a_database_says_where_it_looked(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["RELAY_DATA_DIR"] = str(tmp_path / "nothing-here")
    done = subprocess.run(
        ["relay", "dlq", "list"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "DATABASE_URL is not set" in done.stderr
    assert str(tmp_path / "nothing-here") in done.stderr
    assert "Traceback" not in done.stderr
