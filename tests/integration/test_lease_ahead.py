"""A drainer leases ahead of its part of the cap, and the cap stays strict (issue 24).

A drainer claimed at most its part of the target's cap, so every slot of the cap
waited for the next claim each cycle (bench/drain.py: a cycle of 32 took 10.3 ms,
4.15 of them the claim's). Now a drainer alone on a target whose breaker is
closed leases up to one part more (migration 0024): its process queues those and
starts one as each attempt ends, while the next claim is made. What a user of
``max_in_flight`` checks still holds: never more attempts at once than the cap,
across processes; nothing queued is sent once an attempt failed, or kept leased
once its process closes.

Two engines run in this process, each on its own pool and broker connection as a
worker process has them, against real Postgres, Redis and a receiver.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from relay.store import claims
from tests.conftest import Tenant
from tests.integration.test_cap_shares import (
    all_received,
    backlogged_target,
    count_attempts,
    engines,
)
from tests.integration.test_ingest import SOFTLEDGER, make_source, make_target, post_token
from tests.stack import Concurrency, Receiver, eventually, fetch
from workers.engine import Engine

__all__ = ["engines"]  # the fixture, shared with test_cap_shares

#: a cap that is shared between processes (two parts of claims.SHARE_MIN_PART)
CAP = 2 * claims.SHARE_MIN_PART
#: a receiver this quick lets a drainer lease ahead (engine.DRAINING_SOON_S)
QUICK_S = 0.005

LIVE_LEASES = "SELECT count(*) FROM delivery_leases WHERE target_id = $1 AND locked_until > now()"


async def _backlog(
    client: Any, tenant: Tenant, url: str, events: int, cap: int = CAP
) -> dict[str, Any]:
    """A target at ``url`` with a cap of ``cap`` and ``events`` deliveries due."""
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, url=url, max_in_flight=cap)
    for start in range(0, events, 500):
        batch = [{**SOFTLEDGER, "uuid": f"ahead-{i}"} for i in range(start, start + 500)]
        assert (await post_token(client, source, batch[: events - start])).status == 202
    return target


async def _deliveries_by_status(database_url: str, target_id: str) -> dict[str, tuple[int, int]]:
    """The target's deliveries by status: how many, and their attempts in all."""
    rows = await fetch(
        database_url,
        "SELECT status, count(*) AS n, sum(attempt_count) AS attempts FROM deliveries"
        " WHERE target_id = $1 GROUP BY status",
        target_id,
    )
    return {r["status"]: (r["n"], r["attempts"]) for r in rows}


@pytest.fixture
def held_after_claims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The leases each drainer held after each of its claims (those it held before the
    claim, in flight or queued, and those the claim took): past the cap only if it
    leased ahead."""
    held: list[int] = []
    claim_share = claims.claim_share

    async def spied(*args: Any, holding: int = 0, **kwargs: Any) -> claims.Share:
        share = await claim_share(*args, holding=holding, **kwargs)
        held.append(holding + len(share.rows))
        return share

    monkeypatch.setattr(claims, "claim_share", spied)
    return held


async def test_a_drainer_alone_leases_ahead_and_never_sends_past_the_cap(
    client: Any,
    tenant: Tenant,
    engines: list[Engine],
    receiver: Receiver,
    database_url: str,
    held_after_claims: list[int],
) -> None:
    # Given a quick target with a backlog of 20 caps, and one worker process
    events = 20 * CAP
    quick = Concurrency(QUICK_S)
    target = await _backlog(client, tenant, receiver.on("/quick", quick), events)
    first, _ = engines
    # When it drains the backlog
    first.wake(target["id"], tenant.id)
    await eventually(all_received(receiver, ["quick"], events), timeout=30)
    # Then it leased ahead of the cap (before, a claim took only what the cap had
    # room for), the receiver never had more than the cap at once, and got each
    # event once
    assert max(held_after_claims) == 2 * CAP, held_after_claims
    assert quick.most <= CAP
    assert len(receiver.at("/quick")) == events


async def test_a_second_process_never_passes_the_cap_with_one_that_leased_ahead(
    client: Any,
    tenant: Tenant,
    engines: list[Engine],
    receiver: Receiver,
    database_url: str,
    held_after_claims: list[int],
) -> None:
    # Given a quick target with a long backlog, drained by one worker process that
    # leases ahead of the cap
    events = 60 * CAP
    quick = Concurrency(QUICK_S)
    target = await _backlog(client, tenant, receiver.on("/both", quick), events)
    first, second = engines
    sent: Counter[str] = Counter()
    count_attempts(first, "first", sent)
    count_attempts(second, "second", sent)
    first.wake(target["id"], tenant.id)

    async def ahead() -> bool:
        return max(held_after_claims, default=0) > CAP

    await eventually(ahead, timeout=10, every=0.002)
    # When a second process is woken for the same target
    second.wake(target["id"], tenant.id)
    await eventually(all_received(receiver, ["both"], events), timeout=30)
    # Then the second sends part of the rest, the two together never had more than
    # the cap in flight at the receiver, and each event was sent once
    assert sent["second"] > 0, sent
    assert quick.most <= CAP
    assert len(receiver.at("/both")) == events


async def test_another_drainers_claim_counts_what_was_leased_ahead(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    cap = 4  # (a cap too small to share: the leases alone keep it)
    target = await backlogged_target(client, tenant, cap)
    one, two = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        # A drainer alone leases one part ahead: twice the cap
        alone = await claims.claim_share(
            one, target["id"], want=2 * cap, lease_s=60, holder="one", ahead=cap
        )
        assert len(alone.rows) == 2 * cap
        # another drainer's claim counts them all as in flight, and leases none ahead
        # while the first holds leases
        kept = await claims.claim_share(
            two, target["id"], want=2 * cap, lease_s=60, holder="two", ahead=cap
        )
        assert kept.rows == []
        # as the first's leases end, the other gets what the cap has room for
        await claims.release_batch(one, alone.rows[3:], delay_s=0, carried_for_s=None)
        room = await claims.claim_share(
            two, target["id"], want=2 * cap, lease_s=60, holder="two", ahead=cap
        )
        assert len(room.rows) == cap - 3
        # and now that two drainers hold leases, neither leases ahead: the cap is full
        full = await claims.claim_share(
            one, target["id"], want=2 * cap, lease_s=60, holder="one", holding=3, ahead=cap
        )
        assert full.rows == []
        live = await one.fetchval(LIVE_LEASES, target["id"])
        assert live == cap
    finally:
        await one.close()
        await two.close()


async def test_no_lease_ahead_past_a_breaker_or_a_worker_from_before(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    cap = 4
    target = await backlogged_target(client, tenant, cap)
    conn = await asyncpg.connect(database_url)
    try:
        # a lease of a worker from before migration 0024 names no holder: another
        # drainer's claim leases nothing ahead of it
        _, old = await claims.claim_batch(conn, target["id"], want=1, lease_s=60)
        assert len(old) == 1
        beside = await claims.claim_share(
            conn, target["id"], want=2 * cap, lease_s=60, holder="new", ahead=cap
        )
        assert len(beside.rows) == cap - 1
        await claims.release_batch(conn, [*old, *beside.rows], delay_s=0, carried_for_s=None)
        # a half-open breaker lets one probe through, leased ahead or not
        await conn.execute(
            "INSERT INTO target_health (target_id, breaker, consecutive_failures)"
            " VALUES ($1, 'half_open', 5) ON CONFLICT (target_id) DO UPDATE"
            " SET breaker = 'half_open', consecutive_failures = 5",
            target["id"],
        )
        probe = await claims.claim_share(
            conn, target["id"], want=2 * cap, lease_s=60, holder="new", ahead=cap
        )
        assert len(probe.rows) == 1
    finally:
        await conn.close()


class GoneAt:
    """Answer 200 after QUICK_S, and the ``nth`` request (from 0) 410 Gone after
    GONE_S; the requests that come meanwhile are answered only HELD_S after it, so
    that the drainer learns of the 410 before any other attempt ends."""

    def __init__(self, nth: int) -> None:
        self.nth = nth
        self.gone = asyncio.Event()
        self.sent_at: float | None = None

    async def __call__(self, request: web.Request, count: int) -> web.StreamResponse:
        if count < self.nth:
            await asyncio.sleep(QUICK_S)
            return web.Response(status=200)
        if count > self.nth:
            await self.gone.wait()
            await asyncio.sleep(HELD_S)
            return web.Response(status=200)
        await asyncio.sleep(GONE_S)
        self.sent_at = time.monotonic()
        self.gone.set()
        return web.Response(status=410)


#: the 410 is answered this late, the attempts started meanwhile this long after it
GONE_S = 0.1
HELD_S = 0.05


async def test_nothing_leased_ahead_is_sent_once_an_attempt_disabled_the_target(
    client: Any,
    tenant: Tenant,
    engines: list[Engine],
    receiver: Receiver,
    database_url: str,
    held_after_claims: list[int],
) -> None:
    # Given a quick target with a backlog, that answers its 200th request 410 Gone
    events = 20 * CAP
    gone = GoneAt(200)
    target = await _backlog(client, tenant, receiver.on("/gone", gone), events)
    first, _ = engines
    first.wake(target["id"], tenant.id)

    # When that answer disables it, while the drainer leases ahead
    async def disabled() -> bool:
        [row] = await fetch(database_url, "SELECT enabled FROM targets WHERE id = $1", target["id"])
        return not row["enabled"]

    await eventually(disabled, timeout=20, every=0.01)
    assert max(held_after_claims) > CAP, held_after_claims
    await asyncio.sleep(0.3)
    # Then nothing more is sent (without the give-back, what was leased ahead went
    # out once the 410 was recorded), and no lease is kept: what was leased ahead
    # was given back unsent (its lease would hold for the delivery timeout and more)
    assert gone.sent_at is not None
    late = [r for r in receiver.at("/gone") if r.at > gone.sent_at]
    assert late == []
    [row] = await fetch(database_url, LIVE_LEASES, target["id"])
    assert row[0] == 0
    [row] = await fetch(
        database_url,
        "SELECT coalesce(sum(attempt_count), 0) AS n FROM deliveries WHERE target_id = $1",
        target["id"],
    )
    assert row["n"] == len(receiver.at("/gone"))


async def test_a_closing_process_gives_back_what_it_leased_ahead(
    client: Any,
    tenant: Tenant,
    engines: list[Engine],
    receiver: Receiver,
    database_url: str,
    held_after_claims: list[int],
) -> None:
    # Given a worker process draining a long backlog of a quick target, ahead of its cap
    events = 100 * CAP
    quick = Concurrency(QUICK_S)
    target = await _backlog(client, tenant, receiver.on("/closing", quick), events)
    first, _ = engines
    first.wake(target["id"], tenant.id)

    async def under_way() -> bool:
        return len(receiver.at("/closing")) >= 10 * CAP and max(held_after_claims) > CAP

    await eventually(under_way, timeout=20, every=0.005)
    # When the process closes (a deploy)
    await first.close(timeout_s=5)
    # Then it holds no lease: what was in flight is recorded, what was queued is given
    # back at once, due for another process, rather than held until its lease lapses
    [row] = await fetch(database_url, LIVE_LEASES, target["id"])
    assert row[0] == 0
    statuses = await _deliveries_by_status(database_url, target["id"])
    sent = len(receiver.at("/closing"))
    assert statuses["succeeded"] == (sent, sent)
    assert statuses["pending"] == (events - sent, 0)


async def test_what_a_claim_took_as_the_process_closed_is_given_back(
    client: Any,
    tenant: Tenant,
    engines: list[Engine],
    receiver: Receiver,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a backlog, and a process that begins to close while its first claim of it
    # is on its way (nothing in flight yet)
    events = 4 * CAP
    target = await _backlog(client, tenant, receiver.on("/late", Concurrency(QUICK_S)), events)
    first, _ = engines
    claim_share = claims.claim_share

    async def closing_meanwhile(*args: Any, **kwargs: Any) -> claims.Share:
        share = await claim_share(*args, **kwargs)
        first._closing = True  # (what Engine.close does first)
        return share

    monkeypatch.setattr(claims, "claim_share", closing_meanwhile)
    first.wake(target["id"], tenant.id)

    async def drainer_ended() -> bool:
        return target["id"] not in first._drainers

    await eventually(drainer_ended, timeout=10, every=0.01)
    # Then what it claimed was neither sent nor kept leased (before, it stayed leased,
    # unsent, until its lease lapsed): every delivery is due, no attempt spent
    assert receiver.at("/late") == []
    [row] = await fetch(database_url, LIVE_LEASES, target["id"])
    assert row[0] == 0
    assert await _deliveries_by_status(database_url, target["id"]) == {"pending": (events, 0)}
