"""Ordered delivery per object: one key at a time, in order; other keys do not wait.

Real `relay worker` processes, real receivers on 127.0.0.1, real Postgres.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tests.conftest import Tenant, assert_error, make_tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Receiver, Workers, eventually, fetch

Key = tuple[str, str]


def now(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``predicate`` as the coroutine function that ``eventually`` polls."""

    async def check() -> bool:
        return predicate()

    return check


class OrderChecker:
    """A receiver behaviour that fails at random and checks the order of what arrives.

    Events carry ``objectType``/``objectId`` (their key) and ``seq``, their place
    in the key's order. An event may arrive only once every earlier event of its
    key was answered 2xx (the head may arrive twice, never the next one early).
    """

    def __init__(self, fail_rate: float = 0.0, max_failures: int = 0, seed: int = 14) -> None:
        self.rng = random.Random(seed)
        self.fail_rate, self.max_failures = fail_rate, max_failures
        self.failures: Counter[tuple[Key, int]] = Counter()
        self.acked: dict[Key, set[int]] = {}
        self.arrivals: list[tuple[Key, int, float]] = []
        self.violations: list[str] = []
        #: keys answered 500 until removed from here
        self.broken: set[Key] = set()
        #: seconds to hold each request (to have attempts in flight)
        self.hold_s = 0.0

    async def __call__(self, request: web.Request, count: int) -> web.StreamResponse:
        body = json.loads(await request.read())
        key, seq = (body["objectType"], str(body["objectId"])), body["seq"]
        self.arrivals.append((key, seq, time.monotonic()))
        done = self.acked.setdefault(key, set())
        early = [s for s in range(seq) if s not in done]
        if early:
            self.violations.append(f"{key} #{seq} arrived before #{early} was acknowledged")
        if self.hold_s:
            await asyncio.sleep(self.hold_s)
        failing = self.failures[(key, seq)] < self.max_failures
        if key in self.broken or (failing and self.rng.random() < self.fail_rate):
            self.failures[(key, seq)] += 1
            return web.Response(status=500, text="not now")
        done.add(seq)
        return web.Response(status=200, text="ok")

    def delivered(self, key: Key) -> list[int]:
        """The order in which ``key``'s events were first acknowledged."""
        return sorted(self.acked.get(key, set()))

    def first_arrivals(self, key: Key) -> list[int]:
        return list(dict.fromkeys(s for k, s, _ in self.arrivals if k == key))


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


def event(kind: str, object_id: str, seq: int, **extra: Any) -> dict[str, Any]:
    return {
        "uuid": f"{kind}-{object_id}-{seq}-{random.random()}",
        "objectType": kind,
        "action": "updated",
        "objectId": object_id,
        "seq": seq,
        **extra,
    }


async def _post(gateway: Any, source: dict[str, Any], body: Any) -> None:
    resp = await post_token(gateway, source, body)
    assert resp.status == 202, await resp.text()


async def test_each_key_arrives_in_order_under_random_failures(
    workers: Workers,
    gateway: Any,
    receiver: Receiver,
    database_url: str,
) -> None:
    # Given an ordered target whose receiver fails 30 % of attempts (at most twice per event)
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    checker = OrderChecker(fail_rate=0.3, max_failures=2)
    target = await make_target(
        gateway, tenant, url=receiver.on("/ordered", checker), ordering="object"
    )
    assert target["ordering"] == "object" and target["on_dead"] == "skip"
    workers.start(processes=2)

    # When 20 bills get 8 events each, each bill's posted in order (single events and
    # batches of up to 3), the bills concurrently, while two worker processes deliver
    rng = random.Random(7)

    async def post_bill(bill: int) -> None:
        seq = 0
        while seq < 8:
            size = min(rng.randint(1, 3), 8 - seq)
            batch = [event("Bill", f"b{bill}", s) for s in range(seq, seq + size)]
            await _post(gateway, source, batch if size > 1 else batch[0])
            seq += size

    await asyncio.gather(*(post_bill(b) for b in range(20)))
    keys = [("Bill", f"b{b}") for b in range(20)]
    await eventually(now(lambda: all(len(checker.delivered(k)) == 8 for k in keys)), timeout=90)

    # Then every bill's events arrived in the order they were received
    assert checker.violations == []
    for key in keys:
        assert checker.first_arrivals(key) == list(range(8)), key
    # And failures did happen, and every delivery succeeded
    assert sum(checker.failures.values()) > 20

    async def statuses() -> dict[str, int]:
        rows = await fetch(
            database_url,
            "SELECT status, count(*) AS n FROM deliveries WHERE target_id = $1 GROUP BY status",
            target["id"],
        )
        return {r["status"]: r["n"] for r in rows}

    # (the last acknowledgement may arrive just before its attempt is recorded)
    await eventually(lambda: _equals(statuses(), {"succeeded": 160}), timeout=10)


async def test_a_key_behind_retries_does_not_delay_the_other_keys(
    workers: Workers,
    gateway: Any,
    receiver: Receiver,
) -> None:
    # Given an ordered target, a retry 3 s after a failure, and one bill that fails once
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    checker = OrderChecker()
    await make_target(gateway, tenant, url=receiver.on("/behind", checker), ordering="object")
    workers.start(RELAY_RETRY_SCHEDULE="0,3,3")
    checker.broken.add(("Bill", "stuck"))
    await _post(gateway, source, [event("Bill", "stuck", 0), event("Bill", "stuck", 1)])
    await eventually(now(lambda: checker.first_arrivals(("Bill", "stuck")) == [0]), timeout=20)
    checker.broken.clear()

    # When 20 other bills get 2 events each while the stuck one waits for its retry
    started = time.monotonic()
    others = [("Bill", f"o{i}") for i in range(20)]
    for _, object_id in others:
        await _post(gateway, source, [event("Bill", object_id, 0), event("Bill", object_id, 1)])
    await eventually(now(lambda: all(checker.delivered(k) == [0, 1] for k in others)), timeout=20)
    others_done = time.monotonic() - started

    # Then they were all delivered before the stuck bill's second event was even sent
    assert checker.first_arrivals(("Bill", "stuck")) == [0], others_done
    # And the stuck bill then goes on, in order
    await eventually(now(lambda: checker.delivered(("Bill", "stuck")) == [0, 1]), timeout=20)
    assert checker.first_arrivals(("Bill", "stuck")) == [0, 1]
    assert checker.violations == []


async def test_kill_9_of_a_worker_keeps_each_key_in_order(
    workers: Workers,
    gateway: Any,
    receiver: Receiver,
    database_url: str,
) -> None:
    # Given an ordered target with attempts in flight on two separate workers
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    checker = OrderChecker(fail_rate=0.2, max_failures=1)
    checker.hold_s = 0.05
    target = await make_target(
        gateway, tenant, url=receiver.on("/killed", checker), ordering="object"
    )
    doomed = workers.start()
    workers.start()
    keys = [("Bill", f"k{i}") for i in range(10)]
    for seq in range(10):
        await _post(gateway, source, [event("Bill", k, seq) for _, k in keys])

    # When one worker is killed with SIGKILL mid-run, and another takes its place
    await eventually(now(lambda: len(checker.arrivals) >= 20), timeout=30)
    doomed.kill9()
    workers.start()

    # Then every event arrives, each key in order, the next never before its head
    await eventually(now(lambda: all(len(checker.delivered(k)) == 10 for k in keys)), timeout=90)
    assert checker.violations == []
    for key in keys:
        assert checker.delivered(key) == list(range(10))
    rows = await fetch(
        database_url,
        "SELECT count(*) AS n FROM deliveries WHERE target_id = $1 AND status = 'succeeded'",
        target["id"],
    )
    assert rows[0]["n"] == 100


async def _delivery_of(gateway: Any, tenant: Tenant, target_id: str, uuid: str) -> dict[str, Any]:
    resp = await gateway.get("/v1/deliveries", params={"target_id": target_id}, headers=tenant.auth)
    for delivery in (await resp.json())["data"]:
        ev = await gateway.get(f"/v1/events/{delivery['event_id']}", headers=tenant.auth)
        if (await ev.json())["payload"]["uuid"] == uuid:
            one = await gateway.get(f"/v1/deliveries/{delivery['id']}", headers=tenant.auth)
            found: dict[str, Any] = await one.json()
            return found
    raise AssertionError(f"no delivery of {uuid}")


async def test_on_dead_block_holds_the_key_until_the_dead_letter_is_replayed(
    workers: Workers,
    gateway: Any,
    receiver: Receiver,
) -> None:
    # Given an ordered target that blocks on a dead letter, and a bill its receiver refuses
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    checker = OrderChecker()
    target = await make_target(
        gateway, tenant, url=receiver.on("/block", checker), ordering="object", on_dead="block"
    )
    checker.broken.add(("Bill", "bad"))
    workers.start()
    bad = [event("Bill", "bad", s) for s in range(3)]
    await _post(gateway, source, bad)
    await _post(gateway, source, [event("Bill", "good", 0), event("Bill", "good", 1)])

    # When the bill's first event dies (3 attempts)
    await eventually(now(lambda: checker.delivered(("Bill", "good")) == [0, 1]), timeout=30)

    async def head_dead() -> bool:
        return (await _delivery_of(gateway, tenant, target["id"], bad[0]["uuid"]))[
            "status"
        ] == "dead"

    await eventually(head_dead, timeout=30)
    # Then the rest of the bill waits behind it, shown on each delivery and on the target
    head = await _delivery_of(gateway, tenant, target["id"], bad[0]["uuid"])
    second = await _delivery_of(gateway, tenant, target["id"], bad[1]["uuid"])
    assert second["status"] == "pending" and second["blocked_by"] == head["id"]
    assert second["next_attempt_at"] is None
    shown = await (await gateway.get(f"/v1/targets/{target['id']}", headers=tenant.auth)).json()
    assert shown["blocked"] == {"keys": 1, "waiting": 2}
    await asyncio.sleep(1)
    assert checker.first_arrivals(("Bill", "bad")) == [0]

    # When the receiver is fixed and the dead letter replayed
    checker.broken.clear()
    resp = await gateway.post(
        "/v1/dead-letters/replay", json={"ids": [head["id"]]}, headers=tenant.auth
    )
    assert resp.status == 202 and (await resp.json())["replayed"] == 1

    # Then the bill goes on, in order
    await eventually(now(lambda: checker.delivered(("Bill", "bad")) == [0, 1, 2]), timeout=30)
    assert checker.first_arrivals(("Bill", "bad")) == [0, 1, 2]
    assert checker.violations == []
    shown = await (await gateway.get(f"/v1/targets/{target['id']}", headers=tenant.auth)).json()
    assert shown["blocked"] == {"keys": 0, "waiting": 0}


async def test_on_dead_skip_goes_on_and_bulk_replay_keeps_the_original_order(
    workers: Workers,
    gateway: Any,
    receiver: Receiver,
    database_url: str,
) -> None:
    # Given an ordered target that skips dead letters, and a bill its receiver refuses
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    checker = OrderChecker()
    target = await make_target(
        gateway, tenant, url=receiver.on("/skip", checker), ordering="object"
    )
    checker.broken.add(("Bill", "bad"))
    workers.start()

    # When its three events are sent, each dying in turn
    await _post(gateway, source, [event("Bill", "bad", s) for s in range(3)])

    async def all_dead() -> bool:
        rows = await fetch(
            database_url,
            "SELECT count(*) AS n FROM deliveries WHERE target_id = $1 AND status = 'dead'",
            target["id"],
        )
        return bool(rows[0]["n"] == 3)

    await eventually(all_dead, timeout=30)
    # Then each was attempted in order, one after the other
    seen = [s for k, s, _ in checker.arrivals if k == ("Bill", "bad")]
    assert seen == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    # When the receiver is fixed and the target's dead letters are replayed at once
    checker.broken.clear()
    checker.acked.clear()
    resp = await gateway.post(
        "/v1/dead-letters/replay", json={"target_id": target["id"]}, headers=tenant.auth
    )
    assert resp.status == 202
    # Then they arrive in their original order
    await eventually(now(lambda: checker.delivered(("Bill", "bad")) == [0, 1, 2]), timeout=30)
    replayed = [s for k, s, _ in checker.arrivals if k == ("Bill", "bad")][9:]
    assert replayed == [0, 1, 2]


async def test_keys_by_envelope_or_json_pointer_and_what_blocks_shows(
    gateway: Any,
) -> None:
    # Given (no worker: the deliveries stay as ingest left them) an ordered target keyed
    # by a JSON pointer and another keyed by objectType + objectId
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    by_pointer = await make_target(
        gateway,
        tenant,
        ordering="object",
        ordering_key="/data/invoice/id",
        filter={"objectType": ["Invoice"]},
    )
    by_object = await make_target(
        gateway, tenant, ordering="object", filter={"objectType": ["Bill"]}
    )
    unordered = await make_target(gateway, tenant, filter={"objectType": ["Bill"]})

    # When events are received
    inv = [
        {"uuid": "i1a", "objectType": "Invoice", "data": {"invoice": {"id": 1}}},
        {"uuid": "i1b", "objectType": "Invoice", "data": {"invoice": {"id": 1}}},
        {"uuid": "i2a", "objectType": "Invoice", "data": {"invoice": {"id": 2}}},
        {"uuid": "i-none-a", "objectType": "Invoice", "data": {}},
        {"uuid": "i-none-b", "objectType": "Invoice"},
    ]
    bills = [
        {"uuid": "b7a", "objectType": "Bill", "objectId": 7},
        {"uuid": "b7b", "objectType": "Bill", "objectId": 7},
        {"uuid": "b7c", "objectType": "Bill", "objectId": "7"},
        {"uuid": "b8a", "objectType": "Bill", "objectId": 8},
    ]
    await _post(gateway, source, inv)
    await _post(gateway, source, bills)

    # Then the first of each key is due and the others wait behind it
    async def shown(target: dict[str, Any], uuid: str) -> dict[str, Any]:
        return await _delivery_of(gateway, tenant, target["id"], uuid)

    i1a, i1b = await shown(by_pointer, "i1a"), await shown(by_pointer, "i1b")
    assert "blocked_by" not in i1a and i1a["next_attempt_at"] is not None
    assert i1b["blocked_by"] == i1a["id"] and i1b["next_attempt_at"] is None
    for uuid in ("i2a", "i-none-a", "i-none-b"):
        assert "blocked_by" not in await shown(by_pointer, uuid), uuid
    b7a = await shown(by_object, "b7a")
    assert (await shown(by_object, "b7b"))["blocked_by"] == b7a["id"]
    # objectId 7 and "7" are one object: SoftLedger's ids are compared as text
    assert "blocked_by" in await shown(by_object, "b7c")
    assert "blocked_by" not in await shown(by_object, "b8a")
    for uuid in ("b7a", "b7b", "b7c"):
        assert "blocked_by" not in await shown(unordered, uuid)

    # When the target stops ordering, what waited is released
    resp = await gateway.patch(
        f"/v1/targets/{by_object['id']}", json={"ordering": "none"}, headers=tenant.auth
    )
    assert resp.status == 200 and (await resp.json())["ordering"] == "none"
    b7b = await shown(by_object, "b7b")
    assert "blocked_by" not in b7b and b7b["next_attempt_at"] is not None


async def test_ordering_options_are_validated(gateway: Any, tenant: Tenant) -> None:
    for body, field in [
        ({"ordering": "fifo"}, "ordering"),
        ({"ordering": "object", "ordering_key": "data/id"}, "ordering_key"),
        ({"ordering": "object", "ordering_key": "/a/~2"}, "ordering_key"),
        ({"on_dead": "retry"}, "on_dead"),
    ]:
        resp = await gateway.post(
            "/v1/targets", json={"url": "http://127.0.0.1:9/x", **body}, headers=tenant.auth
        )
        error = await assert_error(resp, 422, "validation_error")
        assert field in json.dumps(error), (body, error)
    target = await make_target(gateway, tenant, ordering="object", ordering_key="/a/0/b~1c")
    assert target["ordering_key"] == "/a/0/b~1c"
    resp = await gateway.patch(
        f"/v1/targets/{target['id']}", json={"ordering": None}, headers=tenant.auth
    )
    await assert_error(resp, 422, "validation_error")
