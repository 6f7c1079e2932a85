"""A drainer whose claim found all that was due looks, rather than claims, once its
attempts end.

At 100 events/s to one target, each event cost Postgres five round trips from the
worker: the claim that took it, its record, a second claim that found nothing (a
full claim: the target's advisory lock, its row, the shares and leases, the due
index), then the drainer's last look (the target, then when its next delivery
falls due). The bench (``bench/engine.py --latency-only 100``) had the stack at
1.28 cores, Postgres 3.4 ms of CPU an event. Now, when its last claim took fewer
than it asked, no wake-up came since and its attempts succeeded, the drainer asks
once whether anything is due and when the next falls due, and claims only if
something is. What is due at that moment is still claimed and sent.

The engine runs in this process, on a real pool, Redis and receiver.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import asyncpg
import pytest

from relay.core.config import Settings
from relay.delivery.outcome import Breaker
from relay.store import claims
from tests.conftest import Tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Receiver, eventually, fail_then_succeed, hang
from workers.engine import Engine

LOOKED_UP = ("claim_share", "last_look")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A retry schedule whose first wait is short: a timer of the worker carries it."""
    return dataclasses.replace(settings, retry_schedule=(0, 1.5, 300))


def counting(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The engine's calls of the store functions that claim or look, counted."""
    calls: Counter[str] = Counter()
    for name in LOOKED_UP:
        real = getattr(claims, name)

        def wrapper(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(claims, name, wrapper)
    return calls


async def drained(engine: Engine, target_id: str) -> None:
    async def idle() -> bool:
        return target_id not in engine._drainers

    await eventually(idle, timeout=10)


async def test_one_event_costs_one_claim_and_one_look(
    client: Any,
    tenant: Tenant,
    engine: Engine,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a target with nothing due
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, url=receiver.url("/hook"))
    calls = counting(monkeypatch)

    # When one event arrives and the worker is woken for it
    assert (await post_token(client, source, {"n": 1})).status == 202
    engine.wake(target["id"], tenant.id)

    # Then it is sent, and the drainer ends
    async def sent() -> bool:
        return len(receiver.at("/hook")) == 1

    await eventually(sent, timeout=10)
    await drained(engine, target["id"])
    # having claimed once and looked once (before: a second, empty claim, then the
    # target and its next due delivery read apart)
    assert calls == {"claim_share": 1, "last_look": 1}, calls


async def test_what_falls_due_before_the_look_is_claimed_and_sent(
    client: Any,
    tenant: Tenant,
    engine: Engine,
    receiver: Receiver,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a drainer sending the target's one due delivery, its receiver holding it
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, url=receiver.on("/slow", hang(0.5)))
    assert (await post_token(client, source, {"n": 1})).status == 202
    # and a second delivery, due in 0.2 s: no wake-up is sent for it
    assert (await post_token(client, source, {"n": 2})).status == 202
    conn = await asyncpg.connect(database_url)
    try:
        later = await conn.fetchval(
            """
            UPDATE deliveries SET next_attempt_at = now() + interval '0.2 seconds'
            WHERE id = (SELECT id FROM deliveries WHERE target_id = $1
                        ORDER BY id DESC LIMIT 1)
            RETURNING id
            """,
            target["id"],
        )
        assert later is not None
        calls = counting(monkeypatch)
        engine.wake(target["id"], tenant.id)

        # When the first attempt ends (after the second fell due)
        # Then the drainer's look finds the second due, claims it and sends it
        async def both() -> bool:
            return len(receiver.at("/slow")) == 2

        await eventually(both, timeout=5)
        await drained(engine, target["id"])
        assert calls["claim_share"] == 2, calls
    finally:
        await conn.close()


async def test_a_drainer_that_ends_after_a_failure_times_the_retry_with_one_look(
    client: Any,
    tenant: Tenant,
    engine: Engine,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a target whose receiver fails once, then answers 200
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, url=receiver.on("/flaky", fail_then_succeed(1)))
    calls = counting(monkeypatch)

    # When one event arrives, its attempt fails (a retry in 1.5 s), and the drainer
    # ends (after one more claim: a failure may have changed what it can take)
    assert (await post_token(client, source, {"n": 1})).status == 202
    engine.wake(target["id"], tenant.id)

    async def failed_once() -> bool:
        return len(receiver.at("/flaky")) == 1

    await eventually(failed_once, timeout=10)
    await drained(engine, target["id"])
    # Then it read when the retry falls due in one round trip, its look (before: the
    # target, then its next due delivery, read apart)
    assert calls == {"claim_share": 2, "last_look": 1}, calls

    # and the timer it left sends the retry when due, not the sweeper (30 s)
    async def succeeded() -> bool:
        return len(receiver.at("/flaky")) == 2

    await eventually(succeeded, timeout=5)


async def test_the_look_sees_what_a_claim_would_take_and_when_the_next_falls_due(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    source = await make_source(client, tenant)
    target = await make_target(client, tenant)
    conn = await asyncpg.connect(database_url)
    try:
        # nothing at all
        assert await claims.last_look(conn, target["id"]) == (False, None, None)
        # one delivery, leased (in flight): not due, and none waits
        assert (await post_token(client, source, {"n": 1})).status == 202
        await conn.execute(
            "UPDATE deliveries SET locked_until = now() + interval '1 minute' WHERE target_id = $1",
            target["id"],
        )
        assert await claims.last_look(conn, target["id"]) == (False, None, None)
        # its lease lapsed: due
        await conn.execute(
            "UPDATE deliveries SET locked_until = now() - interval '1 second' WHERE target_id = $1",
            target["id"],
        )
        assert (await claims.last_look(conn, target["id"])).due
        # due in 30 s, and the breaker open for a minute
        await conn.execute(
            "UPDATE deliveries SET locked_until = NULL,"
            " next_attempt_at = now() + interval '30 seconds' WHERE target_id = $1",
            target["id"],
        )
        await claims.save_breaker(
            conn, target["id"], Breaker("open", 5, 1, "5 failures in a row", open_for_s=60)
        )
        look = await claims.last_look(conn, target["id"])
        assert not look.due
        assert look.due_in is not None and 28 < look.due_in <= 30
        assert look.open_until is not None
        # and it plans as the worker's other statements do (migration 0018)
        config = await conn.fetchval(
            "SELECT proconfig FROM pg_proc WHERE proname = 'relay_last_look'"
        )
        assert "enable_seqscan=off" in config
    finally:
        await conn.close()
