"""Recording attempts across processes: what one process read at its claim may be stale.

Two workers record attempts of one target in any interleaving; a tenant
retries a delivery whose lease just lapsed while its worker is still about to
record; a record fails for a reason that is not an outage. None of these may
disable a healthy target, overwrite a fresh retry, or resend an attempt in flight.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from aiohttp import web

from relay.delivery.outcome import next_breaker
from relay.store import claims, housekeeping
from relay.store import deliveries as delivery_store
from tests.conftest import Tenant, make_tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Receiver, Workers, ended_attempt, eventually, fetch


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
            [ended_attempt(claim_1, 500)],
            breaker=_failed_breaker,
            failing=seen_1.failing,
        )
        await claims.record_batch(
            second, target_id, [ended_attempt(claim_2, 200)], breaker=None, failing=seen_2.failing
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
            second, target_id, [ended_attempt(claim_2, 200)], breaker=None, failing=seen_2.failing
        )
        failure = ended_attempt(claim_1, 500)
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
            worker, target_id, [ended_attempt(old, 500)], breaker=None, failing=False
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


async def test_an_unexpected_error_while_recording_resends_no_attempt_in_flight(
    workers: Workers, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given a target whose receiver answers one event at once and holds the other's answer
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    release = asyncio.Event()

    async def answer(request: web.Request, count: int) -> web.StreamResponse:
        if json.loads(await request.read())["uuid"] == "held":
            await release.wait()
        return web.Response(status=200, text="ok")

    target = await make_target(gateway, tenant, url=receiver.on("/rec", answer))
    resp = await post_token(gateway, source, [{"uuid": "quick"}, {"uuid": "held"}])
    assert resp.status == 202, await resp.text()
    [quick] = await fetch(
        database_url,
        "SELECT d.id FROM deliveries d JOIN events e ON e.id = d.event_id "
        "WHERE e.upstream_uuid = 'quick'",
    )
    # And Postgres refuses the first record of the quick one's attempt with an error
    # that is not an outage (a trigger raising once)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            f"""
            CREATE SEQUENCE record_fault;
            CREATE FUNCTION record_fault() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.delivery_id = '{quick["id"]}' THEN
                    IF nextval('record_fault') = 1 THEN
                        RAISE EXCEPTION 'injected fault while recording';
                    END IF;
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER record_fault BEFORE INSERT ON attempts
                FOR EACH ROW EXECUTE FUNCTION record_fault();
            """
        )
        # When a worker sends both, and the quick one's record fails once
        worker = workers.start(RELAY_DELIVERY_TIMEOUT_S="5")

        async def faulted() -> bool:
            return bool(await conn.fetchval("SELECT is_called FROM record_fault"))

        await eventually(faulted, timeout=30)
        await asyncio.sleep(1.0)  # a moment for whatever the failure leads to
        release.set()

        # Then both succeed, and each was sent once: the held attempt was not cut off
        # and sent again, and the quick one's record was made again, not its attempt
        async def both_succeeded() -> bool:
            rows = await conn.fetch(
                "SELECT status FROM deliveries WHERE target_id = $1", target["id"]
            )
            return [r["status"] for r in rows] == ["succeeded", "succeeded"]

        await eventually(both_succeeded, timeout=60)
        sent = [json.loads(r.body)["uuid"] for r in receiver.at("/rec")]
        assert sorted(sent) == ["held", "quick"]
        assert "injected fault while recording" in worker.log()
    finally:
        await conn.execute(
            "DROP TRIGGER IF EXISTS record_fault ON attempts; "
            "DROP FUNCTION IF EXISTS record_fault(); DROP SEQUENCE IF EXISTS record_fault"
        )
        await conn.close()
