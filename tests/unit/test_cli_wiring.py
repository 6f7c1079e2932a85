"""The worker command line loads every actor module and the sweeper."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import workers
from relay.cli.main import worker_argv


def test_worker_argv_imports_every_actor_module_and_forks_the_sweeper() -> None:
    argv = worker_argv(2, 16)
    modules = {f"workers.{m.name}" for m in pkgutil.iter_modules(workers.__path__)}
    actor_modules = {m for m in modules if "@dramatiq.actor" in _source(m)}
    assert actor_modules == {"workers.deliver", "workers.replay"}
    assert actor_modules <= set(argv)
    assert argv[argv.index("--fork-function") + 1] == "workers.sweeper:main"
    assert argv[argv.index("--processes") + 1] == "2" and argv[argv.index("--threads") + 1] == "16"


def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    with open(spec.origin) as handle:
        return handle.read()


def test_the_worker_installs_its_broker_through_setup() -> None:
    argv = worker_argv(1, 4)
    assert argv[argv.index("dramatiq") + 1] == "workers.broker:setup"


def test_importing_the_worker_wiring_reads_no_settings() -> None:
    # Given an environment with none of the worker's settings
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RELAY_", "DATABASE_URL", "REDIS_URL", "BROKER_URL"))
    }
    # When the wiring module is imported
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import dramatiq.broker, workers.broker; print(dramatiq.broker.global_broker)",
        ],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it imports without them, and installs no broker of its own accord
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
