"""The wheel (what the Docker image installs) carries both packages, the migrations and the CLI."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_migrations_and_the_relay_command(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("relay-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("relay/migrations/"))
    assert shipped == sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))
    assert "workers/deliver.py" in names and "relay/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "relay = relay.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
