"""No wake-up for a target whose busy drainer claims again anyway, nor for one
whose wake-up still waits on the broker.

Every committed group woke its targets through the broker. At 1,000 events/s to
one target, that was ~600 messages a second for a drainer that was claiming
anyway: each taken by a worker thread of either process (and the other process
started a drainer of its own, to contend for the same cap). A drainer that
claims batch after batch now keeps a key in Redis; the gateway sends no
immediate wake-up for a target that has it. Before it ends, the drainer deletes
the key and claims once more: an event committed while the key was there
(whose wake-up was skipped) is committed before that last claim.

A gateway whose workers were down (or behind) also sent each target a wake-up
after every group commit, one every 2 ms at most: posted one by one, 40 events
left 40 wake-ups of one target on the broker, for the workers to take one by one
once back. A wake-up that waits on the broker now keeps a key in Redis (for
``WOKEN_TTL_MS`` at most), and no gateway process sends another meanwhile; the
worker deletes the key when it takes the wake-up, before it claims, so an event
committed after that gets a wake-up of its own.

The gateway (the test client) and an engine, each with its own Redis and broker
connections as two processes have them, against real Postgres, Redis and a
receiver.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from relay.core.config import Settings
from relay.delivery import wakeups
from relay.delivery.wakeups import draining_key, woken_key
from relay.store import claims
from relay.web.app import create_app
from tests.conftest import GatewayTestServer, Tenant
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


async def woken(redis: Any, target_id: str) -> int:
    """Wake-ups of ``target_id`` on the broker, not yet taken."""
    messages = await redis.hvals(f"dramatiq:{wakeups.QUEUE}.msgs")
    return sum(
        1
        for m in map(json.loads, messages)
        if m["actor_name"] == wakeups.WAKE_ACTOR and m["args"][0] == target_id
    )


async def test_the_gateway_wakes_no_target_a_busy_drainer_keeps(
    client: Any, tenant: Tenant, receiver: Receiver, redis: Any
) -> None:
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, url=receiver.url("/kept"))
    # Given a drainer in another process keeping the target's key
    await redis.set(draining_key(target["id"]), "drn_elsewhere", px=5000)
    # When an event for it is committed
    assert (await post_token(client, source, [{**SOFTLEDGER, "uuid": "kept-1"}])).status == 202
    await asyncio.sleep(0.2)  # the wake-ups go after the answer
    # Then no wake-up is sent for it
    assert await woken(redis, target["id"]) == 0
    # and once the key is gone, the next event wakes the target again
    await redis.delete(draining_key(target["id"]))
    assert (await post_token(client, source, [{**SOFTLEDGER, "uuid": "kept-2"}])).status == 202

    async def sent() -> bool:
        return await woken(redis, target["id"]) == 1

    await eventually(sent, timeout=5)


async def test_an_event_whose_wake_up_was_skipped_is_sent_by_the_drainers_last_claim(
    client: Any,
    tenant: Tenant,
    engine: Engine,
    receiver: Receiver,
    redis: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = asyncio.Event()

    async def held(request: web.Request, count: int) -> web.StreamResponse:
        await gate.wait()
        return web.Response(status=200)

    source = await make_source(client, tenant)
    target = await make_target(client, tenant, url=receiver.on("/last", held), max_in_flight=2)
    assert (
        await post_token(client, source, [{**SOFTLEDGER, "uuid": f"last-{i}"} for i in range(6)])
    ).status == 202
    # Given a drainer sending a backlog batch after batch: it keeps the target's key
    engine.wake(target["id"], tenant.id)
    key = draining_key(target["id"])

    async def kept() -> bool:
        return bool(await redis.exists(key))

    gate.set()
    await eventually(kept, timeout=10, every=0.005)
    # When an event is committed just before the drainer gives the key up (the
    # gateway sees the key: it sends no wake-up)
    stop_draining = engine._stop_draining
    late: list[int] = []

    async def stop_after_a_late_event(target_id: str) -> bool:
        if not late:
            before = await woken(redis, target["id"])  # (the backlog's, never taken here)
            late.append(
                (await post_token(client, source, [{**SOFTLEDGER, "uuid": "last-late"}])).status
            )
            await asyncio.sleep(0.2)  # the gateway's wake-ups are sent (or not) by now
            late.append(await woken(redis, target["id"]) - before)
        return await stop_draining(target_id)

    monkeypatch.setattr(engine, "_stop_draining", stop_after_a_late_event)

    # Then the drainer's last claim sends it, with no wake-up for it, and no key is left
    async def all_sent() -> bool:
        return len({r.headers["webhook-id"] for r in receiver.at("/last")}) == 7

    await eventually(all_sent, timeout=10)
    assert late == [202, 0]

    # and the drainer ends, leaving no key (the gateway wakes the target again)
    async def ended() -> bool:
        return not engine._drainers

    await eventually(ended, timeout=5)
    assert not await redis.exists(key)


async def test_a_cap_shared_among_processes_is_never_kept_from_them(
    client: Any, tenant: Tenant, engine: Engine, receiver: Receiver, redis: Any
) -> None:
    # (a cap of 32 or more is shared among the processes woken for its target:
    # a kept key would keep the others from being woken)
    gate = asyncio.Event()

    async def held(request: web.Request, count: int) -> web.StreamResponse:
        await gate.wait()
        return web.Response(status=200)

    cap = 2 * claims.SHARE_MIN_PART
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, url=receiver.on("/shared", held), max_in_flight=cap)
    batch = [{**SOFTLEDGER, "uuid": f"shared-{i}"} for i in range(4 * cap)]
    assert (await post_token(client, source, batch)).status == 202
    engine.wake(target["id"], tenant.id)
    seen: set[int] = set()

    async def drained() -> bool:
        seen.add(int(await redis.exists(draining_key(target["id"]))))
        return len({r.headers["webhook-id"] for r in receiver.at("/shared")}) == 4 * cap

    gate.set()
    await eventually(drained, timeout=20, every=0.002)
    assert seen == {0}


async def test_a_slow_target_with_room_is_not_kept_from_its_wake_ups(
    client: Any, tenant: Tenant, engine: Engine, receiver: Receiver, redis: Any
) -> None:
    # (a fresh event whose wake-up is skipped waits for the drainer's next claim,
    # which comes after its next attempt ends: for a target that answers slowly and
    # has room in its cap, that would be a wait another process need not impose)
    async def slow(request: web.Request, count: int) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return web.Response(status=200)

    source = await make_source(client, tenant)
    target = await make_target(client, tenant, url=receiver.on("/slow", slow), max_in_flight=10)
    seen: set[int] = set()
    watching = True

    async def watch() -> None:
        while watching:
            seen.add(int(await redis.exists(draining_key(target["id"]))))
            await asyncio.sleep(0.002)

    watcher = asyncio.ensure_future(watch())
    try:
        for i in range(6):  # one event at a time, each woken as the gateway would
            answer = await post_token(client, source, [{**SOFTLEDGER, "uuid": f"slow-{i}"}])
            assert answer.status == 202
            engine.wake(target["id"], tenant.id)
            await asyncio.sleep(0.08)

        async def all_sent() -> bool:
            return len(receiver.at("/slow")) == 6 and not engine._drainers

        await eventually(all_sent, timeout=10)
    finally:
        watching = False
        await watcher
    assert seen == {0}


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
