"""After Redis was down, the worker consumes again: a short retry is sent on time."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

from relay.core.config import Settings
from relay.web.app import create_app
from tests.conftest import make_tenant, stack_env
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.services import RestartableRedis
from tests.stack import Receiver, WorkerProcess, eventually


async def test_short_retries_are_sent_on_time_after_a_redis_outage(
    aiohttp_client: Any, receiver: Receiver, database_url: str, tmp_path: Path
) -> None:
    failed_once: Counter[str] = Counter()

    async def fail_first_attempt(request: web.Request, count: int) -> web.StreamResponse:
        failed_once[request.headers["webhook-id"]] += 1
        return web.Response(status=500 if failed_once[request.headers["webhook-id"]] == 1 else 200)

    # Given a Redis of the test's own and a worker on it, with a sweeper grace far longer
    # than the 3 s retry, so that only the broker's delay queue can send the retry in time
    redis = RestartableRedis(tmp_path / "redis")
    redis.start()
    env = stack_env(
        database_url, redis.url, RELAY_RETRY_SCHEDULE="0,3,3", RELAY_REQUEUE_AFTER_S="120"
    )
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        gateway = await aiohttp_client(create_app(Settings.from_env(env)))
        tenant = await make_tenant(gateway)
        source = await make_source(gateway, tenant)
        await make_target(gateway, tenant, url=receiver.on("/hook", fail_first_attempt))

        async def retried(event_id: str) -> bool:
            await asyncio.sleep(0)
            return failed_once[event_id] >= 2

        [before] = (await (await post_token(gateway, source, {"uuid": "b"})).json())["event_ids"]
        await eventually(lambda: retried(before), timeout=15)
        # And a retry waiting in the worker's delay queue when Redis goes away
        await post_token(gateway, source, {"uuid": "w"})
        await eventually(lambda: asyncio.sleep(0, result=len(receiver.at("/hook")) >= 3))

        # When Redis is down for a few seconds, then back (with its data, as after a restart)
        redis.stop()
        await asyncio.sleep(4)
        redis.start()

        # Then an event whose first attempt fails still gets its 3 s retry within seconds
        async def accepted() -> str | None:
            resp = await post_token(gateway, source, {"uuid": "a"})
            return (await resp.json())["event_ids"][0] if resp.status == 202 else None

        after = await eventually(accepted, timeout=15, every=0.5)
        await eventually(lambda: retried(after), timeout=15)
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.stop()
        redis.stop()
        print(worker.log()[-6000:])
