"""One tenant's heavy ingest does not hold up another tenant's.

Ordered events and big batches commit in a heavy lane of their own (light requests
never wait behind them). That lane had four transactions in flight for everyone:
a tenant whose ordered requests waited on their keys' locks (held by a long
transaction of its own) filled all four, and every other tenant's ordered event
waited behind them, then shared a transaction with the next of them. Now each
tenant has a heavy lane of its own, and the lanes take turns for the transactions
in flight, at most two a tenant.

A real gateway (the test client) on real Postgres; the locks held by another
session, as a long ingest or record of the tenant's own would hold them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from relay.store.key_queues import lock_keys
from tests.conftest import make_tenant
from tests.integration.test_ingest import make_source, make_target, post_token


async def test_a_tenants_requests_stuck_on_their_locks_leave_another_tenants_ordered_event_alone(
    client: Any, database_url: str
) -> None:
    # Given tenant A with an ordered target, whose key "k1" another session holds locked
    a = await make_tenant(client, "Tenant A")
    a_source = await make_source(client, a)
    a_target = await make_target(client, a, ordering="object", ordering_key="/k")
    b = await make_tenant(client, "Tenant B")
    b_source = await make_source(client, b)
    await make_target(client, b, ordering="object", ordering_key="/k")
    locker = await asyncpg.connect(database_url)
    held = locker.transaction()
    await held.start()
    await lock_keys(locker, [(a_target["id"], "k1")])
    a_posts: list[asyncio.Task[Any]] = []
    try:
        # and six of A's events for that key posted one after the other, each waiting
        # for the lock in a transaction of its own
        for n in range(6):
            body = {"uuid": f"a-{n}", "k": "k1"}
            a_posts.append(asyncio.ensure_future(post_token(client, a_source, body)))
            await asyncio.sleep(0.1)

        # When tenant B posts an ordered event of its own
        started = time.monotonic()
        answer = await post_token(client, b_source, {"uuid": "b-1", "k": "k1"})
        waited = time.monotonic() - started

        # Then it is stored at once, while A's still wait (before: 5 s and more, the
        # statement timeout of A's transactions, then in one with A's next)
        assert answer.status == 202, await answer.text()
        assert waited < 2.0, f"tenant B waited {waited:.1f} s behind tenant A's locks"
        assert not any(task.done() for task in a_posts)
    finally:
        await held.rollback()
        await locker.close()
    # and A's are stored once the locks go
    answers = await asyncio.gather(*a_posts)
    assert [r.status for r in answers] == [202] * 6
