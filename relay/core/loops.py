"""The event loop Relay's processes run on: uvloop's where it is installed.

uvloop runs aiohttp's and asyncpg's socket work in libuv instead of asyncio's
selector loop in Python: under durable_ratio.py's ingest load the gateway's
samples in asyncio's transports and selector were a third of its event loop's.
Where it is absent (a platform without its wheels), asyncio's own loop runs.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop has wheels where Relay runs
    uvloop = None  # type: ignore[assignment]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop's loop (asyncio's without it)."""
    factory = asyncio.new_event_loop if uvloop is None else uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def use_for_new_loops() -> None:
    """Make ``asyncio.new_event_loop()`` return uvloop's (for loops made by libraries:
    Dramatiq's AsyncIO middleware makes the worker's)."""
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def settle_heap() -> None:
    """Keep what a process made while starting out of the garbage collector's full passes.

    Called once a process is serving (its modules, routes and pools made). A full
    collection walks every object the collector tracks; under another tenant's
    batches of 1,000 events it ran every ~0.6 s in the gateway and held the event
    loop 25-140 ms each time (it found nothing to free: what it walked was the
    process's own code and caches). Frozen, those ~80,000 objects are skipped: the
    same passes took 6-19 ms. Objects made afterwards are collected as before.
    """
    gc.collect()
    gc.freeze()
