"""The event loop Relay's processes run on: uvloop's where it is installed.

uvloop runs aiohttp's and asyncpg's socket work in libuv instead of asyncio's
selector loop in Python: under durable_ratio.py's ingest load the gateway's
samples in asyncio's transports and selector were a third of its event loop's.
Where it is absent (a platform without its wheels), asyncio's own loop runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a new event loop: uvloop's, else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop has wheels where Relay runs
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop of :func:`loop_factory`."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def use_for_new_loops() -> None:
    """Make ``asyncio.new_event_loop()`` return uvloop's (for loops made by libraries:
    Dramatiq's AsyncIO middleware makes the worker's)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
