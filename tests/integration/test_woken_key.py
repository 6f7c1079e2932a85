"""One wake-up a target waits on the broker, whatever the number of commits.

A gateway whose workers were down (or behind) sent each target a wake-up after
every group commit, one every 2 ms at most: posted one by one, 40 events left 40
wake-ups of one target on the broker, for the workers to take one by one once
back. Now a wake-up that waits on the broker keeps a key in Redis (for
``WOKEN_TTL_MS`` at most), and no gateway process sends another meanwhile; the
worker deletes the key when it takes the wake-up, before it claims, so an event
committed after that gets a wake-up of its own.

Two gateways (each its own Redis and broker connections, as two processes have
them), an engine, real Postgres, Redis and a receiver.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from relay.core.config import Settings
from relay.delivery.wakeups import woken_key
from relay.web.app import create_app
from tests.conftest import GatewayTestServer
from tests.integration.test_draining_key import woken
from tests.integration.test_ingest import (
    SOFTLEDGER,
    make_source,
    make_target,
    make_tenant,
    post_token,
)
from tests.stack import Receiver, eventually
from workers.engine import Engine

pytestmark = pytest.mark.skipif(
    os.environ.get("BROKER_URL", "").startswith("amqp"),
    reason="counts the wake-ups on a Redis broker",
)


@pytest.fixture
async def redis(clean_redis: str) -> AsyncIterator[Any]:
    client = aioredis.from_url(clean_redis)
    try:
        yield client
    finally:
        await client.aclose()


async def test_two_gateways_leave_one_wake_up_per_target_while_no_worker_takes_it(
    aiohttp_client: Any, settings: Settings, receiver: Receiver, redis: Any
) -> None:
    # Given two gateways and no worker running
    a = await aiohttp_client(GatewayTestServer(create_app(settings)))
    b = await aiohttp_client(GatewayTestServer(create_app(settings)))
    tenant = await make_tenant(a)
    source = await make_source(a, tenant)
    target = await make_target(a, tenant, url=receiver.url("/down"))
    # When 40 events are posted one by one, through either gateway
    for i in range(40):
        gateway = a if i % 2 else b
        answer = await post_token(gateway, source, [{**SOFTLEDGER, "uuid": f"down-{i}"}])
        assert answer.status == 202
        await asyncio.sleep(0.005)  # past the 2 ms a gateway gathers wake-ups in
    await asyncio.sleep(0.2)  # the wake-ups go after the answers
    # Then one wake-up of the target waits on the broker (40 before), and its key says so
    assert await woken(redis, target["id"]) == 1
    assert 0 < await redis.pttl(woken_key(target["id"])) <= 5000


async def test_a_wake_up_taken_lets_the_next_commit_wake_the_target_again(
    client: Any, engine: Engine, receiver: Receiver, redis: Any
) -> None:
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, url=receiver.url("/again"))
    # Given an event whose wake-up waits on the broker
    assert (await post_token(client, source, [{**SOFTLEDGER, "uuid": "again-1"}])).status == 202

    async def one_waits() -> bool:
        return await woken(redis, target["id"]) == 1

    await eventually(one_waits, timeout=5)
    # When a worker takes it (as the wake_target actor does)
    await engine.wake_taken(target["id"], tenant.id)

    async def sent(n: int) -> bool:
        return len(receiver.at("/again")) == n

    await eventually(lambda: sent(1), timeout=10)
    # Then the key is gone, and the next event gets a wake-up of its own (were the key
    # left, it would wait for the sweeper)
    assert not await redis.exists(woken_key(target["id"]))
    assert (await post_token(client, source, [{**SOFTLEDGER, "uuid": "again-2"}])).status == 202

    async def two_wait() -> bool:
        return await woken(redis, target["id"]) == 2  # (the first was never acked here)

    await eventually(two_wait, timeout=5)
