"""Nothing acknowledged is lost: a worker killed with -9, a flushed Redis, a SIGTERM."""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from tests.conftest import make_tenant, stack_env
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Receiver, WorkerProcess, eventually, fetch, hang


async def _all_delivered(database_url: str, ids: list[str]) -> bool:
    rows = await fetch(
        database_url,
        "SELECT count(*) AS n FROM deliveries WHERE event_id = ANY($1) AND status = 'succeeded'",
        ids,
    )
    return bool(rows[0]["n"] == len(ids))


async def test_kill_9_mid_burst_still_delivers_everything(
    gateway: Any, receiver: Receiver, database_url: str, clean_redis: str, tmp_path: Any
) -> None:
    # Given a slow receiver and a worker busy with a burst
    receiver.on("/slow", hang(0.2))
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    await make_target(gateway, tenant, url=receiver.url("/slow"))
    env = stack_env(database_url, clean_redis)
    worker = WorkerProcess(env, tmp_path / "w1.log", threads=4).start()
    ids = (
        await (await post_token(gateway, source, [{"uuid": f"k-{i}"} for i in range(60)])).json()
    )["event_ids"]
    await eventually(lambda: asyncio.sleep(0, result=len(receiver.at("/slow")) >= 5), timeout=20)
    # When it is killed with SIGKILL, mid-attempt
    worker.kill9()
    assert not worker.group_alive()
    delivered_before = {r.headers["webhook-id"] for r in receiver.at("/slow")}
    assert len(delivered_before) < 60
    # Then a new worker delivers every event (leases lapse, the sweeper re-enqueues)
    replacement = WorkerProcess(env, tmp_path / "w2.log", threads=8).start()
    try:
        await eventually(lambda: _all_delivered(database_url, ids), timeout=60)
    finally:
        replacement.stop()
    assert {r.headers["webhook-id"] for r in receiver.at("/slow")} == set(ids)


async def test_flushed_redis_after_ingest_still_delivers_everything(
    gateway: Any, receiver: Receiver, database_url: str, clean_redis: str, tmp_path: Any
) -> None:
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    await make_target(gateway, tenant, url=receiver.url("/hook"))
    # Given events accepted while no worker runs
    ids = (
        await (await post_token(gateway, source, [{"uuid": f"f-{i}"} for i in range(50)])).json()
    )["event_ids"]
    # and the gateway's background enqueue has landed (one wake-up for the one target)
    client = redis.Redis.from_url(clean_redis)
    try:
        await eventually(
            lambda: asyncio.to_thread(lambda: client.llen("dramatiq:deliveries") == 1),
            timeout=10,
        )
        # When Redis loses every message
        client.flushdb()
    finally:
        client.close()
    # Then a worker still delivers each event, once
    worker = WorkerProcess(stack_env(database_url, clean_redis), tmp_path / "w.log").start()
    try:
        await eventually(lambda: _all_delivered(database_url, ids), timeout=30)
    finally:
        worker.stop()
    got = [r.headers["webhook-id"] for r in receiver.at("/hook")]
    assert sorted(got) == sorted(ids)


async def test_sigterm_stops_the_worker_cleanly(
    gateway: Any, receiver: Receiver, database_url: str, clean_redis: str, tmp_path: Any
) -> None:
    worker = WorkerProcess(stack_env(database_url, clean_redis), tmp_path / "w.log").start()
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    await make_target(gateway, tenant, url=receiver.url("/hook"))
    [event_id] = (await (await post_token(gateway, source, {"uuid": "t-1"})).json())["event_ids"]
    await eventually(lambda: _all_delivered(database_url, [event_id]), timeout=20)
    await eventually(lambda: asyncio.sleep(0, result="sweeper is the leader" in worker.log()))
    code = await asyncio.to_thread(worker.stop, 30)
    assert code == 0, worker.log()[-3000:]
    await eventually(lambda: asyncio.sleep(0, result=not worker.group_alive()), timeout=10)
    assert "sweeper stopped" in worker.log()


async def test_sigterm_lets_an_attempt_in_flight_finish(
    gateway: Any, receiver: Receiver, database_url: str, clean_redis: str, tmp_path: Any
) -> None:
    # Given an attempt in flight to a receiver that answers after 2 s
    receiver.on("/slow", hang(2))
    worker = WorkerProcess(
        stack_env(database_url, clean_redis, RELAY_DELIVERY_TIMEOUT_S="10"), tmp_path / "w.log"
    ).start()
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    await make_target(gateway, tenant, url=receiver.url("/slow"))
    [event_id] = (await (await post_token(gateway, source, {"uuid": "inflight"})).json())[
        "event_ids"
    ]
    await eventually(lambda: asyncio.sleep(0, result=receiver.at("/slow")), timeout=20)
    # When the worker gets SIGTERM mid-attempt
    code = await asyncio.to_thread(worker.stop, 30)
    # Then it exits cleanly after recording the attempt's success
    assert code == 0, worker.log()[-3000:]
    rows = await fetch(
        database_url, "SELECT status, attempt_count FROM deliveries WHERE event_id = $1", event_id
    )
    assert [(r["status"], r["attempt_count"]) for r in rows] == [("succeeded", 1)]
    assert "pool is closing" not in worker.log()
