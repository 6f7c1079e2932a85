"""The worker command line loads every actor module and the sweeper."""

from __future__ import annotations

import importlib
import pkgutil

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
