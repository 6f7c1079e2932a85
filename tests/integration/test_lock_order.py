"""One lock order everywhere: deleting a target and recording an attempt never deadlock."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from relay.delivery.outcome import next_breaker
from relay.store import claims
from relay.store import deliveries as delivery_store
from relay.store import targets as target_store
from relay.store.sql import ORDER_LOCK, key_lock
from tests.conftest import Tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import ended_attempt, eventually


async def _waiting_on_lock(watcher: Any, conn: Any) -> bool:
    pid = conn.get_server_pid()
    kind = await watcher.fetchval(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid
    )
    return bool(kind == "Lock")


async def test_delete_target_while_an_attempt_is_recorded_does_not_deadlock(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a delivery claimed by a worker, whose attempt just failed
    source = await make_source(client, tenant)
    target = await make_target(client, tenant)
    [event_id] = (await (await post_token(client, source, {"uuid": "lock-1"})).json())["event_ids"]
    blocker, deleter, recorder, watcher = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        delivery_id = await watcher.fetchval(
            "SELECT id FROM deliveries WHERE event_id = $1", event_id
        )
        _, [claimed] = await claims.claim_batch(watcher, target["id"], want=1, lease_s=60)
        assert claimed.id == delivery_id
        # And the target row briefly held (e.g. by a PATCH), so both sides queue up on it
        blocker_tx = blocker.transaction()
        await blocker_tx.start()
        await blocker.execute("SELECT 1 FROM targets WHERE id = $1 FOR UPDATE", target["id"])

        # When the tenant deletes the target and the worker records the failed attempt
        delete = asyncio.create_task(target_store.delete_target(deleter, tenant.id, target["id"]))
        await eventually(lambda: _waiting_on_lock(watcher, deleter), timeout=10)
        failed = ended_attempt(claimed, 500)
        record = asyncio.create_task(
            claims.record_batch(
                recorder,
                target["id"],
                [failed],
                breaker=lambda before: next_breaker(
                    before, [(True, "HTTP 500")], threshold=5, open_s=30, max_open_s=600
                ),
            )
        )
        await eventually(lambda: _waiting_on_lock(watcher, recorder), timeout=10)
        await blocker_tx.commit()

        # Then both finish (no deadlock error), and the deletion wins: the delivery is dead
        deleted, recorded = await asyncio.wait_for(asyncio.gather(delete, record), timeout=20)
        assert deleted is True
        assert recorded == []  # the delivery was no longer to be sent
        row = await watcher.fetchrow(
            "SELECT status, last_error FROM deliveries WHERE id = $1", delivery_id
        )
        assert (row["status"], row["last_error"]) == ("dead", "the target was deleted")
    finally:
        for conn in (blocker, deleter, recorder, watcher):
            await conn.close()


async def test_retry_of_a_parked_delivery_while_its_key_is_recorded_does_not_deadlock(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given an ordered target and a bill of two events: the first claimed by a worker,
    # the second parked behind it
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, ordering="object")
    bill = [
        {"uuid": f"lock-bill-{n}", "objectType": "Bill", "objectId": "9", "action": "updated"}
        for n in range(2)
    ]
    first_event, second_event = (await (await post_token(client, source, bill)).json())["event_ids"]
    blocker, recorder, retrier, watcher = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        parked = await watcher.fetchval(
            "SELECT id FROM deliveries WHERE event_id = $1", second_event
        )
        _, [claimed] = await claims.claim_batch(watcher, target["id"], want=2, lease_s=60)
        assert claimed.event_id == first_event and claimed.order_key is not None
        # And the bill's key lock briefly held (e.g. by an ingest committing its next event),
        # so the worker's record and the tenant's retry queue up on it in that order
        blocker_tx = blocker.transaction()
        await blocker_tx.start()
        await blocker.execute(
            f"SELECT pg_advisory_xact_lock($1, {key_lock('$2', '$3')})",
            ORDER_LOCK,
            target["id"],
            claimed.order_key,
        )

        # When the worker records the first event's success and the tenant retries the second
        succeeded = ended_attempt(claimed, 200)
        record = asyncio.create_task(
            claims.record_batch(recorder, target["id"], [succeeded], breaker=None, failing=False)
        )
        await eventually(lambda: _waiting_on_lock(watcher, recorder), timeout=10)
        retry = asyncio.create_task(
            delivery_store.retry_delivery(retrier, tenant.id, parked, enqueue_grace_s=30)
        )
        await eventually(lambda: _waiting_on_lock(watcher, retrier), timeout=10)
        await blocker_tx.commit()

        # Then both finish (no deadlock error): the first is recorded, the second is due
        recorded, retried = await asyncio.wait_for(asyncio.gather(record, retry), timeout=20)
        assert recorded == [claimed.id]
        assert retried is not None
        row = await watcher.fetchrow(
            "SELECT status, next_attempt_at IS NOT NULL AS due FROM deliveries WHERE id = $1",
            parked,
        )
        assert (row["status"], row["due"]) == ("pending", True)
    finally:
        for conn in (blocker, recorder, retrier, watcher):
            await conn.close()
