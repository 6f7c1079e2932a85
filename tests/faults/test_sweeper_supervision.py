"""The sweeper survives what a Postgres restart or failover does to its connection."""

from __future__ import annotations

import asyncio
from typing import Any

from relay.core.config import Settings
from relay.web.app import create_app
from tests.conftest import make_tenant, stack_env
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Receiver, WorkerProcess, eventually, fetch
from workers.sweeper import SWEEPER_LOCK_KEY

#: Nothing listens on port 1: every enqueue to it fails at once.
DEAD_BROKER = "redis://127.0.0.1:1/0"
# pg_locks shows a bigint advisory key as two 32-bit halves.
_LEADER = """
SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database
WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()
  AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 1
"""


async def _leader_pid(database_url: str) -> int | None:
    rows = await fetch(database_url, _LEADER, SWEEPER_LOCK_KEY >> 32, SWEEPER_LOCK_KEY & 0xFFFFFFFF)
    return int(rows[0]["pid"]) if rows else None


async def test_sweeper_reconnects_and_leads_again_after_its_backend_is_terminated(
    aiohttp_client: Any,
    receiver: Receiver,
    database_url: str,
    clean_redis: str,
    worker: WorkerProcess,
) -> None:
    # Given a worker whose sweeper leads
    first = await eventually(lambda: _leader_pid(database_url), timeout=30)

    # When Postgres terminates the sweeper's backend, as a restart or a failover does
    await fetch(database_url, "SELECT pg_terminate_backend($1)", first)

    # Then the sweeper reconnects and takes the lead again, on a new backend
    async def new_leader() -> bool:
        pid = await _leader_pid(database_url)
        return pid is not None and pid != first

    await eventually(new_leader, timeout=30)
    assert "sweeper failed (" in worker.log()

    # And it still sends what no message carries: a gateway whose broker is unreachable
    # commits an event whose enqueue fails, so only the sweeper can send it
    settings = Settings.from_env(stack_env(database_url, clean_redis))
    lost = await aiohttp_client(create_app(settings.with_overrides(broker_url=DEAD_BROKER)))
    tenant = await make_tenant(lost)
    source = await make_source(lost, tenant)
    await make_target(lost, tenant, url=receiver.url("/after"))
    [event_id] = (await (await post_token(lost, source, {"uuid": "after"})).json())["event_ids"]
    await eventually(lambda: asyncio.sleep(0, result=receiver.at("/after")), timeout=30)
    assert receiver.at("/after")[0].headers["webhook-id"] == event_id
