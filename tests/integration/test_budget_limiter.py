"""RateLimiter.spend, the tenant budgets' bucket, on the real Redis (relay/core/ratelimit.py).

At 1 unit per second, an example's few milliseconds pay back next to nothing, so
what a burst of spends admits is exact: while the units spent stay within the
burst, they go; the first that would pass it is refused, with the time until it
would fit, and spends nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import math

import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.core.ratelimit import RateLimiter

_keys = itertools.count()


async def _spends(url: str, burst: int, steps: list[int]) -> list[tuple[int, float]]:
    client = redis.asyncio.Redis.from_url(url)
    try:
        limiter = RateLimiter(client, namespace="relay:test-budget")
        key = f"k{next(_keys)}"
        return [(units, await limiter.spend(key, 1, burst, units)) for units in steps]
    finally:
        await client.aclose()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    burst=st.integers(1, 500),
    steps=st.lists(st.integers(1, 600), max_size=8),
)
def test_a_burst_admits_what_fits_and_says_how_long_the_rest_waits(
    clean_redis: str, burst: int, steps: list[int]
) -> None:
    spent = 0
    for units, wait in asyncio.run(_spends(clean_redis, burst, steps)):
        if units > burst:
            assert math.isinf(wait)  # never fits
        elif spent + units <= burst:
            assert wait == 0
            spent += units
        else:
            excess = spent + units - burst  # seconds at 1 unit/s
            assert excess - 1 < wait <= excess, (spent, units, burst, wait)


async def test_a_spent_budget_is_paid_back_at_its_rate(clean_redis: str) -> None:
    client = redis.asyncio.Redis.from_url(clean_redis)
    try:
        limiter = RateLimiter(client, namespace="relay:test-budget")
        # 20 units per second, bursts of 10: the first 10 go, the 11th waits ~50 ms
        assert [await limiter.spend("paid", 20, 10, 1) for _ in range(10)] == [0.0] * 10
        wait = await limiter.spend("paid", 20, 10, 1)
        assert 0 < wait <= 0.05
        await asyncio.sleep(0.25)  # 5 units paid back
        assert await limiter.spend("paid", 20, 10, 5) == 0.0
        assert await limiter.spend("paid", 20, 10, 1) > 0
        # and the key expires once everything is paid back
        ttl_ms = await client.pttl("relay:test-budget:paid:20:10")
        assert 0 < ttl_ms <= 1000 + 550
    finally:
        await client.aclose()


async def test_a_burst_of_units_of_a_third_of_a_second_fits_whole(clean_redis: str) -> None:
    # 3 per second: a unit is 333,333.3 microseconds, stored to a whole one; the three of
    # a burst still go at once, and a fourth waits (costs rounded up, or the burst
    # rounded down, would refuse the third)
    client = redis.asyncio.Redis.from_url(clean_redis)
    try:
        limiter = RateLimiter(client, namespace="relay:test-budget")
        assert [await limiter.spend("thirds", 3, 3, 1) for _ in range(3)] == [0.0] * 3
        assert 0.3 <= await limiter.spend("thirds", 3, 3, 1) <= 0.334
    finally:
        await client.aclose()
