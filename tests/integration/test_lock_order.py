"""One lock order everywhere: deleting a target and recording an attempt never deadlock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg

from relay.delivery.outcome import next_breaker
from relay.store import claims
from relay.store import targets as target_store
from relay.store.claims import Attempt
from tests.conftest import Tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import eventually


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
        failed = Attempt(
            delivery=claimed,
            started_at=datetime.now(UTC),
            duration_ms=5,
            status_code=500,
            error="HTTP 500",
            response_body="",
            status="retrying",
            delay_s=5.0,
            carried_for_s=None,
            disable_reason=None,
        )
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
