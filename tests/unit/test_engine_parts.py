"""The engine's pure parts: the circuit breaker's rule and the fair sharing of slots."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.outcome import CLOSED, Breaker, next_breaker, trips_breaker
from workers.engine import FairSlots

RULE = {"threshold": 3, "open_s": 10.0, "max_open_s": 35.0}
FAIL = (True, "timeout")
OK = (False, "HTTP 200")


def test_what_trips_the_breaker() -> None:
    assert trips_breaker(None, "timeout") is True
    assert trips_breaker(None, "connection error: Connection refused") is True
    assert trips_breaker(503, "HTTP 503") is True
    assert trips_breaker(500, "HTTP 500") is True
    assert trips_breaker(200, None) is False
    assert trips_breaker(404, "HTTP 404") is False  # it answers: healthy, if unhappy
    assert trips_breaker(429, "HTTP 429") is False  # Retry-After handles it
    assert trips_breaker(None, "refused by egress policy: private") is None


def test_closed_opens_after_threshold_failures_in_a_row() -> None:
    two = next_breaker(CLOSED, [FAIL, FAIL], **RULE)
    assert two == Breaker("closed", 2, 0, None, None)
    opened = next_breaker(two, [FAIL], **RULE)
    assert opened.state == "open"
    assert opened.open_for_s == 10.0
    assert opened.reason == "3 failures in a row (last: timeout)"


def test_a_success_resets_the_count() -> None:
    assert next_breaker(CLOSED, [FAIL, FAIL, OK, FAIL, FAIL], **RULE).state == "closed"


def test_failures_while_open_count_but_do_not_extend_it() -> None:
    opened = next_breaker(CLOSED, [FAIL] * 3, **RULE)
    later = next_breaker(opened._replace(open_for_s=None), [FAIL, FAIL], **RULE)
    assert later.state == "open" and later.open_for_s is None
    assert later.consecutive_failures == 5


def test_a_failed_probe_reopens_for_twice_as_long_up_to_the_maximum() -> None:
    probing = Breaker("half_open", 3, 1, "3 failures in a row", None)
    again = next_breaker(probing, [(True, "HTTP 502")], **RULE)
    assert again.state == "open"
    assert again.open_for_s == 20.0
    assert again.reason == "the probe failed (HTTP 502)"
    third = next_breaker(again._replace(state="half_open", open_for_s=None), [FAIL], **RULE)
    assert third.open_for_s == 35.0  # 40, capped


def test_a_successful_probe_closes() -> None:
    probing = Breaker("half_open", 7, 3, "the probe failed", None)
    assert next_breaker(probing, [OK], **RULE) == CLOSED


def test_attempts_that_say_nothing_change_nothing() -> None:
    start = Breaker("closed", 2, 0, None, None)
    assert next_breaker(start, [(None, "refused")] * 5, **RULE) == start


outcomes = st.lists(st.sampled_from([FAIL, OK, (None, "refused")]), max_size=40)
states = st.builds(
    Breaker,
    st.sampled_from(["closed", "open", "half_open"]),
    st.integers(0, 10),
    st.integers(0, 40),
    st.none() | st.text(max_size=5),
)


@given(states, outcomes)
def test_breaker_invariants(start: Breaker, ends: list[tuple[bool | None, str]]) -> None:
    after = next_breaker(start, ends, **RULE)
    decisive = [trips for trips, _ in ends if trips is not None]
    if decisive and decisive[-1] is False:
        assert after == CLOSED
    if after.open_for_s is not None:
        assert after.state == "open"
        assert RULE["open_s"] <= after.open_for_s <= RULE["max_open_s"]
    if after.state == "closed" and start.state == "closed":
        assert after.consecutive_failures < RULE["threshold"] or not decisive


async def test_no_tenant_holds_more_than_its_share() -> None:
    slots = FairSlots(8, tenant_share=0.75)
    assert await slots.acquire("a", 20) == 6
    assert slots.try_acquire("a", 5) == 0
    assert await slots.acquire("b", 5) == 2


async def test_waiting_tenants_are_served_in_turn() -> None:
    slots = FairSlots(4, tenant_share=1.0)
    assert await slots.acquire("a", 4) == 4
    waiting = [asyncio.ensure_future(slots.acquire(tenant, 1)) for tenant in ("a", "a", "b", "c")]
    await asyncio.sleep(0)
    served = []
    for _ in range(3):
        slots.release("a", 1)
        await asyncio.sleep(0)
        served.append([i for i, w in enumerate(waiting) if w.done()])
    # a, then b, then c: not a's second request before the others had a turn
    assert served == [[0], [0, 2], [0, 2, 3]]
    slots.close()
    await asyncio.sleep(0)
    assert waiting[1].result() == 0  # closing answers the rest with no slots


async def test_a_waiting_tenant_goes_before_a_refill() -> None:
    slots = FairSlots(2, tenant_share=1.0)
    assert await slots.acquire("a", 2) == 2
    b = asyncio.ensure_future(slots.acquire("b", 1))
    await asyncio.sleep(0)
    slots.release("a", 1)
    await asyncio.sleep(0)
    assert b.result() == 1
    assert slots.try_acquire("a", 1) == 0


def test_items_are_kept_while_the_granted_slots_and_the_tenants_room_hold_them() -> None:
    slots = FairSlots(32)  # a tenant may hold 24
    granted = slots.try_acquire("a", 10)
    # ten items of 8 slots (~500 KB payloads at 64 KiB a slot): three fit in 24
    assert slots.weigh("a", [8] * 10, granted, first=True) == 3
    assert slots.held["a"] == 24 and slots.free == 8
    # another tenant still gets its slots
    assert slots.try_acquire("b", 1) == 1


def test_light_items_give_back_the_slots_they_do_not_use() -> None:
    slots = FairSlots(32)
    granted = slots.try_acquire("a", 10)
    assert slots.weigh("a", [1, 1, 1], granted, first=True) == 3
    assert slots.held["a"] == 3 and slots.free == 29


def test_a_first_item_heavier_than_the_share_still_goes_alone() -> None:
    slots = FairSlots(32)
    granted = slots.try_acquire("a", 4)
    # nothing else in flight: a 1 MiB payload (16 slots) goes, then nothing more fits
    assert slots.weigh("a", [16, 16, 16], granted, first=True) == 1
    assert slots.held["a"] == 16
    # with attempts in flight, the same claim keeps none that does not fit
    granted = slots.try_acquire("a", 4)
    assert slots.weigh("a", [16], granted, first=False) == 0
    assert slots.held["a"] == 16 and slots.free == 16


@given(
    weights=st.lists(st.integers(min_value=1, max_value=16), min_size=1, max_size=40),
    want=st.integers(min_value=1, max_value=40),
    first=st.booleans(),
)
def test_weighing_never_loses_or_invents_slots(weights: list[int], want: int, first: bool) -> None:
    slots = FairSlots(32)
    granted = slots.try_acquire("a", want)
    kept = slots.weigh("a", weights, granted, first=first)
    held = sum(weights[:kept])
    assert slots.held.get("a", 0) == held
    assert slots.free == 32 - held
    assert held <= 24 or (first and kept == 1)
    assert kept >= 1 or not first
    slots.release("a", held)
    assert slots.free == 32 and "a" not in slots.held


def test_a_tenants_second_drainer_does_not_send_past_the_share_too() -> None:
    # (each target has its drainer: were "nothing in flight" enough, 200 of one tenant's
    # targets would each send one 1 MiB attempt, 3,072 slots held of 256)
    slots = FairSlots(32)
    assert slots.weigh("a", [16], slots.try_acquire("a", 1), first=True) == 1
    assert slots.weigh("a", [16], slots.try_acquire("a", 1), first=True) == 0
    assert slots.held["a"] == 16 and slots.free == 16
    # another tenant keeps its slots
    assert slots.try_acquire("b", 8) == 8
