"""The bulk replay job: dead letters back to pending, in set-based batches."""

from __future__ import annotations

import logging
from datetime import datetime

import dramatiq

from relay.delivery.wakeups import REPLAY_ACTOR, REPLAY_QUEUE
from relay.store import dead_letters as store
from workers.broker import current_worker
from workers.engine import WorkerContext

log = logging.getLogger("relay.replay")


async def replay_selection(
    ctx: WorkerContext,
    *,
    tenant_id: str | None,
    target_id: str | None,
    since: datetime | None,
    up_to_id: str,
) -> int:
    """Replay every selected dead letter up to ``up_to_id``, batch by batch; return how many.

    Each batch is one short statement (SKIP LOCKED), so no lock is held long,
    and the targets of each batch are woken as soon as it commits.
    """
    total = 0
    async with ctx.pool.acquire() as conn:
        async for batch in store.replay_in_batches(
            conn,
            tenant_id,
            target_id=target_id,
            since=since,
            up_to_id=up_to_id,
            enqueue_grace_s=ctx.settings.requeue_after_s,
        ):
            # one message per target of the batch: any worker process may drain it
            await ctx.enqueuer.wake(r.wake for r in batch)
            total += len(batch)
    log.info(
        "replayed %d dead letters", total, extra={"tenant_id": tenant_id, "target_id": target_id}
    )
    return total


@dramatiq.actor(
    actor_name=REPLAY_ACTOR, queue_name=REPLAY_QUEUE, max_retries=3, time_limit=3_600_000
)
async def replay_dead_letters(
    tenant_id: str | None, target_id: str | None, since: str | None, up_to_id: str
) -> None:
    """Replay a selection of dead letters in the background."""
    await replay_selection(
        current_worker().context,
        tenant_id=tenant_id,
        target_id=target_id,
        since=datetime.fromisoformat(since) if since else None,
        up_to_id=up_to_id,
    )
