"""The delivery engine: per-target cap, circuit breaker, fairness, batch claims.

Real `relay worker` processes, real receivers on 127.0.0.1, real Postgres and
the configured broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from relay.store import claims
from relay.store.key_queues import lock_keys
from tests.conftest import Tenant, make_tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Concurrency, Receiver, Workers, eventually, fetch, hang


async def _statuses(database_url: str, target_id: str) -> dict[str, int]:
    rows = await fetch(
        database_url,
        "SELECT status, count(*) AS n FROM deliveries WHERE target_id = $1 GROUP BY status",
        target_id,
    )
    return {r["status"]: r["n"] for r in rows}


async def _all_succeeded(database_url: str, target_id: str, n: int) -> bool:
    return await _statuses(database_url, target_id) == {"succeeded": n}


async def test_a_target_never_has_more_than_max_in_flight_attempts_at_once(
    workers: Workers, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given a target that allows 3 attempts at once and a receiver that counts them
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    counter = Concurrency(hold_s=0.3)
    target = await make_target(
        gateway, tenant, url=receiver.on("/capped", counter), max_in_flight=3
    )
    assert target["max_in_flight"] == 3
    # When 30 events are due at once and two worker processes drain them
    await post_token(gateway, source, [{"uuid": f"cap-{i}"} for i in range(30)])
    workers.start(processes=2)
    await eventually(lambda: _all_succeeded(database_url, target["id"], 30), timeout=60)
    # Then the receiver never saw more than 3 at once, and did see 3
    assert counter.most == 3
    assert len(receiver.at("/capped")) == 30


async def test_max_in_flight_is_bounded_and_can_be_changed(gateway: Any, tenant: Tenant) -> None:
    target = await make_target(gateway, tenant)
    assert target["max_in_flight"] == 10
    assert target["circuit"] == {"state": "closed", "reason": None, "until": None}
    for bad in (0, 1001, "5", None, 2.5):
        resp = await gateway.patch(
            f"/v1/targets/{target['id']}", json={"max_in_flight": bad}, headers=tenant.auth
        )
        assert resp.status == 422, (bad, await resp.text())
    resp = await gateway.patch(
        f"/v1/targets/{target['id']}", json={"max_in_flight": 1000}, headers=tenant.auth
    )
    assert resp.status == 200
    got = await (await gateway.get(f"/v1/targets/{target['id']}", headers=tenant.auth)).json()
    assert got["max_in_flight"] == 1000


async def _target(gateway: Any, tenant: Tenant, target_id: str) -> dict[str, Any]:
    resp = await gateway.get(f"/v1/targets/{target_id}", headers=tenant.auth)
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def _attempt_count(database_url: str, target_id: str) -> int:
    rows = await fetch(
        database_url,
        "SELECT count(*) AS n FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
        "WHERE d.target_id = $1",
        target_id,
    )
    return int(rows[0]["n"])


async def test_the_breaker_opens_spends_nothing_while_open_probes_once_and_closes(
    workers: Workers, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given a target that answers 503 until told otherwise, one attempt at a time
    healthy = False

    async def flaky(request: web.Request, count: int) -> web.StreamResponse:
        return web.Response(status=200 if healthy else 503)

    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    target = await make_target(gateway, tenant, url=receiver.on("/flaky", flaky), max_in_flight=1)
    # (the last wait makes the retry window, ~5 min, outlast the open periods: the
    # breaker never lengthens it, and deliveries whose window ends while it is open die)
    worker = workers.start(
        RELAY_BREAKER_THRESHOLD="3",
        RELAY_BREAKER_OPEN_S="3",
        RELAY_BREAKER_MAX_OPEN_S="60",
        RELAY_RETRY_SCHEDULE=",".join(["0"] + ["0.2"] * 30 + ["300"]),
    )
    await post_token(gateway, source, [{"uuid": f"brk-{i}"} for i in range(4)])

    # When it has failed 3 times in a row, the breaker opens
    async def opened() -> dict[str, Any] | None:
        shown = await _target(gateway, tenant, target["id"])
        return shown if shown["circuit"]["state"] == "open" else None

    shown = await eventually(opened, timeout=30, every=0.05)
    assert "3 failures in a row" in shown["circuit"]["reason"]
    assert "HTTP 503" in shown["circuit"]["reason"]
    assert shown["circuit"]["until"] is not None
    # Then while it is open no attempt is made, and none is spent
    received, attempts = (
        len(receiver.at("/flaky")),
        await _attempt_count(database_url, target["id"]),
    )
    await asyncio.sleep(2.0)
    assert len(receiver.at("/flaky")) == received
    assert await _attempt_count(database_url, target["id"]) == attempts

    # When its open period ends, exactly one probe goes through; it fails and the breaker reopens
    async def reopened() -> dict[str, Any] | None:
        now = await _target(gateway, tenant, target["id"])
        reason = now["circuit"]["reason"] or ""
        return now if now["circuit"]["state"] == "open" and "probe" in reason else None

    shown = await eventually(reopened, timeout=15, every=0.05)
    assert len(receiver.at("/flaky")) == received + 1
    await asyncio.sleep(1.0)
    assert len(receiver.at("/flaky")) == received + 1

    # When the receiver recovers, the next probe closes the breaker and everything is sent
    healthy = True
    await eventually(lambda: _all_succeeded(database_url, target["id"], 4), timeout=30)
    shown = await _target(gateway, tenant, target["id"])
    assert shown["circuit"] == {"state": "closed", "reason": None, "until": None}
    rows = await fetch(
        database_url,
        "SELECT max(attempt_count) AS n FROM deliveries WHERE target_id = $1",
        target["id"],
    )
    # the schedule allows 32 attempts; the open periods spent none of them
    assert rows[0]["n"] <= 6
    # and the worker logged each opening (WARNING) and the closing (INFO), once each
    lines = [json.loads(x) for x in worker.log().splitlines() if x.startswith("{")]
    ours = [x for x in lines if x.get("target_id") == target["id"]]
    opened_lines = [x for x in ours if x["msg"] == "circuit breaker opened"]
    closed_lines = [x for x in ours if x["msg"] == "circuit breaker closed"]
    assert len(opened_lines) >= 2 and {x["level"] for x in opened_lines} == {"warning"}
    assert all(x["tenant_id"] == tenant.id and x["until"] for x in opened_lines)
    assert "3 failures in a row" in opened_lines[0]["reason"]
    assert "probe failed" in opened_lines[1]["reason"]
    assert len(closed_lines) == 1 and closed_lines[0]["level"] == "info"


async def test_a_hanging_tenant_does_not_delay_another_tenants_fresh_event(
    workers: Workers, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given tenant A with three targets that never answer and a backlog to each
    a = await make_tenant(gateway, "Tenant A")
    a_source = await make_source(gateway, a)
    for n in range(3):
        await make_target(gateway, a, url=receiver.on(f"/a-hangs-{n}", hang(60)))
    await post_token(gateway, a_source, [{"uuid": f"a-{i}"} for i in range(40)])
    # and one worker process with few slots, which A's targets could fill on their own
    workers.start(
        RELAY_WORKER_CONCURRENCY="16", RELAY_DELIVERY_TIMEOUT_S="5", RELAY_BREAKER_THRESHOLD="50"
    )

    async def a_hanging() -> bool:
        return sum(len(receiver.at(f"/a-hangs-{n}")) for n in range(3)) >= 12

    await eventually(a_hanging, timeout=30)
    # When tenant B sends a test event to its healthy target
    b = await make_tenant(gateway, "Tenant B")
    b_target = await make_target(gateway, b, url=receiver.url("/b-healthy"))
    started = time.monotonic()
    resp = await gateway.post(f"/v1/targets/{b_target['id']}/test", headers=b.auth)
    assert resp.status == 202
    # Then it arrives within a second or two, not after A's timeouts
    await eventually(lambda: _received(receiver, "/b-healthy"), timeout=20, every=0.02)
    waited = receiver.at("/b-healthy")[0].at - started
    errors = await fetch(database_url, "SELECT DISTINCT error FROM attempts")
    assert waited < 2.0, f"tenant B waited {waited:.1f}s behind tenant A; {errors}"


async def _received(receiver: Receiver, path: str) -> bool:
    return bool(receiver.at(path))


async def test_a_tenant_whose_records_wait_on_locks_leaves_connections_to_another_tenant(
    workers: Workers, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given tenant A with more ordered targets than a worker process has Postgres
    # connections (10), one event to each, held open by A's receivers
    a = await make_tenant(gateway, "Tenant A")
    a_source = await make_source(gateway, a)
    release = asyncio.Event()

    async def held(request: web.Request, count: int) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    a_targets = [
        await make_target(
            gateway, a, url=receiver.on(f"/a-{n}", held), ordering="object", ordering_key="/k"
        )
        for n in range(12)
    ]
    resp = await post_token(gateway, a_source, {"uuid": "a-1", "k": "k1"})
    assert resp.status == 202
    workers.start()

    async def all_sent() -> bool:
        return all(receiver.at(f"/a-{n}") for n in range(12))

    await eventually(all_sent, timeout=30)
    # and every key of A's locked by another transaction (as a long ingest of A's holds
    # them), so that recording A's attempts waits, each on a connection of its own
    locker = await asyncpg.connect(database_url)
    try:
        locked = locker.transaction()
        await locked.start()
        await lock_keys(locker, [(t["id"], "k1") for t in a_targets])
        release.set()
        await asyncio.sleep(1)  # A's records are waiting for the locks

        # When tenant B sends an event to its healthy target
        b = await make_tenant(gateway, "Tenant B")
        b_source = await make_source(gateway, b)
        await make_target(gateway, b, url=receiver.url("/b-healthy"))
        assert (await post_token(gateway, b_source, {"uuid": "b-1"})).status == 202

        # Then it arrives while A's records still wait (before, B's claim waited for a
        # connection that A's stalled records all held, until they ended)
        await eventually(lambda: _received(receiver, "/b-healthy"), timeout=15)
        assert await _statuses(database_url, a_targets[0]["id"]) != {"succeeded": 1}
        await locked.rollback()
    finally:
        await locker.close()
    # and A's attempts are recorded once the locks are free
    for target in a_targets:
        await eventually(lambda t=target: _all_succeeded(database_url, t["id"], 1), timeout=30)


async def test_two_worker_processes_attempt_each_delivery_once(
    workers: Workers, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given 4 targets with 250 due deliveries each
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    targets = [
        await make_target(gateway, tenant, url=receiver.url(f"/twice-{n}")) for n in range(4)
    ]
    for start in range(0, 250, 125):
        batch = [{"uuid": f"two-{i}"} for i in range(start, start + 125)]
        assert (await post_token(gateway, source, batch)).status == 202
    # When two worker processes drain them
    workers.start(processes=2)
    for target in targets:
        await eventually(lambda t=target: _all_succeeded(database_url, t["id"], 250), timeout=90)
    # Then every delivery was attempted once and received once
    rows = await fetch(
        database_url,
        "SELECT count(*) AS n, count(DISTINCT delivery_id) AS d FROM attempts WHERE tenant_id = $1",
        tenant.id,
    )
    assert rows[0]["n"] == rows[0]["d"] == 1000
    for n in range(4):
        ids = [r.headers["webhook-id"] for r in receiver.at(f"/twice-{n}")]
        assert len(ids) == len(set(ids)) == 250


async def test_concurrent_claims_of_one_target_never_overlap_nor_pass_its_cap(
    gateway: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a target with a cap of 7 and 100 due deliveries
    source = await make_source(gateway, tenant)
    target = await make_target(gateway, tenant, max_in_flight=7)
    await post_token(gateway, source, [{"uuid": f"claim-{i}"} for i in range(100)])
    conns = [await asyncpg.connect(database_url) for _ in range(12)]
    try:
        # When twelve connections claim at once, each up to 5
        results = await asyncio.gather(
            *(claims.claim_batch(c, target["id"], want=5, lease_s=60) for c in conns)
        )
        claimed = [row.id for _, rows in results for row in rows]
        # Then 7 are leased in all, each once
        assert len(claimed) == len(set(claimed)) == 7
        # and a later claim finds the cap full
        _, more = await claims.claim_batch(conns[0], target["id"], want=5, lease_s=60)
        assert more == []
    finally:
        for c in conns:
            await c.close()


async def test_the_sweeper_wakes_each_target_once_however_deep_its_backlog(
    gateway: Any, tenant: Tenant, database_url: str
) -> None:
    # Given two targets with 2,000 deliveries each whose wake-ups were lost
    source = await make_source(gateway, tenant)
    targets = [await make_target(gateway, tenant) for _ in range(2)]
    for start in range(0, 2000, 1000):
        batch = [{"uuid": f"sw-{i}"} for i in range(start, start + 1000)]
        assert (await post_token(gateway, source, batch)).status == 202
    disabled = await make_target(gateway, tenant)
    await post_token(gateway, source, {"uuid": "sw-disabled"})
    await gateway.patch(
        f"/v1/targets/{disabled['id']}", json={"enabled": False}, headers=tenant.auth
    )
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE deliveries SET enqueued_until = now() - interval '1 second'")
        # When the sweeper looks twice within its grace
        first = await claims.targets_to_wake(conn, grace_s=30, limit=100)
        second = await claims.targets_to_wake(conn, grace_s=30, limit=100)
    finally:
        await conn.close()
    # Then it wakes each enabled target once (one message each), then leaves them be
    ours = [w for w in first if w.tenant_id == tenant.id]
    assert sorted(w.target_id for w in ours) == sorted(t["id"] for t in targets)
    assert [w for w in second if w.tenant_id == tenant.id] == []


@pytest.mark.skipif(
    (os.environ.get("BROKER_URL") or "redis").startswith("amqp"),
    reason="reads the Redis broker's queues",
)
async def test_a_rate_limited_backlog_waits_in_postgres_not_on_the_broker(
    workers: Workers, gateway: Any, receiver: Receiver, database_url: str, clean_redis: str
) -> None:
    import redis.asyncio as aioredis

    # Given a target limited to 5 deliveries a second and 200 due to it
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    target = await make_target(gateway, tenant, url=receiver.url("/slow-limit"), rate_limit=5)
    await post_token(gateway, source, [{"uuid": f"slow-{i}"} for i in range(200)])
    workers.start()
    # When it has been draining for a while
    await eventually(lambda: _received(receiver, "/slow-limit"), timeout=20)
    await asyncio.sleep(3)
    # Then the backlog waits in Postgres: the broker holds (almost) nothing for it
    client = aioredis.from_url(clean_redis)
    try:
        held = 0
        for key in await client.keys("dramatiq:*.msgs"):
            held += await client.hlen(key)
    finally:
        await client.aclose()
    pending = (await _statuses(database_url, target["id"])).get("pending", 0)
    assert pending >= 150
    assert held <= 3, f"{held} messages on the broker"
    # and deferrals spent no attempt
    rows = await fetch(
        database_url,
        "SELECT max(attempt_count) AS n FROM deliveries WHERE target_id = $1",
        target["id"],
    )
    assert rows[0]["n"] == 1


async def test_a_tenants_big_payloads_in_flight_are_bounded_by_bytes_not_only_attempts(
    workers: Workers, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given tenant A with 30 events of ~500 KB due to a target that allows 50 at once,
    # a receiver that holds each request 0.5 s, and one worker process with 32 slots
    # (a tenant may hold 24 of them: 24 attempts, before, whatever their size)
    a = await make_tenant(gateway, "Tenant A")
    a_source = await make_source(gateway, a)
    counter = Concurrency(hold_s=0.5)
    big = await make_target(gateway, a, url=receiver.on("/a-big", counter), max_in_flight=50)
    filler = "x" * 500_000
    for i in range(30):
        answer = await post_token(gateway, a_source, [{"uuid": f"big-{i}", "filler": filler}])
        assert answer.status == 202
    workers.start(RELAY_WORKER_CONCURRENCY="32")

    async def a_sending() -> bool:
        return counter.now > 0

    await eventually(a_sending, timeout=30, every=0.02)
    # When tenant B sends a test event meanwhile
    b = await make_tenant(gateway, "Tenant B")
    b_target = await make_target(gateway, b, url=receiver.url("/b-small"))
    started = time.monotonic()
    assert (await gateway.post(f"/v1/targets/{b_target['id']}/test", headers=b.auth)).status == 202

    # Then A never has more than 3 of them in flight (an attempt holds a slot per 64 KiB
    # of payload: 8 each, 24 for the tenant), all arrive whole, and B's arrives at once
    await eventually(lambda: _all_succeeded(database_url, big["id"], 30), timeout=90)
    assert 1 <= counter.most <= 3, counter.most
    bodies = [json.loads(r.body) for r in receiver.at("/a-big")]
    assert {b["uuid"] for b in bodies} >= {f"big-{i}" for i in range(30)}
    assert all(len(b["filler"]) == 500_000 for b in bodies)
    waited = receiver.at("/b-small")[0].at - started
    assert waited < 2.0, f"tenant B waited {waited:.1f} s behind tenant A's big payloads"
