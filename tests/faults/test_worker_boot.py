"""A worker started while Postgres is down waits for it, then delivers; one that never
reaches it exits, for its supervisor to start it again.

Before, a worker process whose resources failed to open at boot ran on: Dramatiq logs
a middleware's failure at boot and goes on, so the process took wake-ups it could
not handle (no engine) and never delivered, until restarted by hand. Real
processes: a Postgres of the test's own (stopped, then started), `relay worker`,
`relay serve`, a receiver.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from relay.store.migrations import migrate
from tests.conftest import OPERATOR, stack_env
from tests.services import GatewayProcess, RestartablePostgres
from tests.stack import Receiver, WorkerProcess, eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


async def test_a_worker_started_before_postgres_delivers_once_it_is_up(
    tmp_path: Path, clean_redis: str
) -> None:
    # Given a migrated Postgres of our own, stopped
    postgres = RestartablePostgres(tmp_path / "pg").start()
    conn = await asyncpg.connect(postgres.url)
    await migrate(conn)
    await conn.close()
    await asyncio.to_thread(postgres.stop)
    receiver = await Receiver().start()
    env = stack_env(postgres.url, clean_redis)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    gateway = None
    try:
        # When a worker starts while it is down, and Postgres comes up 3 s later
        await asyncio.sleep(3)
        assert worker.proc is not None and worker.proc.poll() is None, worker.log()[-3000:]
        await asyncio.to_thread(postgres.start)
        gateway = GatewayProcess(env, tmp_path / "gw.log").start()
        async with aiohttp.ClientSession(gateway.url) as http:
            async with http.post("/v1/tenants", json={"name": "A"}, headers=OPERATOR) as r:
                key = (await r.json())["api_key"]
            auth = {"Authorization": f"Bearer {key}"}
            target = {"url": receiver.url("/after-boot")}
            async with http.post("/v1/targets", json=target, headers=auth) as r:
                assert r.status == 201
            async with http.post(
                "/v1/sources", json={"name": "s", "auth": {"type": "token"}}, headers=auth
            ) as r:
                source = await r.json()
            async with http.post(
                f"/in/{source['id']}?token={source['secret']}", json={"uuid": "after-boot"}
            ) as r:
                assert r.status == 202

        # Then the worker delivers it (it waited for Postgres at boot)
        async def delivered() -> bool:
            return bool(receiver.at("/after-boot"))

        await eventually(delivered, timeout=30)
    finally:
        worker.stop()
        if gateway is not None:
            gateway.stop()
        await receiver.close()
        await asyncio.to_thread(postgres.stop)


def test_a_worker_that_never_reaches_postgres_exits(tmp_path: Path, clean_redis: str) -> None:
    # Given no Postgres at all where the worker looks, and a short wait at boot
    env = stack_env("postgresql://root@127.0.0.1:1/none", clean_redis, RELAY_WORKER_BOOT_WAIT_S="3")
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    # Then `relay worker` exits non-zero within the wait and a little more, saying why
    code = worker.exit_code(90, "the worker, without Postgres,")
    log = worker.log()
    assert code == 3, log[-3000:]
    assert "could not open its resources and exits" in log
