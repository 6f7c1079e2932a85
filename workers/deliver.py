"""The ``deliver`` actor: claim, sign, send, record, and schedule what comes next."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import dramatiq
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from relay.crypto import open_headers
from relay.delivery import decide, delivery_headers, parse_retry_after
from relay.egress import EgressRefused, describe_error
from relay.enqueue import DELIVER_ACTOR, QUEUE
from relay.metrics import ATTEMPT_LATENCY, DELIVERIES, status_class
from relay.store import deliveries as store
from relay.store.db import POSTGRES_DOWN
from workers.broker import WorkerContext, settings, worker_context

log = logging.getLogger("relay.deliver")

#: Waits up to this long go back on the broker with a delay; longer ones are
#: left to the sweeper, which enqueues them when Postgres says they are due.
SHORT_WAIT_S = 60.0


def _secrets(ctx: WorkerContext, row: dict[str, object]) -> list[str]:
    box = ctx.secrets
    secrets = [box.open(row["secret_enc"], bound_to=str(row["target_id"]))]  # type: ignore[arg-type]
    rotated = row["secret_rotated_at"]
    if (
        row["previous_secret_enc"] is not None
        and isinstance(rotated, datetime)
        and rotated.timestamp() + ctx.settings.secret_overlap_s > time.time()
    ):
        secrets.append(box.open(row["previous_secret_enc"], bound_to=str(row["target_id"])))  # type: ignore[arg-type]
    return secrets


def _redact(text: str, values: Iterable[str]) -> str:
    """``text`` with every non-empty value in ``values`` masked."""
    for value in values:
        if value:
            text = text.replace(value, "••••")
    return text


async def attempt_delivery(ctx: WorkerContext, delivery_id: str) -> str:
    """Make one attempt of ``delivery_id`` if it is ours to make; return what happened."""
    lease_s = ctx.settings.delivery_timeout_s + 10
    grace_s = ctx.settings.requeue_after_s
    row = await store.claim(ctx.pool, delivery_id, lease_s)
    if row is None:
        DELIVERIES.labels("not-claimed").inc()
        return "not-claimed"
    if row["deleted_at"] is not None:
        await store.kill(ctx.pool, row, "the target was deleted")
        DELIVERIES.labels("target-deleted").inc()
        return "target-deleted"
    if not row["enabled"]:
        # Left pending: it resumes when the target is enabled again.
        await store.release(ctx.pool, delivery_id, row["locked_until"], delay_s=0, grace_s=None)
        DELIVERIES.labels("target-disabled").inc()
        return "target-disabled"
    if row["rate_limit"] is not None:
        wait = await ctx.limiter.admit(f"tgt:{row['target_id']}", row["rate_limit"])
        if wait > 0:
            # Spread the deferred ones over the next second instead of a herd.
            delay = wait + random.random()
            await store.release(
                ctx.pool, delivery_id, row["locked_until"], delay_s=delay, grace_s=grace_s
            )
            await ctx.enqueuer.enqueue([delivery_id], delay_s=delay)
            DELIVERIES.labels("rate-limited").inc()
            return "rate-limited"

    started_at = datetime.now(UTC)
    started = time.perf_counter()
    status_code: int | None = None
    error: str | None = None
    response_body: str | None = None
    retry_after: float | None = None
    target_headers: dict[str, str] = {}
    try:
        body = bytes(row["payload"])
        target_headers = open_headers(ctx.secrets, row["target_id"], row["headers_enc"])
        headers = delivery_headers(
            event_id=row["event_id"],
            body=body,
            secrets=_secrets(ctx, dict(row)),
            timestamp=int(time.time()),
            target_headers=target_headers,
        )
        response = await ctx.egress.post(row["url"], body, headers)
        status_code = response.status
        response_body = response.body.decode("utf-8", "replace").replace("\x00", "")
        retry_after = parse_retry_after(response.headers.get("Retry-After"), started_at)
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}"
    except (EgressRefused, aiohttp.ClientError, TimeoutError, OSError) as exc:
        error = describe_error(exc)
    except Exception as exc:  # whatever happens, the attempt is recorded
        # Without this the actor dies, no attempt is recorded, and the sweeper
        # sends the delivery again forever. The text may quote what was sent:
        # mask the target's header values before storing or logging it.
        error = "unexpected error: " + _redact(describe_error(exc), target_headers.values())
        log.error(
            "attempt raised",
            extra={"delivery_id": delivery_id, "target_id": row["target_id"], "error": error},
        )
    duration_ms = int((time.perf_counter() - started) * 1000)
    ATTEMPT_LATENCY.labels(status_class(status_code)).observe(time.perf_counter() - started)

    outcome = decide(
        status_code=status_code,
        attempt_number=row["attempt_count"] + 1,
        schedule=ctx.settings.retry_schedule,
        retry_after_s=retry_after,
    )
    # A short wait goes back on the broker now; a long one is the sweeper's.
    requeue_in = (
        outcome.delay_s if outcome.delay_s is not None and outcome.delay_s <= SHORT_WAIT_S else None
    )
    recorded = await _record_while_leased(
        ctx,
        row,
        started_at=started_at,
        duration_ms=duration_ms,
        status_code=status_code,
        error=error if outcome.reason is None else f"{error}; {outcome.reason}",
        response_body=response_body,
        status=outcome.status,
        delay_s=outcome.delay_s,
        enqueued_for_s=requeue_in + grace_s if requeue_in is not None else None,
        disable_reason=outcome.disable_target,
    )
    if recorded and requeue_in is not None:
        await ctx.enqueuer.enqueue([delivery_id], delay_s=requeue_in)
    DELIVERIES.labels(outcome.status).inc()
    log.info(
        "attempt",
        extra={
            "delivery_id": delivery_id,
            "event_id": row["event_id"],
            "target_id": row["target_id"],
            "tenant_id": row["tenant_id"],
            "status": status_code,
            "outcome": outcome.status,
            "attempt": row["attempt_count"] + 1,
            "duration_ms": duration_ms,
        },
    )
    return outcome.status


async def _record_while_leased(ctx: WorkerContext, row: Any, **attempt: Any) -> bool:
    """Record the attempt, retrying while Postgres is away and the lease still holds.

    An attempt whose result cannot be recorded is made again once its lease
    lapses: a duplicate for the receiver. So a Postgres restart or failover is
    waited out for as long as the lease lasts; past that another worker may
    have claimed the delivery, and the record (conditional on this lease) says so.
    """
    remaining_s = max(1.0, (row["locked_until"] - datetime.now(UTC)).total_seconds())
    async for retry in AsyncRetrying(
        retry=retry_if_exception_type(POSTGRES_DOWN),
        wait=wait_exponential(multiplier=0.2, max=2),
        stop=stop_after_delay(remaining_s),
        reraise=True,
    ):
        with retry:
            async with ctx.pool.acquire(timeout=5) as conn:
                recorded: bool = await store.record_attempt(conn, row, **attempt)
                return recorded
    raise AssertionError("unreachable")  # pragma: no cover


@dramatiq.actor(
    actor_name=DELIVER_ACTOR,
    queue_name=QUEUE,
    max_retries=0,  # the schedule lives in Postgres, not in the broker
    time_limit=int((settings.delivery_timeout_s + 60) * 1000),
)
async def deliver(delivery_id: str) -> None:
    """Attempt one delivery."""
    await attempt_delivery(worker_context(), delivery_id)
