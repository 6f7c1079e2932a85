"""A wake-up that reaches a worker while its drainer of the target is finishing.

A drainer that found nothing more to claim takes a last look at the target (whether
anything is due, and when its next delivery falls due, to leave a timer) before it
ends. A wake-up that
arrived in that moment was noted for the drainer, which no longer looked: the
fresh event waited for the sweeper, up to ``RELAY_REQUEUE_AFTER_S`` (30 s). Seen
under load in bench/noisy_neighbour.py: one quiet event delivered after 30.9 s.

The engine runs in this process, on a real pool, Redis and receiver; the last
look is held (its store call, once it read, waits on an event) to make the moment last.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from relay.store import claims
from tests.conftest import Tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Receiver, eventually
from workers.engine import Engine


async def test_a_wake_up_while_the_drainer_ends_is_not_lost(
    client: Any,
    tenant: Tenant,
    engine: Engine,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, url=receiver.url("/hook"))
    # Given a drainer that sent the target's one event and takes its last look
    # (after attempts that all succeeded, or to time its next due delivery otherwise)
    looking, go_on = asyncio.Event(), asyncio.Event()
    real_look = claims.last_look

    async def slow_last_look(conn: Any, target_id: str) -> Any:
        seen = await real_look(conn, target_id)  # what it sees: the second event is not in
        looking.set()
        await go_on.wait()
        return seen

    monkeypatch.setattr(claims, "last_look", slow_last_look)
    assert (await post_token(client, source, {"n": 1})).status == 202
    engine.wake(target["id"], tenant.id)
    await asyncio.wait_for(looking.wait(), timeout=10)
    assert len(receiver.at("/hook")) == 1
    # When another event arrives meanwhile, and its wake-up reaches this worker
    assert (await post_token(client, source, {"n": 2})).status == 202
    engine.wake(target["id"], tenant.id)
    go_on.set()

    # Then it is sent at once, not when the sweeper would find it (30 s)
    async def both_arrived() -> bool:
        return len(receiver.at("/hook")) == 2

    await eventually(both_arrived, timeout=5)
