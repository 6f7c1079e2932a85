"""The credential throttle's lockout reads, against real Redis, as two processes share it.

Every authenticated request asks whether its address is locked out of its door; a
busy gateway asks many times at once, so the reads it has meanwhile go to Redis in
one call. What is checked: each request still gets its own address's and door's
answer, a lockout recorded through one process is honoured by the next read of the
other, and a burst costs one Redis call per batch, not one per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from relay.core import errors
from relay.core.auth_throttle import AuthThrottle

LIMIT = 3
GUESSER, BYSTANDER = "203.0.113.7", "198.51.100.9"


@pytest.fixture
async def clients(clean_redis: str) -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis]]:
    """Two Redis clients: two gateway processes' connections."""
    one, two = aioredis.from_url(clean_redis), aioredis.from_url(clean_redis)
    yield one, two
    await one.aclose()
    await two.aclose()


def throttle(client: aioredis.Redis) -> AuthThrottle:
    return AuthThrottle(client, limit=LIMIT, window_s=60, delay_s=0)


async def lock_out(through: AuthThrottle, door: str, address: str) -> None:
    for _ in range(LIMIT - 1):
        await through.failed("source", door, address)
    with pytest.raises(errors.RateLimited):
        await through.failed("source", door, address)


async def outcome(through: AuthThrottle, door: str, address: str) -> str:
    try:
        await through.admit("source", door, address)
    except errors.RateLimited as exc:
        assert int(exc.headers["Retry-After"]) >= 1
        return "429"
    return "admitted"


async def evalsha_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_burst_of_admits_gets_each_address_and_door_its_own_answer(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    first, second = throttle(clients[0]), throttle(clients[1])
    await lock_out(first, "source:a", GUESSER)
    asked = [
        (door, address)
        for _ in range(40)
        for door, address in (
            ("source:a", GUESSER),
            ("source:a", BYSTANDER),
            ("source:b", GUESSER),
        )
    ]
    got = await asyncio.gather(*(outcome(second, door, address) for door, address in asked))
    for (door, address), answer in zip(asked, got, strict=True):
        locked = (door, address) == ("source:a", GUESSER)
        assert answer == ("429" if locked else "admitted"), (door, address)


async def test_a_lockout_through_one_process_is_read_by_the_others_next_admit(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    first, second = throttle(clients[0]), throttle(clients[1])
    assert await outcome(second, "source:a", GUESSER) == "admitted"
    await lock_out(first, "source:a", GUESSER)
    assert await outcome(second, "source:a", GUESSER) == "429"
    assert await outcome(second, "source:a", BYSTANDER) == "admitted"


async def test_a_burst_of_admits_costs_one_redis_call_per_batch_not_per_request(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    gateway = throttle(clients[0])
    await outcome(gateway, "source:a", BYSTANDER)  # the script is loaded
    before = await evalsha_calls(clients[1])
    got = await asyncio.gather(*(outcome(gateway, "source:a", BYSTANDER) for _ in range(200)))
    assert got == ["admitted"] * 200
    calls = await evalsha_calls(clients[1]) - before
    # the first read goes at once, the 199 others wait for it and go together
    assert calls <= 3, calls


async def test_a_redis_that_does_not_answer_admits_every_waiter_of_the_batch(
    clean_redis: str,
) -> None:
    # nothing listens on port 9 of loopback: the read fails at once and admits
    client = aioredis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)
    try:
        gateway = throttle(client)
        got = await asyncio.gather(*(outcome(gateway, "source:a", GUESSER) for _ in range(20)))
        assert got == ["admitted"] * 20
    finally:
        await client.aclose()
