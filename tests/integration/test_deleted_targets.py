"""A deleted target's deliveries stay dead: no retry, no replay, nothing left pending.

Deleting a target makes what it still had to send dead ("the target was
deleted"); a retry of one of its deliveries is 422 naming it, a replay by ids
is 422 naming the deleted targets' ids, and a replay by target or time does not
select them (they are not counted).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg

from relay.store import dead_letters
from relay.store import targets as target_store
from tests.conftest import OPERATOR, Tenant, assert_error
from tests.integration.test_console import csrf_of, make_dead, sign_in
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.integration.test_inspect_replay import relay_cli
from tests.integration.test_lock_order import _waiting_on_lock
from tests.stack import eventually, fetch


async def _deliveries(client: Any, tenant: Tenant, source: dict[str, Any], uuid: str) -> Any:
    resp = await post_token(client, source, {"uuid": uuid, "objectType": "Bill"})
    assert resp.status == 202, await resp.text()
    [event_id] = (await resp.json())["event_ids"]
    event = await (await client.get(f"/v1/events/{event_id}", headers=tenant.auth)).json()
    return {d["target_id"]: d["id"] for d in event["deliveries"]}


async def _status(database_url: str, ids: list[str]) -> dict[str, str]:
    rows = await fetch(
        database_url, "SELECT id, status FROM deliveries WHERE id = ANY($1::text[])", ids
    )
    return {r["id"]: r["status"] for r in rows}


async def test_a_deleted_targets_deliveries_are_neither_retried_nor_replayed(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a target to delete (gone) and one that stays (kept), each with dead letters
    source = await make_source(client, tenant)
    gone = await make_target(client, tenant)
    kept = await make_target(client, tenant)
    first = await _deliveries(client, tenant, source, "one")
    second = await _deliveries(client, tenant, source, "two")
    third = await _deliveries(client, tenant, source, "three")
    a1, a2, a3 = first[gone["id"]], second[gone["id"]], third[gone["id"]]
    b1 = first[kept["id"]]
    await make_dead(database_url, [a1, a2, b1])

    # When the target is deleted, what it still had to send is dead, as today
    resp = await client.delete(f"/v1/targets/{gone['id']}", headers=tenant.auth)
    assert resp.status == 204
    [row] = await fetch(database_url, "SELECT status, last_error FROM deliveries WHERE id = $1", a3)
    assert (row["status"], row["last_error"]) == ("dead", "the target was deleted")

    # Then a retry of one of its deliveries is 422 naming it
    resp = await client.post(f"/v1/deliveries/{a1}/retry", headers=tenant.auth)
    error = await assert_error(resp, 422, "validation_error")
    assert a1 in error["message"] and error["details"][0]["field"] == "delivery_id"

    # and a replay by ids that holds any of its dead letters is 422 naming them, nothing replayed
    resp = await client.post(
        "/v1/dead-letters/replay", json={"ids": [a1, b1, a3]}, headers=tenant.auth
    )
    error = await assert_error(resp, 422, "validation_error")
    assert a1 in error["message"] and a3 in error["message"] and b1 not in error["message"]
    assert error["details"][0]["field"] == "ids"
    resp = await client.post("/v1/admin/dead-letters/replay", json={"ids": [a2]}, headers=OPERATOR)
    assert a2 in (await assert_error(resp, 422, "validation_error"))["message"]

    # and a replay by target or by time does not select them (not counted)
    resp = await client.post(
        "/v1/dead-letters/replay", json={"target_id": gone["id"]}, headers=tenant.auth
    )
    assert (resp.status, await resp.json()) == (202, {"replayed": 0})
    resp = await client.post(
        "/v1/dead-letters/replay", json={"since": "2000-01-01T00:00:00Z"}, headers=tenant.auth
    )
    assert (resp.status, await resp.json()) == (202, {"replayed": 1})
    resp = await client.post(
        "/v1/admin/dead-letters/replay", json={"tenant_id": tenant.id}, headers=OPERATOR
    )
    assert (resp.status, await resp.json()) == (202, {"replayed": 1})
    # the job that puts them back (here as `relay dlq replay` runs it) leaves them dead
    done = relay_cli(
        "dlq",
        "replay",
        "--tenant",
        tenant.id,
        "--yes",
        "--json",
        env={"DATABASE_URL": database_url},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"replayed": 1}

    assert await _status(database_url, [a1, a2, a3, b1]) == {
        a1: "dead",
        a2: "dead",
        a3: "dead",
        b1: "pending",
    }
    left = await fetch(
        database_url,
        "SELECT count(*) AS n FROM deliveries WHERE target_id = $1 AND status <> 'dead'",
        gone["id"],
    )
    assert left[0]["n"] == 0


async def test_the_console_says_a_deleted_targets_letter_cannot_be_sent_again(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    source = await make_source(client, tenant)
    gone = await make_target(client, tenant)
    a1 = (await _deliveries(client, tenant, source, "c-one"))[gone["id"]]
    await make_dead(database_url, [a1])
    await client.delete(f"/v1/targets/{gone['id']}", headers=tenant.auth)
    await sign_in(client, tenant.api_key)

    csrf = await csrf_of(client, f"/console/deliveries/{a1}")
    resp = await client.post(f"/console/deliveries/{a1}/retry", data={"csrf_token": csrf})
    assert resp.status == 200
    assert "Its target was deleted: it is never sent again." in await resp.text()
    resp = await client.post(
        "/console/dead-letters/replay",
        data={"csrf_token": csrf, "ids": a1, "scope": "selected", "confirm": "yes"},
    )
    assert resp.status == 200
    assert f"Nothing was replayed: {a1} belong to deleted targets" in await resp.text()
    assert await _status(database_url, [a1]) == {a1: "dead"}


async def test_a_replay_racing_the_deletion_leaves_nothing_pending(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given a dead letter of a target whose row is briefly held (e.g. by a PATCH)
    source = await make_source(client, tenant)
    target = await make_target(client, tenant)
    a1 = (await _deliveries(client, tenant, source, "race"))[target["id"]]
    await make_dead(database_url, [a1])
    blocker, replayer, deleter, watcher = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("SELECT 1 FROM targets WHERE id = $1 FOR UPDATE", target["id"])
        # When a replay of it and the deletion of the target queue up, the replay first
        replay = asyncio.create_task(
            dead_letters.replay_dead_letters_batch(
                replayer,
                tenant.id,
                target_id=None,
                since=None,
                ids=[a1],
                up_to_id=None,
                batch=1,
                enqueue_grace_s=30,
            )
        )
        await eventually(lambda: _waiting_on_lock(watcher, replayer), timeout=10)
        delete = asyncio.create_task(target_store.delete_target(deleter, tenant.id, target["id"]))
        await eventually(lambda: _waiting_on_lock(watcher, deleter), timeout=10)
        await holding.commit()
        replayed, deleted = await asyncio.wait_for(asyncio.gather(replay, delete), timeout=20)
    finally:
        for conn in (blocker, replayer, deleter, watcher):
            await conn.close()
    # Then whichever won, the deleted target has nothing pending
    assert deleted is True
    assert len(replayed) <= 1
    assert await _status(database_url, [a1]) == {a1: "dead"}


async def test_the_openapi_document_says_a_retry_may_be_422(client: Any) -> None:
    doc = await (await client.get("/openapi.json")).json()
    assert "422" in doc["paths"]["/v1/deliveries/{delivery_id}/retry"]["post"]["responses"]
