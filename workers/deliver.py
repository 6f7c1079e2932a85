"""The delivery actors: a message wakes a target; the engine (workers/engine.py) drains it.

An actor only hands the target to the process's engine and returns, so a
Dramatiq thread is held for microseconds, never for an attempt.
"""

from __future__ import annotations

import logging

import dramatiq

from relay.core.metrics import DELIVERIES
from relay.delivery.wakeups import DELIVER_ACTOR, QUEUE, WAKE_ACTOR
from relay.store import claims
from workers.broker import current_worker
from workers.engine import ACQUIRE_TIMEOUT_S

log = logging.getLogger("relay.deliver")


@dramatiq.actor(actor_name=WAKE_ACTOR, queue_name=QUEUE, max_retries=0, time_limit=60_000)
async def wake_target(target_id: str, tenant_id: str) -> None:
    """The target has due work: drain it."""
    await current_worker().engine.wake_taken(target_id, tenant_id)


@dramatiq.actor(actor_name=DELIVER_ACTOR, queue_name=QUEUE, max_retries=0, time_limit=60_000)
async def deliver(delivery_id: str) -> None:
    """A message of one delivery (as enqueued before the engine): wake its target."""
    worker = current_worker()
    async with worker.context.pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        wake = await claims.target_of_delivery(conn, delivery_id)
    if wake is None:
        DELIVERIES.labels("not-claimed").inc()
        return
    worker.engine.wake(wake.target_id, wake.tenant_id)
