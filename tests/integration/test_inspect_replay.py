"""Inspect and replay: dead letters, replays, test events, rotation, auto-disable."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import standardwebhooks
from aiohttp import web

from tests.conftest import OPERATOR, Tenant, make_tenant, stack_env
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Receiver, WorkerProcess, drained, eventually, fetch


class Switch:
    """A receiver path that fails while down and succeeds once up."""

    def __init__(self) -> None:
        self.up = False

    async def __call__(self, request: web.Request, count: int) -> web.StreamResponse:
        return web.Response(status=200 if self.up else 503, text="up" if self.up else "down")


async def statuses(database_url: str, ids: list[str]) -> dict[str, str]:
    rows = await fetch(database_url, "SELECT id, status FROM deliveries WHERE id = ANY($1)", ids)
    return {r["id"]: r["status"] for r in rows}


async def all_in(database_url: str, ids: list[str], status: str) -> bool:
    got = await statuses(database_url, ids)
    return len(got) == len(ids) and set(got.values()) == {status}


def successes(receiver: Receiver, path: str, switch: Switch | None = None) -> list[str]:
    """webhook-ids the receiver got while up (for a Switch) or at all."""
    return [r.headers["webhook-id"] for r in receiver.at(path)]


async def dead_setup(gateway: Any, receiver: Receiver, database_url: str) -> dict[str, Any]:
    """A tenant whose two targets were down for three events: six dead letters."""
    switch_a, switch_b = Switch(), Switch()
    receiver.on("/a", switch_a)
    receiver.on("/b", switch_b)
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    a = await make_target(gateway, tenant, url=receiver.url("/a"))
    b = await make_target(gateway, tenant, url=receiver.url("/b"))
    [e1] = (await (await post_token(gateway, source, {"uuid": "e1"})).json())["event_ids"]
    await asyncio.sleep(0.05)
    since = datetime.now(UTC)
    await asyncio.sleep(0.05)
    e2, e3 = (await (await post_token(gateway, source, [{"uuid": "e2"}, {"uuid": "e3"}])).json())[
        "event_ids"
    ]
    rows = await fetch(
        database_url,
        "SELECT id, event_id, target_id FROM deliveries WHERE tenant_id = $1",
        tenant.id,
    )
    by = {(r["event_id"], r["target_id"]): r["id"] for r in rows}
    await eventually(lambda: all_in(database_url, list(by.values()), "dead"), timeout=30)
    switch_a.up = switch_b.up = True
    return {"tenant": tenant, "a": a, "b": b, "events": [e1, e2, e3], "since": since, "by": by}


async def test_dead_letters_are_visible_with_their_story(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    s = await dead_setup(gateway, receiver, database_url)
    tenant: Tenant = s["tenant"]
    listed = await (await gateway.get("/v1/dead-letters", headers=tenant.auth)).json()
    assert len(listed["data"]) == 6
    assert {d["last_status_code"] for d in listed["data"]} == {503}
    assert all("HTTP 503" in d["last_error"] and d["status"] == "dead" for d in listed["data"])
    only_a = await (
        await gateway.get(f"/v1/dead-letters?target_id={s['a']['id']}", headers=tenant.auth)
    ).json()
    assert {d["target_id"] for d in only_a["data"]} == {s["a"]["id"]} and len(only_a["data"]) == 3
    # the operator sees them across tenants, with the tenant named
    admin = await (
        await gateway.get(f"/v1/admin/dead-letters?tenant_id={tenant.id}", headers=OPERATOR)
    ).json()
    assert {d["id"] for d in admin["data"]} == {d["id"] for d in listed["data"]}
    assert {d["tenant_id"] for d in admin["data"]} == {tenant.id}
    # each delivery tells its attempts, and the event its deliveries
    one = listed["data"][0]
    detail = await (await gateway.get(f"/v1/deliveries/{one['id']}", headers=tenant.auth)).json()
    assert [a["status_code"] for a in detail["attempts"]] == [503, 503, 503]
    assert [a["response_body"] for a in detail["attempts"]] == ["down"] * 3
    event = await (await gateway.get(f"/v1/events/{one['event_id']}", headers=tenant.auth)).json()
    assert event["payload"]["uuid"] in ("e1", "e2", "e3")
    assert {d["status"] for d in event["deliveries"]} == {"dead"} and len(event["deliveries"]) == 2
    stats = await (await gateway.get("/v1/admin/stats", headers=OPERATOR)).json()
    assert stats["deliveries"]["dead"] >= 6
    assert {"tenant_id": tenant.id, "count": 6} in stats["dead_letters_by_tenant"]
    # another tenant sees none of it
    other = await make_tenant(gateway, "Other")
    assert (await (await gateway.get("/v1/dead-letters", headers=other.auth)).json())["data"] == []


async def test_replay_by_id_by_target_and_by_time_each_send_what_they_select_once(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str, clean_redis: str
) -> None:
    s = await dead_setup(gateway, receiver, database_url)
    tenant: Tenant = s["tenant"]
    e1, e2, e3 = s["events"]
    a, b = s["a"]["id"], s["b"]["id"]
    by = s["by"]
    receiver.received.clear()

    # by id: exactly that one
    resp = await gateway.post(
        "/v1/dead-letters/replay", json={"ids": [by[(e1, a)]]}, headers=tenant.auth
    )
    assert resp.status == 202 and await resp.json() == {"replayed": 1}
    await eventually(lambda: all_in(database_url, [by[(e1, a)]], "succeeded"))
    # by time: what was created since, at every target (e2, e3 to a; e2, e3 to b)
    resp = await gateway.post(
        "/v1/dead-letters/replay",
        json={"since": s["since"].isoformat(), "target_id": a},
        headers=tenant.auth,
    )
    assert await resp.json() == {"replayed": 2}
    await eventually(lambda: all_in(database_url, [by[(e2, a)], by[(e3, a)]], "succeeded"))
    # by target: everything still dead at b
    resp = await gateway.post("/v1/dead-letters/replay", json={"target_id": b}, headers=tenant.auth)
    assert await resp.json() == {"replayed": 3}
    await eventually(lambda: all_in(database_url, [by[(e, b)] for e in (e1, e2, e3)], "succeeded"))
    # replaying again selects nothing, sends nothing
    resp = await gateway.post("/v1/dead-letters/replay", json={}, headers=tenant.auth)
    assert await resp.json() == {"replayed": 0}
    await drained(clean_redis)
    assert sorted(successes(receiver, "/a")) == sorted([e1, e2, e3])
    assert sorted(successes(receiver, "/b")) == sorted([e1, e2, e3])
    # replayed deliveries start a fresh schedule
    rows = await fetch(
        database_url, "SELECT attempt_count FROM deliveries WHERE tenant_id = $1", tenant.id
    )
    assert {r["attempt_count"] for r in rows} == {1}


async def test_a_tenant_cannot_replay_another_tenants_dead_letters(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str, clean_redis: str
) -> None:
    s = await dead_setup(gateway, receiver, database_url)
    await drained(clean_redis)
    sent = len(receiver.received)
    other = await make_tenant(gateway, "Intruder")
    ids = list(s["by"].values())
    for body in ({"ids": ids}, {"target_id": s["a"]["id"]}, {}):
        resp = await gateway.post("/v1/dead-letters/replay", json=body, headers=other.auth)
        assert await resp.json() == {"replayed": 0}
    for delivery_id in ids[:2]:
        resp = await gateway.post(f"/v1/deliveries/{delivery_id}/retry", headers=other.auth)
        assert resp.status == 404
    # nothing was sent, nothing left dead
    await drained(clean_redis)
    assert len(receiver.received) == sent
    assert set((await statuses(database_url, ids)).values()) == {"dead"}
    # the operator can, for one tenant
    resp = await gateway.post(
        "/v1/admin/dead-letters/replay",
        json={"tenant_id": s["tenant"].id, "target_id": s["b"]["id"]},
        headers=OPERATOR,
    )
    assert await resp.json() == {"replayed": 3}


async def test_retry_and_event_replay(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    s = await dead_setup(gateway, receiver, database_url)
    tenant: Tenant = s["tenant"]
    e1 = s["events"][0]
    delivery_id = s["by"][(e1, s["a"]["id"])]
    resp = await gateway.post(f"/v1/deliveries/{delivery_id}/retry", headers=tenant.auth)
    assert resp.status == 202 and (await resp.json())["status"] == "pending"
    await eventually(lambda: all_in(database_url, [delivery_id], "succeeded"))
    # replaying the event to one chosen target makes a new delivery with a new id
    resp = await gateway.post(
        f"/v1/events/{e1}/replay", json={"target_ids": [s["b"]["id"]]}, headers=tenant.auth
    )
    assert resp.status == 202
    [new_id] = (await resp.json())["delivery_ids"]
    assert new_id not in s["by"].values()
    await eventually(lambda: all_in(database_url, [new_id], "succeeded"))
    # replay with no body: every matching target
    resp = await gateway.post(f"/v1/events/{e1}/replay", headers=tenant.auth)
    assert len((await resp.json())["delivery_ids"]) == 2
    resp = await gateway.post(
        f"/v1/events/{e1}/replay", json={"target_ids": ["tgt_nope"]}, headers=tenant.auth
    )
    assert resp.status == 422


async def test_test_event_arrives_and_verifies(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    tenant = await make_tenant(gateway)
    target = await make_target(
        gateway, tenant, url=receiver.url("/ping"), filter={"objectType": ["Bill"]}
    )  # the test ignores filters
    resp = await gateway.post(f"/v1/targets/{target['id']}/test", headers=tenant.auth)
    assert resp.status == 202
    body = await resp.json()
    await eventually(lambda: all_in(database_url, [body["delivery_id"]], "succeeded"))
    [got] = receiver.at("/ping")
    payload = standardwebhooks.Webhook(target["secret"]).verify(got.body, got.headers)
    assert payload["objectType"] == "Test" and payload["action"] == "ping"
    assert got.headers["webhook-id"] == body["event_id"]


async def test_rotation_signs_with_both_secrets_during_the_overlap(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    target = await make_target(gateway, tenant, url=receiver.url("/rot"))
    rotated = await (
        await gateway.post(f"/v1/targets/{target['id']}/rotate-secret", headers=tenant.auth)
    ).json()
    [event_id] = (await (await post_token(gateway, source, {"uuid": "r1"})).json())["event_ids"]
    await eventually(lambda: asyncio.sleep(0, result=receiver.at("/rot")))
    [got] = receiver.at("/rot")
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    for secret in (target["secret"], rotated["secret"]):
        standardwebhooks.Webhook(secret).verify(got.body, got.headers)
    assert got.headers["webhook-id"] == event_id


async def test_auto_disable_and_re_enable(
    gateway: Any, receiver: Receiver, database_url: str, clean_redis: str, tmp_path: Any
) -> None:
    switch = Switch()
    receiver.on("/flaky", switch)
    env = stack_env(
        database_url,
        clean_redis,
        RELAY_DISABLE_AFTER_S="1",
        RELAY_RETRY_SCHEDULE=",".join(["0"] + ["0.5"] * 40),
    )
    worker = WorkerProcess(env, tmp_path / "w.log").start()
    try:
        tenant = await make_tenant(gateway)
        source = await make_source(gateway, tenant)
        target = await make_target(gateway, tenant, url=receiver.url("/flaky"))
        [event_id] = (await (await post_token(gateway, source, {"uuid": "ad"})).json())["event_ids"]

        async def disabled() -> Any:
            got = await (
                await gateway.get(f"/v1/targets/{target['id']}", headers=tenant.auth)
            ).json()
            return got if not got["enabled"] else None

        got = await eventually(disabled, timeout=20)
        assert "every attempt failed" in got["disabled_reason"]
        [row] = await fetch(database_url, "SELECT * FROM deliveries WHERE event_id = $1", event_id)
        assert row["status"] == "retrying"
        count = len(receiver.at("/flaky"))
        # every retry already scheduled has been run, without sending
        await drained(clean_redis)
        assert len(receiver.at("/flaky")) <= count + 1  # at most the attempt in flight
        # re-enabling resumes delivery
        switch.up = True
        resp = await gateway.patch(
            f"/v1/targets/{target['id']}", json={"enabled": True}, headers=tenant.auth
        )
        assert (await resp.json())["enabled"] is True
        await eventually(lambda: all_in(database_url, [row["id"]], "succeeded"), timeout=20)
    finally:
        worker.stop()


def relay_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


async def test_dlq_cli_list_show_replay_purge(
    worker: Any, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    s = await dead_setup(gateway, receiver, database_url)
    env = {"DATABASE_URL": database_url}
    tenant: Tenant = s["tenant"]
    listed = relay_cli("dlq", "list", "--tenant", tenant.id, "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {r["id"] for r in rows} == set(s["by"].values())
    table = relay_cli("dlq", "list", "--tenant", tenant.id, env=env)
    assert "6 dead letters" in table.stdout
    shown = json.loads(relay_cli("dlq", "show", rows[0]["id"], "--json", env=env).stdout)
    assert [a["status_code"] for a in shown["attempts"]] == [503, 503, 503]
    assert "503" in relay_cli("dlq", "show", rows[0]["id"], env=env).stdout
    # replay asks for confirmation; without a terminal and --yes it refuses and touches nothing
    refused = relay_cli("dlq", "replay", "--target", s["a"]["id"], env=env)
    assert refused.returncode == 1 and "--yes" in refused.stderr
    done = relay_cli("dlq", "replay", "--target", s["a"]["id"], "--yes", "--json", env=env)
    assert json.loads(done.stdout) == {"replayed": 3}
    a_ids = [s["by"][(e, s["a"]["id"])] for e in s["events"]]
    await eventually(lambda: all_in(database_url, a_ids, "succeeded"), timeout=20)
    # purge deletes only dead letters older than --since
    kept = relay_cli("dlq", "purge", "--since", "2000-01-01T00:00:00Z", "--yes", "--json", env=env)
    assert json.loads(kept.stdout) == {"purged": 0}
    purged = relay_cli(
        "dlq",
        "purge",
        "--since",
        datetime.now(UTC).isoformat(),
        "--tenant",
        tenant.id,
        "--yes",
        "--json",
        env=env,
    )
    assert json.loads(purged.stdout) == {"purged": 3}
    left = json.loads(relay_cli("dlq", "list", "--tenant", tenant.id, "--json", env=env).stdout)
    assert left == []
    assert relay_cli("dlq", "show", "dlv_nope", env=env).returncode == 1


async def test_bulk_replay_of_20000_dead_letters_sends_each_once(
    gateway: Any, receiver: Receiver, database_url: str, clean_redis: str, tmp_path: Any
) -> None:
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    target = await make_target(gateway, tenant, url=receiver.url("/bulk"))
    # Given 20,000 dead letters (written directly: making them die one by one takes too long)
    await fetch(
        database_url,
        """
        WITH e AS (
            INSERT INTO events (id, tenant_id, source_id, upstream_uuid, payload)
            SELECT 'evt_bulk' || lpad(i::text, 6, '0'), $1, $2, 'bulk-' || i,
                   convert_to('{"n":' || i || '}', 'UTF8')
            FROM generate_series(1, 20000) AS i RETURNING id
        )
        INSERT INTO deliveries (id, tenant_id, event_id, target_id, status, attempt_count,
                                last_status_code, last_error)
        SELECT 'dlv_bulk' || substr(e.id, 9), $1, e.id, $3, 'dead', 3, 503, 'HTTP 503' FROM e
    """,
        tenant.id,
        source["id"],
        target["id"],
    )
    worker = WorkerProcess(
        stack_env(database_url, clean_redis), tmp_path / "w.log", processes=2, threads=16
    ).start()
    try:
        resp = await gateway.post(
            "/v1/dead-letters/replay", json={"target_id": target["id"]}, headers=tenant.auth
        )
        assert resp.status == 202 and await resp.json() == {"replayed": 20000}

        async def done() -> bool:
            rows = await fetch(
                database_url,
                "SELECT count(*) AS n FROM deliveries "
                "WHERE tenant_id = $1 AND status = 'succeeded'",
                tenant.id,
            )
            return bool(rows[0]["n"] == 20000)

        await eventually(done, timeout=240, every=1)
    finally:
        worker.stop()
    got = successes(receiver, "/bulk")
    assert len(got) == 20000 and len(set(got)) == 20000
