"""Recording attempts across processes: what one process read at its claim may be stale.

Two workers record attempts of one target in any interleaving; a tenant
retries a delivery whose lease just lapsed while its worker is still about to
record; a record fails for a reason that is not an outage. None of these may
disable a healthy target, overwrite a fresh retry, or resend an attempt in flight.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from relay.delivery.outcome import next_breaker
from relay.store import claims, housekeeping
from relay.store import deliveries as delivery_store
from relay.store.claims import Attempt, Claimed
from tests.conftest import Tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import eventually


def _ended(claimed: Claimed, code: int) -> Attempt:
    """An attempt of ``claimed`` answered ``code`` (2xx succeeded, else retried)."""
    ok = 200 <= code < 300
    return Attempt(
        delivery=claimed,
        started_at=datetime.now(UTC),
        duration_ms=5,
        status_code=code,
        error=None if ok else f"HTTP {code}",
        response_body="",
        status="succeeded" if ok else "retrying",
        delay_s=None if ok else 5.0,
        carried_for_s=None,
        disable_reason=None,
    )


def _failed_breaker(before: Any) -> Any:
    return next_breaker(before, [(True, "HTTP 500")], threshold=5, open_s=30, max_open_s=600)


async def _two_deliveries(client: Any, tenant: Tenant) -> tuple[str, list[str]]:
    source = await make_source(client, tenant)
    target = await make_target(client, tenant)
    resp = await post_token(client, source, [{"n": 1}, {"n": 2}])
    assert resp.status == 202, await resp.text()
    return target["id"], (await resp.json())["event_ids"]


async def test_a_success_recorded_after_another_workers_failure_leaves_the_target_healthy(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given two workers that each claimed a delivery of a healthy target (both read "not failing")
    target_id, _ = await _two_deliveries(client, tenant)
    first, second, watcher = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        seen_1, [claim_1] = await claims.claim_batch(first, target_id, want=1, lease_s=60)
        seen_2, [claim_2] = await claims.claim_batch(second, target_id, want=1, lease_s=60)
        assert seen_1 is not None and seen_2 is not None
        assert not seen_1.failing and not seen_2.failing

        # When the first records a failure, and then the second a success
        await claims.record_batch(
            first,
            target_id,
            [_ended(claim_1, 500)],
            breaker=_failed_breaker,
            failing=seen_1.failing,
        )
        await claims.record_batch(
            second, target_id, [_ended(claim_2, 200)], breaker=None, failing=seen_2.failing
        )

        # Then the target is not failing: the auto-disable spares it
        assert (
            await watcher.fetchval("SELECT failing_since FROM targets WHERE id = $1", target_id)
            is None
        )
        assert target_id not in await housekeeping.disable_failing_targets(watcher, 0)
        shown = await (await client.get(f"/v1/targets/{target_id}", headers=tenant.auth)).json()
        assert shown["enabled"] is True
    finally:
        for conn in (first, second, watcher):
            await conn.close()


async def test_a_failure_recorded_after_another_workers_success_marks_the_target_failing(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a failing target, and two workers that each claimed one of its deliveries
    target_id, _ = await _two_deliveries(client, tenant)
    first, second, watcher = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        await watcher.execute(
            "UPDATE targets SET failing_since = now() - interval '1 minute' WHERE id = $1",
            target_id,
        )
        seen_1, [claim_1] = await claims.claim_batch(first, target_id, want=1, lease_s=60)
        seen_2, [claim_2] = await claims.claim_batch(second, target_id, want=1, lease_s=60)
        assert seen_1 is not None and seen_2 is not None
        assert seen_1.failing and seen_2.failing

        # When the second records a success (the target recovered), then the first a failure
        await claims.record_batch(
            second, target_id, [_ended(claim_2, 200)], breaker=None, failing=seen_2.failing
        )
        failure = _ended(claim_1, 500)
        await claims.record_batch(
            first, target_id, [failure], breaker=_failed_breaker, failing=seen_1.failing
        )

        # Then the target is failing again, since that failure
        assert (
            await watcher.fetchval("SELECT failing_since FROM targets WHERE id = $1", target_id)
            == failure.started_at
        )
    finally:
        for conn in (first, second, watcher):
            await conn.close()


async def test_a_late_record_of_an_expired_lease_does_not_overwrite_a_retry(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a delivery claimed by a worker whose lease lapsed while its attempt went on
    target_id, [event_id, _] = await _two_deliveries(client, tenant)
    worker, api = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        delivery_id = await api.fetchval("SELECT id FROM deliveries WHERE event_id = $1", event_id)
        _, claimed = await claims.claim_batch(worker, target_id, want=2, lease_s=0.2)
        [old] = [c for c in claimed if c.id == delivery_id]

        async def lapsed() -> bool:
            return bool(
                await api.fetchval(
                    "SELECT locked_until < now() FROM deliveries WHERE id = $1", delivery_id
                )
            )

        await eventually(lapsed, timeout=10)
        # And the tenant retried it (a fresh schedule)
        retried = await delivery_store.retry_delivery(
            api, tenant.id, delivery_id, enqueue_grace_s=30
        )
        assert retried is not None and retried.attempt_count == 0

        # When the worker records its attempt under the old lease
        recorded = await claims.record_batch(
            worker, target_id, [_ended(old, 500)], breaker=None, failing=False
        )

        # Then nothing is recorded: the retry stands as the tenant made it
        assert recorded == []
        shown = await (
            await client.get(f"/v1/deliveries/{delivery_id}", headers=tenant.auth)
        ).json()
        assert (shown["status"], shown["attempt_count"], shown["last_status_code"]) == (
            "pending",
            0,
            None,
        )
        assert shown["attempts"] == []
    finally:
        for conn in (worker, api):
            await conn.close()
