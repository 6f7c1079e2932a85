"""The gateway's per-process cache (relay/ingest/routes.py): one read a key at a time.

When an entry expires under load, every request that comes while it is read again
used to read it too: at 1,000 events/s on a saturated machine each expiry became
dozens of identical reads of the source and the routes, which slowed Postgres,
which made the reads longer and the herd bigger. Concurrent misses of one key now
share one read; a ``forget`` (a change seen through this process, or a stale
version at commit) is never answered by a read that began before it.
"""

from __future__ import annotations

import asyncio
import gc

import pytest

from relay.ingest.routes import TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Loader:
    """A read that waits until released, counting its calls."""

    def __init__(self, name: str = "value") -> None:
        self.name = name
        self.calls = 0
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self) -> str:
        self.calls += 1
        call = self.calls
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return f"{self.name} {call}"


async def settle() -> None:
    """Let every task ready to run go as far as it can."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_misses_of_one_key_share_one_read() -> None:
    cache: TTLCache[str, str] = TTLCache(1.0)
    load = Loader()
    waiters = [asyncio.ensure_future(cache.get("tenant", load)) for _ in range(50)]
    await settle()
    load.release.set()
    assert await asyncio.gather(*waiters) == ["value 1"] * 50
    assert load.calls == 1
    # and the value is kept: the next get reads nothing
    assert await cache.get("tenant", load) == "value 1"
    assert load.calls == 1


async def test_an_expired_entry_is_read_once_for_all_who_ask_meanwhile() -> None:
    clock = Clock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock)
    load = Loader()
    load.release.set()
    assert await cache.get("tenant", load) == "value 1"
    clock.now = 1.5
    load.release.clear()
    waiters = [asyncio.ensure_future(cache.get("tenant", load)) for _ in range(20)]
    await settle()
    load.release.set()
    assert set(await asyncio.gather(*waiters)) == {"value 2"}
    assert load.calls == 2


async def test_other_keys_are_read_apart() -> None:
    cache: TTLCache[str, str] = TTLCache(1.0)
    load = Loader()
    load.release.set()
    assert await asyncio.gather(cache.get("a", load), cache.get("b", load)) == [
        "value 1",
        "value 2",
    ]


async def test_a_forget_is_never_answered_by_a_read_begun_before_it() -> None:
    cache: TTLCache[str, str] = TTLCache(1.0)
    early, late = Loader("before the change"), Loader("after the change")
    before = asyncio.ensure_future(cache.get("tenant", early))
    await settle()
    assert early.calls == 1
    cache.forget("tenant")  # the tenant's targets changed, seen through this process
    after = asyncio.ensure_future(cache.get("tenant", late))
    await settle()
    assert late.calls == 1  # a read of its own, not the one under way
    late.release.set()
    assert await after == "after the change 1"
    early.release.set()
    assert await before == "before the change 1"  # (it asked before the change)
    # and the early read, ended last, did not replace the newer value
    assert await cache.get("tenant", Loader("unused")) == "after the change 1"
    assert early.calls == late.calls == 1


async def test_a_failed_read_fails_its_waiters_and_is_not_kept() -> None:
    cache: TTLCache[str, str] = TTLCache(1.0)
    load = Loader()
    load.fail = ConnectionError("database gone")
    waiters = [asyncio.ensure_future(cache.get("tenant", load)) for _ in range(3)]
    await settle()
    load.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert load.calls == 1
    load.fail = None
    assert await cache.get("tenant", load) == "value 2"


async def test_a_waiter_that_goes_away_does_not_cancel_the_others_read() -> None:
    cache: TTLCache[str, str] = TTLCache(1.0)
    load = Loader()
    first = asyncio.ensure_future(cache.get("tenant", load))
    second = asyncio.ensure_future(cache.get("tenant", load))
    await settle()
    first.cancel()  # the client of the request that began the read hung up
    with pytest.raises(asyncio.CancelledError):
        await first
    load.release.set()
    assert await second == "value 1"
    assert load.calls == 1


async def test_a_read_that_fails_after_its_waiters_went_away_is_not_left_unread() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        cache: TTLCache[str, str] = TTLCache(1.0)
        load = Loader()
        load.fail = ConnectionError("pool is closing")
        only = asyncio.ensure_future(cache.get("tenant", load))
        await settle()
        only.cancel()  # its request was cancelled (the gateway shutting down)
        with pytest.raises(asyncio.CancelledError):
            await only
        load.release.set()
        await settle()
        del only, load  # (the loader keeps the exception, and so the read's frames)
        gc.collect()
        # (asyncio reports an exception no one read when its task is collected)
        assert reported == []
    finally:
        loop.set_exception_handler(None)


async def test_reads_are_shared_with_no_ttl_and_nothing_is_kept() -> None:
    cache: TTLCache[str, str] = TTLCache(0)
    load = Loader()
    waiters = [asyncio.ensure_future(cache.get("tenant", load)) for _ in range(5)]
    await settle()
    load.release.set()
    assert await asyncio.gather(*waiters) == ["value 1"] * 5
    assert await cache.get("tenant", load) == "value 2"


async def test_a_missing_key_is_not_kept() -> None:
    cache: TTLCache[str, str | None] = TTLCache(1.0)
    calls = 0

    async def load() -> None:
        nonlocal calls
        calls += 1

    assert await cache.get("src_gone", load) is None
    assert await cache.get("src_gone", load) is None
    assert calls == 2
