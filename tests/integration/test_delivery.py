"""Delivery through a real `relay worker` to real receivers on 127.0.0.1."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import os
import time
from typing import Any

import asyncpg
import standardwebhooks
import svix.webhooks

from relay.core.crypto import SecretBox, seal_headers
from relay.store import claims
from relay.store import targets as target_store
from tests.conftest import SECRET_KEY, Tenant, make_tenant
from tests.integration.test_ingest import SOFTLEDGER, make_source, make_target, post_token
from tests.stack import (
    Receiver,
    drained,
    ended_attempt,
    eventually,
    fail_then_succeed,
    fetch,
    hang,
    status,
)


async def setup(
    gateway: Any, receiver: Receiver, path: str = "/hook", **target: Any
) -> tuple[Tenant, dict[str, Any], dict[str, Any]]:
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    created = await make_target(gateway, tenant, url=receiver.url(path), **target)
    return tenant, source, created


async def delivery_of(database_url: str, event_id: str, target_id: str) -> Any:
    rows = await fetch(
        database_url,
        "SELECT * FROM deliveries WHERE event_id = $1 AND target_id = $2",
        event_id,
        target_id,
    )
    return rows[0] if rows else None


async def finished(database_url: str, event_id: str, target_id: str) -> Any:
    async def check() -> Any:
        row = await delivery_of(database_url, event_id, target_id)
        return row if row is not None and row["status"] in ("succeeded", "dead") else None

    return await eventually(check, timeout=30)


async def attempts_of(database_url: str, delivery_id: str) -> list[Any]:
    return await fetch(
        database_url, "SELECT * FROM attempts WHERE delivery_id = $1 ORDER BY id", delivery_id
    )


async def test_delivery_is_signed_and_carries_the_exact_bytes(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    tenant, source, target = await setup(gateway, receiver, headers={"X-Env": "prod"})
    raw = b'{"uuid": "sig-1", "objectType": "Bill",   "action": "paid", "amount": 1.50}'
    [event_id] = (await (await post_token(gateway, source, raw)).json())["event_ids"]
    row = await finished(database_url, event_id, target["id"])
    assert row["status"] == "succeeded" and row["attempt_count"] == 1
    [got] = receiver.at("/hook")
    assert got.body == raw
    assert got.headers["webhook-id"] == event_id
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-Env"] == "prod"
    assert got.headers["User-Agent"].startswith("Relay/")
    verified = standardwebhooks.Webhook(target["secret"]).verify(got.body, got.headers)
    assert verified == json.loads(raw)
    svix.webhooks.Webhook(target["secret"]).verify(got.body, got.headers)
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 30
    [attempt] = await attempts_of(database_url, row["id"])
    assert attempt["status_code"] == 200 and attempt["response_body"] == "ok"
    assert attempt["tenant_id"] == tenant.id


async def test_a_large_event_is_signed_as_a_small_one(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given an event of ~600 KB (a body that large is signed on a thread of the
    # worker's, off its event loop), sent during a secret rotation's overlap
    tenant, source, target = await setup(gateway, receiver)
    rotated = await gateway.post(f"/v1/targets/{target['id']}/rotate-secret", headers=tenant.auth)
    assert rotated.status == 200, await rotated.text()
    new_secret = (await rotated.json())["secret"]
    raw = json.dumps({"uuid": "big-1", "objectType": "Bill", "notes": "x" * 600_000}).encode()
    [event_id] = (await (await post_token(gateway, source, raw)).json())["event_ids"]
    row = await finished(database_url, event_id, target["id"])
    assert row["status"] == "succeeded"
    # Then it arrives byte for byte, and both libraries verify it with either secret
    [got] = receiver.at("/hook")
    assert got.body == raw
    for secret in (target["secret"], new_secret):
        assert standardwebhooks.Webhook(secret).verify(got.body, got.headers)["uuid"] == "big-1"
        svix.webhooks.Webhook(secret).verify(got.body, got.headers)


async def test_batch_elements_arrive_as_compact_json(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    _, source, target = await setup(gateway, receiver)
    batch = [{"uuid": "b1", "z": 1, "a": 2}, {"uuid": "b2", "n": "é"}]
    ids = (await (await post_token(gateway, source, batch)).json())["event_ids"]
    for event_id in ids:
        await finished(database_url, event_id, target["id"])
    bodies = {r.headers["webhook-id"]: r.body for r in receiver.at("/hook")}
    assert bodies == {
        ids[0]: b'{"uuid":"b1","z":1,"a":2}',
        ids[1]: '{"uuid":"b2","n":"é"}'.encode(),
    }
    for got in receiver.at("/hook"):
        standardwebhooks.Webhook(target["secret"]).verify(got.body, got.headers)


async def test_fails_twice_then_succeeds_with_three_attempts(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    receiver.on("/flaky", fail_then_succeed(2))
    _, source, target = await setup(gateway, receiver, "/flaky")
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]
    row = await finished(database_url, event_id, target["id"])
    assert row["status"] == "succeeded" and row["attempt_count"] == 3
    attempts = await attempts_of(database_url, row["id"])
    assert [a["status_code"] for a in attempts] == [500, 500, 200]
    assert [a["response_body"] for a in attempts] == ["failure 1", "failure 2", "finally"]
    assert {r.headers["webhook-id"] for r in receiver.at("/flaky")} == {event_id}
    # each retry is re-signed and still verifies
    for got in receiver.at("/flaky"):
        standardwebhooks.Webhook(target["secret"]).verify(got.body, got.headers)


async def test_always_failing_target_ends_dead_after_the_schedule(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str, clean_redis: str
) -> None:
    receiver.on("/down", status(500, text="x" * 10_000))
    _, source, target = await setup(gateway, receiver, "/down")
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]
    row = await finished(database_url, event_id, target["id"])
    assert row["status"] == "dead" and row["attempt_count"] == 3  # schedule 0,0.3,0.3
    assert row["next_attempt_at"] is None and row["last_status_code"] == 500
    assert "HTTP 500" in row["last_error"]
    attempts = await attempts_of(database_url, row["id"])
    # the stored answer is the start of the body, cut at 4 KiB (read until the cap)
    assert [a["response_body"] for a in attempts] == ["x" * 4096] * 3
    # waits between attempts follow the schedule with jitter (0.3 s ± 20 %, plus overhead)
    times = [r.at for r in receiver.at("/down")]
    assert all(0.24 <= b - a < 3 for a, b in itertools.pairwise(times))
    # nothing more is sent: every message the relay had queued has been run
    await drained(clean_redis)
    assert len(receiver.at("/down")) == 3


async def test_retry_after_is_honoured(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    async def slow_down(request: Any, count: int) -> Any:
        from aiohttp import web

        if count == 0:
            return web.Response(status=429, headers={"Retry-After": "2"})
        return web.Response(status=200)

    receiver.on("/limited", slow_down)
    _, source, target = await setup(gateway, receiver, "/limited")
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]
    row = await finished(database_url, event_id, target["id"])
    assert row["status"] == "succeeded" and row["attempt_count"] == 2
    first, second = receiver.at("/limited")
    assert second.at - first.at >= 1.9  # the schedule alone would have waited 0.3 s


async def test_410_disables_the_target(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    receiver.on("/gone", status(410))
    tenant, source, target = await setup(gateway, receiver, "/gone")
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]
    row = await finished(database_url, event_id, target["id"])
    assert row["status"] == "dead" and row["attempt_count"] == 1
    got = await (await gateway.get(f"/v1/targets/{target['id']}", headers=tenant.auth)).json()
    assert got["enabled"] is False and "410" in got["disabled_reason"]
    # and nothing more is routed to it
    [second] = (await (await post_token(gateway, source, {"n": 2})).json())["event_ids"]
    assert await delivery_of(database_url, second, target["id"]) is None


async def _record_200_and_410(
    gateway: Any, receiver: Receiver, database_url: str, path: str, *, lose_410_lease: bool
) -> tuple[Tenant, dict[str, Any], list[str], list[str]]:
    """Two attempts of one target recorded in one batch, as a worker does: one answered
    200, the other 410 Gone (``lose_410_lease``: another worker took the 410's lease
    meanwhile). The tenant, the target, the two deliveries' ids and those recorded."""
    tenant, source, target = await setup(gateway, receiver, path)
    assert (await post_token(gateway, source, [{"n": 1}, {"n": 2}])).status == 202
    conn = await asyncpg.connect(database_url)
    try:
        _, [ok, gone] = await claims.claim_batch(conn, target["id"], want=2, lease_s=60)
        if lose_410_lease:
            await conn.execute(
                "UPDATE deliveries SET locked_until = locked_until + interval '1 s' WHERE id = $1",
                gone.id,
            )
        answered_gone = dataclasses.replace(
            ended_attempt(gone, 410),
            status="dead",
            delay_s=None,
            disable_reason="the target answered 410 Gone",
        )
        batch = [ended_attempt(ok, 200), answered_gone]
        recorded = await claims.record_batch(conn, target["id"], batch, breaker=None)
    finally:
        await conn.close()
    return tenant, target, [ok.id, gone.id], recorded


async def test_a_410_among_successes_disables_the_target(
    gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given a busy target: two attempts ended together, recorded in one batch, one of
    # them answered 410 Gone and the other 200
    tenant, target, [ok, gone], recorded = await _record_200_and_410(
        gateway, receiver, database_url, "/busy", lose_410_lease=False
    )
    # Then the target is disabled all the same (before, a success in the batch kept
    # it enabled, and the backlog went on to a receiver that said it is gone)
    assert sorted(recorded) == sorted([ok, gone])
    got = await (await gateway.get(f"/v1/targets/{target['id']}", headers=tenant.auth)).json()
    assert got["enabled"] is False and "410" in got["disabled_reason"]
    [told] = await fetch(
        database_url,
        "SELECT payload FROM events WHERE tenant_id = $1 AND operational"
        " AND object_type = 'Target' AND action = 'disabled'",
        tenant.id,
    )
    assert "410" in json.loads(told["payload"])["data"]["reason"]


async def test_a_410_whose_lease_was_lost_does_not_disable_the_target(
    gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given two attempts recorded together, one 200 and one 410 whose lease another
    # worker has taken since (its attempt is not recorded: that worker makes it again)
    tenant, target, [ok, _], recorded = await _record_200_and_410(
        gateway, receiver, database_url, "/lost", lose_410_lease=True
    )
    # Then only the success is recorded, and the target stays enabled
    assert recorded == [ok]
    got = await (await gateway.get(f"/v1/targets/{target['id']}", headers=tenant.auth)).json()
    assert got["enabled"] is True


async def test_hanging_receiver_times_out_and_the_error_is_recorded(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    receiver.on("/hang", hang(5))
    _, source, target = await setup(gateway, receiver, "/hang")
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]

    async def first_attempt() -> Any:
        row = await delivery_of(database_url, event_id, target["id"])
        return row if row and row["attempt_count"] >= 1 else None

    row = await eventually(first_attempt, timeout=20)
    assert row["last_error"] == "timeout" and row["last_status_code"] is None
    [attempt, *_] = await attempts_of(database_url, row["id"])
    assert attempt["error"] == "timeout" and 900 <= attempt["duration_ms"] < 3000


async def test_redirect_is_not_followed(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    receiver.on("/moved", status(302, headers={"Location": "/elsewhere"}))
    _, source, target = await setup(gateway, receiver, "/moved")
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]
    row = await finished(database_url, event_id, target["id"])
    assert row["status"] == "dead" and row["last_status_code"] == 302
    assert receiver.at("/elsewhere") == []


async def test_a_message_sent_twice_yields_one_success(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str, clean_redis: str
) -> None:
    receiver.on("/slow", hang(0.5))
    _, source, target = await setup(gateway, receiver, "/slow")
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]
    row = await delivery_of(database_url, event_id, target["id"])
    # When the same delivery is put on the broker again, several times, at once
    from relay.delivery.wakeups import Enqueuer, make_broker

    # on the broker the worker consumes (CI runs these tests on RabbitMQ too)
    enqueuer = Enqueuer(make_broker(os.environ.get("BROKER_URL") or clean_redis, middleware=[]))
    await enqueuer.enqueue([row["id"]] * 5)
    await enqueuer.close()
    final = await finished(database_url, event_id, target["id"])
    await drained(clean_redis)  # every copy of the message has been run
    # Then the receiver got it once, and one success is recorded
    assert final["status"] == "succeeded" and final["attempt_count"] == 1
    assert len(receiver.at("/slow")) == 1
    assert len(await attempts_of(database_url, row["id"])) == 1


async def test_per_target_rate_limit_holds(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    _, source, _target = await setup(gateway, receiver, "/limited-target", rate_limit=5)
    batch = [{"uuid": f"rl-{i}"} for i in range(20)]
    ids = (await (await post_token(gateway, source, batch)).json())["event_ids"]

    async def all_done() -> bool:
        rows = await fetch(
            database_url, "SELECT status FROM deliveries WHERE event_id = ANY($1)", ids
        )
        return all(r["status"] == "succeeded" for r in rows)

    await eventually(all_done, timeout=30)
    per_second: dict[int, int] = {}
    for got in receiver.at("/limited-target"):
        # the limiter's windows are wall-clock seconds: count in the same frame
        second = int(float(got.headers["webhook-timestamp"]))
        per_second[second] = per_second.get(second, 0) + 1
    assert sum(per_second.values()) == 20
    assert max(per_second.values()) <= 5, per_second
    rows = await fetch(
        database_url, "SELECT attempt_count FROM deliveries WHERE event_id = ANY($1)", ids
    )
    assert {r["attempt_count"] for r in rows} == {1}  # deferrals spend no attempt


async def test_deleted_target_receives_nothing(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str, clean_redis: str
) -> None:
    receiver.on("/down2", status(500))
    tenant, source, target = await setup(gateway, receiver, "/down2")
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]
    await eventually(lambda: _attempted(database_url, event_id))
    assert (await gateway.delete(f"/v1/targets/{target['id']}", headers=tenant.auth)).status == 204
    count = len(receiver.at("/down2"))

    async def given_up() -> bool:
        row = await delivery_of(database_url, event_id, target["id"])
        return bool(row["status"] == "dead")

    await eventually(given_up)
    await drained(clean_redis)
    assert len(receiver.at("/down2")) == count
    row = await delivery_of(database_url, event_id, target["id"])
    assert row["status"] == "dead" and row["last_error"] == "the target was deleted"


async def _attempted(database_url: str, event_id: str) -> bool:
    rows = await fetch(
        database_url, "SELECT attempt_count FROM deliveries WHERE event_id = $1", event_id
    )
    return bool(rows) and rows[0]["attempt_count"] >= 1


async def test_500_events_to_two_targets_arrive_exactly_once(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str, clean_redis: str
) -> None:
    tenant, source, first = await setup(gateway, receiver, "/one")
    second = await make_target(gateway, tenant, url=receiver.url("/two"))
    ids: list[str] = []
    for chunk in range(5):
        batch = [{"uuid": f"many-{chunk}-{i}", "objectType": "Bill"} for i in range(100)]
        ids += (await (await post_token(gateway, source, batch)).json())["event_ids"]

    async def all_succeeded() -> bool:
        rows = await fetch(
            database_url,
            "SELECT count(*) AS n FROM deliveries "
            "WHERE event_id = ANY($1) AND status = 'succeeded'",
            ids,
        )
        return bool(rows[0]["n"] == 1000)

    await eventually(all_succeeded, timeout=60)
    await drained(clean_redis)  # no duplicate still on its way
    for path, target in (("/one", first), ("/two", second)):
        got = [r.headers["webhook-id"] for r in receiver.at(path)]
        assert sorted(got) == sorted(ids), path
        assert len(got) == len(set(got)) == 500
        hook = standardwebhooks.Webhook(target["secret"])
        for r in receiver.at(path)[:50]:
            hook.verify(r.body, r.headers)


BOX = SecretBox(base64.b64decode(SECRET_KEY))


async def _set_target_headers(
    database_url: str, tenant_id: str, target_id: str, headers: dict[str, str]
) -> None:
    """Store ``headers`` on the target behind the API's back (the API refuses these)."""
    conn = await asyncpg.connect(database_url)
    try:
        await target_store.update_target(
            conn,
            tenant_id,
            target_id,
            {
                "headers_enc": seal_headers(
                    SecretBox(base64.b64decode(SECRET_KEY)), target_id, headers
                )
            },
        )
    finally:
        await conn.close()


async def test_an_attempt_that_raises_is_recorded_and_follows_the_schedule(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given a target whose stored header value holds a control character
    tenant, source, target = await setup(gateway, receiver, "/ctl")
    await _set_target_headers(database_url, tenant.id, target["id"], {"X-A": "a\u000bb-sekrit"})
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]
    # Then every attempt is recorded as a failure and the delivery ends dead on schedule
    row = await finished(database_url, event_id, target["id"])
    assert row["status"] == "dead" and row["attempt_count"] == 3  # schedule 0,0.3,0.3
    attempts = await attempts_of(database_url, row["id"])
    assert len(attempts) == 3
    for attempt in attempts:
        assert attempt["status_code"] is None and attempt["error"]
        assert "sekrit" not in attempt["error"] and "Traceback" not in attempt["error"]
    assert receiver.at("/ctl") == []
    # and the tenant sees why through the API
    got = await (await gateway.get(f"/v1/deliveries/{row['id']}", headers=tenant.auth)).json()
    assert got["status"] == "dead" and got["last_error"]
    assert "sekrit" not in json.dumps(got)
    assert "sekrit" not in worker.log()


async def test_retry_after_that_is_not_a_number_is_ignored(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    async def odd(request: Any, count: int) -> Any:
        from aiohttp import web

        if count == 0:
            return web.Response(status=503, headers={"Retry-After": "²"})
        return web.Response(status=200)

    receiver.on("/odd", odd)
    _, source, target = await setup(gateway, receiver, "/odd")
    [event_id] = (await (await post_token(gateway, source, SOFTLEDGER)).json())["event_ids"]
    row = await finished(database_url, event_id, target["id"])
    assert row["status"] == "succeeded" and row["attempt_count"] == 2
    attempts = await attempts_of(database_url, row["id"])
    assert [a["status_code"] for a in attempts] == [503, 200]
