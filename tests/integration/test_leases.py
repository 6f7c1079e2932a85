"""A target's leases: counted against its cap, given back by what ends them.

A claim leases deliveries without touching an indexed column of theirs (its
update is HOT, tests/integration/test_claim_cost.py); the leases held are
counted in ``delivery_leases``. These tests hold that count to what a user of
``max_in_flight`` expects: a record or a release frees its place at once, a
lease whose worker died stops counting when it lapses, a worker whose lease was
lost frees nothing of the new holder's, and the sweeper neither wakes a target
for what a lease carries nor keeps rows of leases long gone.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from relay.store import claims, housekeeping
from relay.store.claims import Claimed
from tests.conftest import Tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import ended_attempt

CAP = 3


async def _backlog(client: Any, tenant: Tenant, events: int) -> str:
    """A target with ``max_in_flight`` CAP and ``events`` due deliveries; its id."""
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, max_in_flight=CAP)
    resp = await post_token(client, source, [{"n": n} for n in range(events)])
    assert resp.status == 202, await resp.text()
    return str(target["id"])


@pytest.fixture
async def conns(database_url: str) -> Any:
    """Two workers' connections and a watcher's."""
    opened = [await asyncpg.connect(database_url) for _ in range(3)]
    yield opened
    for conn in opened:
        await conn.close()


async def _hold_the_cap(
    client: Any, tenant: Tenant, conn: asyncpg.Connection, events: int
) -> tuple[str, list[Claimed]]:
    """A target with ``events`` due deliveries, a worker (``conn``) holding its whole cap."""
    target_id = await _backlog(client, tenant, events)
    _, held = await claims.claim_batch(conn, target_id, want=events, lease_s=60)
    assert len(held) == CAP
    return target_id, held


async def _leases(conn: asyncpg.Connection, target_id: str) -> int:
    return int(
        await conn.fetchval("SELECT count(*) FROM delivery_leases WHERE target_id = $1", target_id)
    )


async def test_a_record_frees_its_place_under_the_cap_at_once(
    client: Any, tenant: Tenant, conns: list[asyncpg.Connection]
) -> None:
    first, second, watcher = conns
    # Given one worker holding the target's whole cap
    target_id, held = await _hold_the_cap(client, tenant, first, 10)
    # then another worker gets nothing
    assert (await claims.claim_batch(second, target_id, want=10, lease_s=60))[1] == []
    # When the first records two of its attempts
    recorded = await claims.record_batch(
        first, target_id, [ended_attempt(c, 200) for c in held[:2]], breaker=None, failing=False
    )
    assert sorted(recorded) == sorted(c.id for c in held[:2])
    # Then the other worker gets exactly those two places, and no more
    _, next_two = await claims.claim_batch(second, target_id, want=10, lease_s=60)
    assert len(next_two) == 2
    assert {c.id for c in next_two}.isdisjoint(c.id for c in held)
    # and only the leases held are left to count
    assert await _leases(watcher, target_id) == CAP


async def test_a_release_frees_its_place_under_the_cap_at_once(
    client: Any, tenant: Tenant, conns: list[asyncpg.Connection]
) -> None:
    first, second, watcher = conns
    target_id, held = await _hold_the_cap(client, tenant, first, 10)
    # When the worker gives its claims back (a rate limit defers them), due at once
    await claims.release_batch(first, held, delay_s=0, carried_for_s=None)
    # Then the cap is free for another worker at once, not when those leases would lapse
    assert await _leases(watcher, target_id) == 0
    _, again = await claims.claim_batch(second, target_id, want=10, lease_s=60)
    assert len(again) == CAP


async def test_a_lapsed_lease_stops_counting_and_a_lost_one_frees_nothing(
    client: Any, tenant: Tenant, conns: list[asyncpg.Connection]
) -> None:
    first, second, watcher = conns
    # Given a worker that claimed the whole cap and died (its leases lapse)
    target_id, dead_workers = await _hold_the_cap(client, tenant, first, CAP)
    for table in ("delivery_leases", "deliveries"):
        await watcher.execute(
            f"UPDATE {table} SET locked_until = now() - interval '1 second' WHERE target_id = $1",
            target_id,
        )
    # When another worker claims
    _, taken = await claims.claim_batch(second, target_id, want=CAP, lease_s=60)
    # Then it gets the same deliveries, the whole cap: lapsed leases count for nothing
    assert sorted(c.id for c in taken) == sorted(c.id for c in dead_workers)
    assert await _leases(watcher, target_id) == CAP
    # When the first worker comes back and records with the leases it lost
    recorded = await claims.record_batch(
        first, target_id, [ended_attempt(c, 200) for c in dead_workers], breaker=None, failing=False
    )
    # Then nothing is recorded, and the new holder's leases still count
    assert recorded == []
    assert await _leases(watcher, target_id) == CAP
    assert (await claims.claim_batch(first, target_id, want=CAP, lease_s=60))[1] == []


async def test_the_sweeper_removes_only_leases_long_lapsed(
    client: Any, tenant: Tenant, conns: list[asyncpg.Connection]
) -> None:
    first, _, watcher = conns
    target_id, held = await _hold_the_cap(client, tenant, first, CAP)
    # Given one lease that lapsed long ago (its delivery was then ended by hand), one
    # that lapsed just now, and one that holds
    await watcher.execute(
        "UPDATE delivery_leases SET locked_until = now() - interval '10 minutes'"
        " WHERE delivery_id = $1",
        held[0].id,
    )
    await watcher.execute(
        "UPDATE delivery_leases SET locked_until = now() - interval '1 second'"
        " WHERE delivery_id = $1",
        held[1].id,
    )
    # When the sweeper purges lapsed leases
    removed = await housekeeping.purge_lapsed_leases(watcher)
    # Then only the long-lapsed one's row is gone
    assert removed == 1
    left = await watcher.fetch(
        "SELECT delivery_id FROM delivery_leases WHERE target_id = $1", target_id
    )
    assert sorted(r["delivery_id"] for r in left) == sorted(c.id for c in held[1:])


async def test_the_sweeper_wakes_no_target_for_what_a_lease_carries(
    client: Any, tenant: Tenant, conns: list[asyncpg.Connection]
) -> None:
    first, _, watcher = conns
    target_id = await _backlog(client, tenant, 2)
    # Given a target whose deliveries are all leased, their broker message long gone
    _, held = await claims.claim_batch(first, target_id, want=2, lease_s=60)
    assert len(held) == 2
    await watcher.execute(
        "UPDATE deliveries SET enqueued_until = now() - interval '1 minute' WHERE target_id = $1",
        target_id,
    )
    # Then the sweeper does not wake it: the worker holding the leases carries them
    woken = await claims.targets_to_wake(watcher, grace_s=30, limit=100)
    assert target_id not in [w.target_id for w in woken]
    # When those leases lapse (the worker died)
    await watcher.execute(
        "UPDATE deliveries SET locked_until = now() - interval '1 second' WHERE target_id = $1",
        target_id,
    )
    # Then the sweeper wakes the target, so another worker sends them
    woken = await claims.targets_to_wake(watcher, grace_s=30, limit=100)
    assert target_id in [w.target_id for w in woken]
