"""CPU-bound steps of big requests, run off the event loop in a small pool of threads.

A step of pure Python that takes tens of milliseconds (parsing a batch of 1,000
events, planning its 10,000 deliveries) holds a process's event loop for as
long, and every other request on that loop waits: one tenant's 1,000-event
batches put 100-700 ms on another tenant's single events. Run in a thread, such
a step hands the interpreter back to the loop every few milliseconds
(``sys.getswitchinterval()``), so the loop's other requests go on meanwhile.

The pool is small (``THREADS``): big steps queue here rather than take every core
from the rest of the machine. A thread hop costs about a tenth of a millisecond,
so callers keep small steps on the loop (each names its own threshold).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: Threads per process for CPU-bound steps.
THREADS = 2
_pool: ThreadPoolExecutor | None = None


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` in the pool's thread, awaited from the event loop."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="relay-cpu")
    call = functools.partial(fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool, call)
