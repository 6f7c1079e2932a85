"""A target's next deliveries go out while the last ones are recorded.

A target's cap (``max_in_flight``) counts attempts in flight at the target. A
drainer used to record the attempts that ended, and only then claim their
replacements: each slot of the cap stayed idle for a record's round trip and a
claim's after its attempt had its answer. At 1,000 events/s to a target of the
default cap of 10, that idle time was the limit: the backlog grew and the
end-to-end latency went to seconds. Now the claim that follows does not count
the leases of the attempts being recorded, and is made while the record is.

One engine runs in this process, on its own pool and broker connection as a worker
process has them, against real Postgres, Redis and a receiver.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from aiohttp import web

from tests.conftest import Tenant
from tests.integration.test_ingest import SOFTLEDGER, make_source, make_target, post_token
from tests.stack import Concurrency, Receiver, eventually
from workers.engine import Engine

CAP = 2
EVENTS = 6


async def test_a_slow_record_does_not_hold_the_targets_next_deliveries(
    client: Any, tenant: Tenant, engine: Engine, receiver: Receiver, database_url: str
) -> None:
    counted = Concurrency(0.01)
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, url=receiver.on("/next", counted), max_in_flight=CAP)
    batch = [{**SOFTLEDGER, "uuid": f"next-{i}"} for i in range(EVENTS)]
    assert (await post_token(client, source, batch)).status == 202

    # Given records that cannot be written for now (another session holds the
    # attempts table: each record waits for it)
    holder = await asyncpg.connect(database_url)
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("LOCK TABLE attempts IN SHARE MODE")
    try:
        # When the engine drains the target
        engine.wake(target["id"], tenant.id)

        # Then, while the first attempts' record waits, their replacements are sent
        async def replaced() -> bool:
            return len(receiver.at("/next")) >= 2 * CAP

        await eventually(replaced, timeout=10)
        await asyncio.sleep(0.3)
        # and no more than that: the claim after waits for that record to end
        assert len(receiver.at("/next")) == 2 * CAP
    finally:
        await transaction.rollback()
        await holder.close()

    # And once records go through, every event is delivered once, never more than
    # the cap at the target at once, and every attempt is recorded
    async def all_received() -> bool:
        return len(receiver.at("/next")) >= EVENTS

    await eventually(all_received, timeout=30)
    assert len({r.headers["webhook-id"] for r in receiver.at("/next")}) == EVENTS
    assert len(receiver.at("/next")) == EVENTS
    assert counted.most <= CAP

    async def recorded() -> bool:
        conn = await asyncpg.connect(database_url)
        try:
            succeeded = await conn.fetchval(
                "SELECT count(*) FROM deliveries WHERE target_id = $1 AND status = 'succeeded'",
                target["id"],
            )
            return bool(succeeded == EVENTS)
        finally:
            await conn.close()

    await eventually(recorded, timeout=10)


async def test_a_target_that_answers_gone_gets_no_more_than_its_first_batch(
    client: Any, tenant: Tenant, engine: Engine, receiver: Receiver, database_url: str
) -> None:
    async def gone(request: web.Request, count: int) -> web.StreamResponse:
        return web.Response(status=410)

    source = await make_source(client, tenant)
    target = await make_target(client, tenant, url=receiver.on("/gone", gone), max_in_flight=CAP)
    batch = [{**SOFTLEDGER, "uuid": f"gone-{i}"} for i in range(EVENTS)]
    assert (await post_token(client, source, batch)).status == 202
    # When the engine drains a target whose first batch is answered 410 Gone
    engine.wake(target["id"], tenant.id)

    async def drained() -> bool:
        return not engine._drainers and len(receiver.at("/gone")) >= CAP

    await eventually(drained, timeout=10)
    # Then the record that disables the target comes before any further claim: the
    # rest stay pending for the day it is enabled again, none sent to die
    assert len(receiver.at("/gone")) == CAP
    conn = await asyncpg.connect(database_url)
    try:
        statuses = dict(
            await conn.fetch(
                "SELECT status, count(*) FROM deliveries WHERE target_id = $1 GROUP BY 1",
                target["id"],
            )
        )
        enabled = await conn.fetchval("SELECT enabled FROM targets WHERE id = $1", target["id"])
    finally:
        await conn.close()
    assert statuses == {"dead": CAP, "pending": EVENTS - CAP}
    assert enabled is False
