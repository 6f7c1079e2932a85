"""bench/history.py runs whole on a small history and prints every figure, empty and full."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FIGURES = (
    "e2e at 300/s p50/p99",
    "ingest (wrk, 64 connections) events/s",
    "drain of a 2,000 backlog dlv/s",
    "API list deliveries p50/p99",
    "API list events p50/p99",
    "API list dead letters p50/p99",
    "console overview (operator) p50/p99",
    "console overview (tenant) p50/p99",
    "console targets (tenant) p50/p99",
    "console dead letters (tenant) p50/p99",
    "GET /v1/admin/stats p50/p99",
    "retention of 10 days",
    "e2e at 100/s before retention p50/p99",
    "e2e at 100/s during retention p50/p99",
)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_the_history_bench_prints_every_figure_empty_and_with_history(
    services: dict[str, str],
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": services["postgres"],
        "PYTHONPATH": str(ROOT),
    }
    args = ["--events", "2000", "--quick", "--redis", services["redis"]]
    done = subprocess.run(
        [sys.executable, "bench/history.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table[2:]}
    assert set(rows) == set(FIGURES), done.stdout
    # each row: the empty figure, the one with history, their ratio
    assert all(len(cells) == 3 and all(c.strip(" |") for c in cells) for cells in rows.values())
    # the history's oldest 10 of 40 days went (500 of 2,000 events, and a seed's few),
    # as whole days' partitions: the part of the day past the retention that is not
    # whole yet (up to a day's 50) stays until it is
    purged = re.search(r"\(([\d,]+) events\)", rows["retention of 10 days"][1])
    assert purged and 450 <= int(purged[1].replace(",", "")) <= 510, rows
    # and how many probe events were posted while it ran
    during = re.search(r"\(([\d,]+) events\)", rows["e2e at 100/s during retention p50/p99"][1])
    assert during is not None, rows
