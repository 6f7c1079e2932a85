"""Ingest: authentication, input checks, de-duplication and routing, through the real app."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import time
from typing import Any

import asyncpg
import pytest

from relay.core.config import Settings
from relay.delivery.signing import sign_payload
from relay.web.app import create_app
from tests.conftest import Tenant, assert_error, make_tenant
from tests.stack import eventually

SOFTLEDGER = {
    "uuid": "6b1f4c1e-9d7a-4f7e-8a57-3c3f9e2b1a10",
    "date": "2026-11-28T12:00:00.000Z",
    "objectType": "Bill",
    "action": "paid",
    "objectId": 4711,
    "tenantId": 42,
}
JSON = {"Content-Type": "application/json"}


async def make_source(client: Any, tenant: Tenant, **fields: Any) -> dict[str, Any]:
    body = {"name": "SoftLedger", "auth": {"type": "token"}, **fields}
    resp = await client.post("/v1/sources", json=body, headers=tenant.auth)
    assert resp.status == 201, await resp.text()
    source: dict[str, Any] = await resp.json()
    return source


async def make_target(client: Any, tenant: Tenant, **fields: Any) -> dict[str, Any]:
    resp = await client.post(
        "/v1/targets", json={"url": "http://127.0.0.1:9/hook", **fields}, headers=tenant.auth
    )
    assert resp.status == 201, await resp.text()
    target: dict[str, Any] = await resp.json()
    return target


def path_of(source: dict[str, Any]) -> str:
    return f"/in/{source['id']}"


async def post_token(client: Any, source: dict[str, Any], body: Any, **kwargs: Any) -> Any:
    data: Any = body if isinstance(body, bytes) else json.dumps(body).encode()
    if len(data) > 512 * 1024:
        data = io.BytesIO(data)  # aiohttp warns about large raw bytes bodies
    return await client.post(
        f"{path_of(source)}?token={source['secret']}",
        data=data,
        headers=kwargs.pop("headers", JSON),
        **kwargs,
    )


async def db_rows(database_url: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


# --- authentication -----------------------------------------------------------


async def test_token_in_query_or_bearer(client: Any, tenant: Tenant) -> None:
    source = await make_source(client, tenant)
    body = json.dumps(SOFTLEDGER).encode()
    resp = await client.post(f"{path_of(source)}?token={source['secret']}", data=body, headers=JSON)
    assert resp.status == 202, await resp.text()
    resp = await client.post(
        path_of(source), data=body, headers={**JSON, "Authorization": f"Bearer {source['secret']}"}
    )
    assert resp.status == 202
    for bad in (
        {"params": {"token": "wrong"}},
        {"params": {}},
        {"headers": {**JSON, "Authorization": "Bearer wrong"}},
        {"headers": {**JSON, "Authorization": f"Basic {source['secret']}"}},
    ):
        resp = await client.post(path_of(source), data=body, **({"headers": JSON} | bad))
        await assert_error(resp, 401, "unauthorized")


async def test_basic(client: Any, tenant: Tenant) -> None:
    source = await make_source(client, tenant, auth={"type": "basic", "username": "sl"})

    def basic(user: str, password: str) -> dict[str, str]:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {**JSON, "Authorization": f"Basic {token}"}

    data = json.dumps(SOFTLEDGER)
    assert (
        await client.post(path_of(source), data=data, headers=basic("sl", source["secret"]))
    ).status == 202
    for headers in (
        basic("other", source["secret"]),
        basic("sl", "wrong"),
        JSON,
        {**JSON, "Authorization": "Basic !!!"},
        {**JSON, "Authorization": f"Bearer {source['secret']}"},
    ):
        await assert_error(
            await client.post(path_of(source), data=data, headers=headers), 401, "unauthorized"
        )


async def test_hmac_hex_and_base64_with_prefix(client: Any, tenant: Tenant) -> None:
    source = await make_source(
        client, tenant, auth={"type": "hmac", "header": "X-Hub-Signature-256", "prefix": "sha256="}
    )
    data = json.dumps(SOFTLEDGER).encode()
    digest = hmac.new(source["secret"].encode(), data, hashlib.sha256).digest()
    for encoded in (digest.hex(), digest.hex().upper(), base64.b64encode(digest).decode()):
        resp = await client.post(
            path_of(source), data=data, headers={**JSON, "X-Hub-Signature-256": f"sha256={encoded}"}
        )
        assert resp.status == 202, encoded
    wrong = hmac.new(b"wrong", data, hashlib.sha256).hexdigest()
    for headers in (
        {"X-Hub-Signature-256": f"sha256={wrong}"},  # wrong secret
        {"X-Hub-Signature-256": digest.hex()},  # missing prefix
        {"X-Hub-Signature-256": f"sha1={digest.hex()}"},  # wrong prefix
        {"X-Signature": f"sha256={digest.hex()}"},  # wrong header
        {},
    ):
        resp = await client.post(path_of(source), data=data, headers={**JSON, **headers})
        await assert_error(resp, 401, "unauthorized")
    # the signature covers the raw body: a changed body fails
    resp = await client.post(
        path_of(source),
        data=data + b" ",
        headers={**JSON, "X-Hub-Signature-256": f"sha256={digest.hex()}"},
    )
    await assert_error(resp, 401, "unauthorized")


def sw_headers(
    secret: str, body: bytes, *, msg_id: str = "msg_1", ts: int | None = None, extra: str = ""
) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    signature = sign_payload(secret, msg_id, ts, body)
    return {
        **JSON,
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": f"{extra} {signature}".strip(),
    }


async def test_standard_webhooks(client: Any, tenant: Tenant) -> None:
    source = await make_source(client, tenant, auth={"type": "standard-webhooks"})
    data = json.dumps(SOFTLEDGER).encode()
    assert (
        await client.post(path_of(source), data=data, headers=sw_headers(source["secret"], data))
    ).status == 202
    # several signatures: one valid among them is enough
    other = "whsec_" + base64.b64encode(b"o" * 32).decode()
    several = sw_headers(
        source["secret"],
        data,
        msg_id="msg_2",
        extra=sign_payload(other, "msg_2", int(time.time()), data),
    )
    assert (await client.post(path_of(source), data=data, headers=several)).status == 202
    stale = sw_headers(source["secret"], data, ts=int(time.time()) - 301)
    future = sw_headers(source["secret"], data, ts=int(time.time()) + 301)
    wrong = sw_headers(other, data)
    missing = {k: v for k, v in sw_headers(source["secret"], data).items() if k != "webhook-id"}
    for headers in (stale, future, wrong, missing, JSON):
        await assert_error(
            await client.post(path_of(source), data=data, headers=headers), 401, "unauthorized"
        )


async def test_a_replayed_standard_webhooks_request_is_refused(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    source = await make_source(client, tenant, auth={"type": "standard-webhooks"})
    data = json.dumps({"uuid": None, "objectType": "Bill"}).encode()  # no uuid to de-duplicate
    captured = sw_headers(source["secret"], data, msg_id="msg_replay")
    assert (await client.post(path_of(source), data=data, headers=captured)).status == 202
    # When the captured request is sent again within the tolerance
    resp = await client.post(path_of(source), data=data, headers=captured)
    # Then it is refused, and nothing more is stored; a new webhook-id is accepted
    error = await assert_error(resp, 401, "unauthorized")
    assert "already received" in error["message"]
    fresh = sw_headers(source["secret"], data, msg_id="msg_other")
    assert (await client.post(path_of(source), data=data, headers=fresh)).status == 202
    rows = await db_rows(
        database_url, "SELECT count(*) AS n FROM events WHERE source_id = $1", source["id"]
    )
    assert rows[0]["n"] == 2


async def test_a_refused_request_does_not_burn_its_webhook_id(client: Any, tenant: Tenant) -> None:
    source = await make_source(client, tenant, auth={"type": "standard-webhooks"})
    bad = b"[1, 2]"  # signed, but not objects: 400
    headers = sw_headers(source["secret"], bad, msg_id="msg_retry")
    await assert_error(
        await client.post(path_of(source), data=bad, headers=headers), 400, "invalid_request"
    )
    # the sender fixes its body and retries with the same id (a new signature)
    good = json.dumps({"n": 1}).encode()
    headers = sw_headers(source["secret"], good, msg_id="msg_retry")
    assert (await client.post(path_of(source), data=good, headers=headers)).status == 202


async def test_hmac_with_a_timestamp_header_refuses_stale_and_replayed_signatures(
    client: Any, tenant: Tenant
) -> None:
    source = await make_source(
        client, tenant, auth={"type": "hmac", "timestamp_header": "X-Timestamp"}
    )
    assert source["auth"]["timestamp_header"] == "X-Timestamp"
    data = json.dumps({"n": 1}).encode()

    def signed(ts: int, body: bytes = data) -> dict[str, str]:
        mac = hmac.new(source["secret"].encode(), f"{ts}.".encode() + body, hashlib.sha256)
        return {**JSON, "X-Signature": mac.hexdigest(), "X-Timestamp": str(ts)}

    now = int(time.time())
    assert (await client.post(path_of(source), data=data, headers=signed(now))).status == 202
    # a request captured more than 5 minutes ago, a timestamp not covered by the
    # signature, a missing timestamp, and a signature of the body alone are refused
    old = signed(now - 301)
    moved = {**signed(now - 301), "X-Timestamp": str(now)}
    missing = {k: v for k, v in signed(now).items() if k != "X-Timestamp"}
    body_only = {
        **JSON,
        "X-Signature": hmac.new(source["secret"].encode(), data, hashlib.sha256).hexdigest(),
        "X-Timestamp": str(now),
    }
    for headers in (old, moved, missing, body_only):
        resp = await client.post(path_of(source), data=data, headers=headers)
        await assert_error(resp, 401, "unauthorized")


async def test_previous_secret_works_during_the_overlap_only(
    aiohttp_client: Any, settings: Settings
) -> None:
    client = await aiohttp_client(create_app(settings.with_overrides(secret_overlap_s=1.0)))
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    rotated = await (
        await client.post(f"/v1/sources/{source['id']}/rotate-secret", headers=tenant.auth)
    ).json()
    new = {**source, "secret": rotated["secret"]}
    assert (await post_token(client, source, SOFTLEDGER)).status == 202
    assert (await post_token(client, new, {"n": 1})).status == 202
    await asyncio.sleep(1.6)
    await assert_error(await post_token(client, source, {"n": 2}), 401, "unauthorized")
    assert (await post_token(client, new, {"n": 3})).status == 202


# --- input checks --------------------------------------------------------------


async def test_unknown_or_deleted_source_is_404(client: Any, tenant: Tenant) -> None:
    await assert_error(await client.post("/in/src_nope", json=SOFTLEDGER), 404, "not_found")
    await assert_error(await client.post("/in/tgt_x", json=SOFTLEDGER), 404, "not_found")
    source = await make_source(client, tenant)
    assert (await client.delete(f"/v1/sources/{source['id']}", headers=tenant.auth)).status == 204
    await assert_error(await post_token(client, source, SOFTLEDGER), 404, "not_found")


async def test_content_type_and_shape(client: Any, tenant: Tenant, database_url: str) -> None:
    source = await make_source(client, tenant)
    before = len(await db_rows(database_url, "SELECT id FROM events"))
    cases = [
        (b'{"a": 1}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (
            b'{"a": 1}',
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
            "unsupported_media_type",
        ),
        (b"{nope", JSON, 400, "invalid_json"),
        (b"\xff\xfe", JSON, 400, "invalid_json"),
        (b"", JSON, 400, "invalid_json"),
        (b"42", JSON, 400, "invalid_request"),
        (b'"text"', JSON, 400, "invalid_request"),
        (b"null", JSON, 400, "invalid_request"),
        (b"[]", JSON, 400, "invalid_request"),
        (b'[{"a": 1}, 2]', JSON, 400, "invalid_request"),
        (b'[{"a": 1}, [1]]', JSON, 400, "invalid_request"),
        (b"[" * 100_000, JSON, 400, "invalid_json"),
        (json.dumps({"uuid": "x" * 300}).encode(), JSON, 422, "validation_error"),
    ]
    for data, headers, status, code in cases:
        await assert_error(await post_token(client, source, data, headers=headers), status, code)
    assert len(await db_rows(database_url, "SELECT id FROM events")) == before


async def test_json_suffix_content_type_is_accepted(client: Any, tenant: Tenant) -> None:
    source = await make_source(client, tenant)
    resp = await post_token(
        client,
        source,
        {"a": 1},
        headers={"Content-Type": "application/cloudevents+json; charset=utf-8"},
    )
    assert resp.status == 202


async def test_body_over_the_limit_is_refused(client: Any, tenant: Tenant) -> None:
    source = await make_source(client, tenant)
    limit = 1_048_576
    ok = json.dumps({"pad": "x" * (limit - 20)}).encode()
    assert len(ok) <= limit
    assert (await post_token(client, source, ok)).status == 202
    over = json.dumps({"pad": "x" * (limit - 10)}).encode()
    assert len(over) == limit + 1
    await assert_error(await post_token(client, source, over), 413, "payload_too_large")

    # Chunked, with no length announced: refused while reading
    async def chunks() -> Any:
        yield b'{"pad": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    resp = await client.post(
        f"{path_of(source)}?token={source['secret']}", data=chunks(), headers=JSON
    )
    await assert_error(resp, 413, "payload_too_large")


async def test_oversized_declared_length_is_refused_before_the_body_is_sent(
    client: Any, tenant: Tenant
) -> None:
    # Given a raw connection that announces 1 MiB + 1 bytes and sends only the headers
    source = await make_source(client, tenant)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = (
        f"POST {path_of(source)}?token={source['secret']} HTTP/1.1\r\n"
        f"Host: {client.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {1_048_577}\r\n\r\n"
    )
    writer.write(head.encode())
    await writer.drain()
    # Then the answer arrives without the body ever being sent
    status_line = await asyncio.wait_for(reader.readline(), timeout=5)
    writer.close()
    assert b" 413 " in status_line


async def test_batch_limits(client: Any, tenant: Tenant, database_url: str) -> None:
    source = await make_source(client, tenant)
    batch = [{**SOFTLEDGER, "uuid": f"b-{i}"} for i in range(1000)]
    resp = await post_token(client, source, batch)
    assert resp.status == 202
    ids = (await resp.json())["event_ids"]
    assert len(ids) == 1000 and len(set(ids)) == 1000
    too_many = [{"n": i} for i in range(1001)]
    await assert_error(await post_token(client, source, too_many), 422, "validation_error")
    rows = await db_rows(
        database_url, "SELECT count(*) AS n FROM events WHERE source_id = $1", source["id"]
    )
    assert rows[0]["n"] == 1000


async def test_rate_limit(client: Any, tenant: Tenant) -> None:
    source = await make_source(client, tenant, rate_limit=5)
    # start at the beginning of a second so the window does not roll over mid-test
    await asyncio.sleep(1 - time.time() % 1 + 0.01)
    statuses = [(await post_token(client, source, {"n": i})).status for i in range(5)]
    assert statuses == [202] * 5
    resp = await post_token(client, source, {"n": 6})
    await assert_error(resp, 429, "rate_limited")
    assert 1 <= int(resp.headers["Retry-After"]) <= 2
    await asyncio.sleep(float(resp.headers["Retry-After"]))
    assert (await post_token(client, source, {"n": 7})).status == 202


async def test_rate_limit_counts_the_events_of_a_batch(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    source = await make_source(client, tenant, rate_limit=5)
    # Given an idle source limited to 5 events/s: a batch larger than the limit never fits
    resp = await post_token(client, source, [{"n": i} for i in range(1000)])
    error = await assert_error(resp, 429, "rate_limited")
    assert "at most 5" in error["message"] and int(resp.headers["Retry-After"]) >= 1
    # A batch of 5 fits an idle source; right after it, even one more event does not
    assert (await post_token(client, source, [{"n": i} for i in range(5)])).status == 202
    resp = await post_token(client, source, [{"n": 5}, {"n": 6}])
    await assert_error(resp, 429, "rate_limited")
    # Nothing refused was written: 5 events in all
    rows = await db_rows(
        database_url, "SELECT count(*) AS n FROM events WHERE source_id = $1", source["id"]
    )
    assert rows[0]["n"] == 5
    # And sending pairs for 2 s as fast as possible: no one-second window holds more than 5
    await asyncio.sleep(1)  # the window empties
    started, admitted = time.monotonic(), []
    while time.monotonic() - started < 2:
        sent = time.monotonic()
        if (await post_token(client, source, [{"n": 0}, {"n": 1}])).status == 202:
            # admitted somewhere between sending and the answer (after the commit)
            admitted.append((sent, time.monotonic()))
    assert len(admitted) >= 2
    for first, _ in admitted:
        # pairs sent after ``first`` and answered within a second of it were admitted in
        # one second: whatever the commits' latency, at most 5 events
        within = [a for a in admitted if a[0] >= first and a[1] < first + 1.0]
        assert 2 * len(within) <= 5, admitted


# --- storage, duplicates, routing ----------------------------------------------


async def test_event_is_stored_exactly_with_softledger_columns(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    source = await make_source(client, tenant)
    raw = (
        b'{ "uuid":"u-1",  "date":"2026-11-28", "objectType":"Bill","action":"paid",'
        b'"objectId":4711,"tenantId":42, "extra": {"z": 1, "a": [1.50, "\\u00e9"]} }'
    )
    resp = await post_token(client, source, raw)
    assert resp.status == 202
    [event_id] = (await resp.json())["event_ids"]
    [row] = await db_rows(database_url, "SELECT * FROM events WHERE id = $1", event_id)
    assert bytes(row["payload"]) == raw
    assert (
        row["upstream_uuid"],
        row["upstream_date"],
        row["object_type"],
        row["action"],
        row["object_id"],
        row["upstream_tenant_id"],
    ) == ("u-1", "2026-11-28", "Bill", "paid", "4711", "42")
    assert row["tenant_id"] == tenant.id and row["source_id"] == source["id"]


async def test_any_json_object_is_accepted(client: Any, tenant: Tenant, database_url: str) -> None:
    source = await make_source(client, tenant)
    resp = await post_token(client, source, {"hello": "world"})
    [event_id] = (await resp.json())["event_ids"]
    [row] = await db_rows(database_url, "SELECT * FROM events WHERE id = $1", event_id)
    assert row["upstream_uuid"] is None and row["object_type"] is None


async def test_batch_elements_are_stored_as_compact_json_in_key_order(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    source = await make_source(client, tenant)
    raw = b'[ {"z": 1, "a": {"y": "\xc3\xa9", "b": [1, 2]}}, {"uuid": "k"} ]'
    ids = (await (await post_token(client, source, raw)).json())["event_ids"]
    rows = {
        r["id"]: bytes(r["payload"])
        for r in await db_rows(
            database_url, "SELECT id, payload FROM events WHERE id = ANY($1)", ids
        )
    }
    assert rows[ids[0]] == '{"z":1,"a":{"y":"é","b":[1,2]}}'.encode()
    assert rows[ids[1]] == b'{"uuid":"k"}'


async def test_duplicates_map_to_the_original_and_deliver_nothing_again(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    first = (await (await post_token(client, source, SOFTLEDGER)).json())["event_ids"]
    again = (await (await post_token(client, source, {**SOFTLEDGER, "action": "changed"})).json())[
        "event_ids"
    ]
    assert again == first
    batch = [
        {"uuid": "d-1"},
        {"uuid": "d-2"},
        {"uuid": "d-1", "other": True},
        {"n": 1},
        {"n": 1},
        SOFTLEDGER,
    ]
    ids = (await (await post_token(client, source, batch)).json())["event_ids"]
    assert ids[0] == ids[2] and ids[0] != ids[1]
    assert ids[3] != ids[4]  # no uuid: never a duplicate
    assert ids[5] == first[0]
    deliveries = await db_rows(
        database_url, "SELECT event_id FROM deliveries WHERE tenant_id = $1", tenant.id
    )
    per_event: dict[str, int] = {}
    for d in deliveries:
        per_event[d["event_id"]] = per_event.get(d["event_id"], 0) + 1
    assert per_event == {first[0]: 1, ids[0]: 1, ids[1]: 1, ids[3]: 1, ids[4]: 1}
    # the same uuid from another source is another event
    other = await make_source(client, tenant)
    assert (await (await post_token(client, other, SOFTLEDGER)).json())["event_ids"] != first


async def test_concurrent_identical_posts_make_one_event(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    body = {**SOFTLEDGER, "uuid": "concurrent-1"}
    responses = await asyncio.gather(*(post_token(client, source, body) for _ in range(20)))
    assert [r.status for r in responses] == [202] * 20
    ids = {tuple((await r.json())["event_ids"]) for r in responses}
    assert len(ids) == 1
    events = await db_rows(
        database_url, "SELECT id FROM events WHERE upstream_uuid = 'concurrent-1'"
    )
    deliveries = await db_rows(
        database_url, "SELECT id FROM deliveries WHERE event_id = $1", events[0]["id"]
    )
    assert len(events) == 1 and len(deliveries) == 1


async def test_routing_honours_filters_sources_and_enabled(
    client: Any, tenant: Tenant, other_tenant: Tenant, database_url: str
) -> None:
    s1 = await make_source(client, tenant)
    s2 = await make_source(client, tenant)
    all_events = await make_target(client, tenant)
    bills = await make_target(client, tenant, filter={"objectType": ["bill"]})
    paid_bills = await make_target(
        client, tenant, filter={"objectType": ["BILL", "Invoice"], "action": ["PAID"]}
    )
    only_s2 = await make_target(client, tenant, source_ids=[s2["id"]])
    disabled = await make_target(client, tenant, enabled=False)
    deleted = await make_target(client, tenant)
    assert (await client.delete(f"/v1/targets/{deleted['id']}", headers=tenant.auth)).status == 204
    foreign = await make_target(client, other_tenant)

    async def targets_of(source: dict[str, Any], body: dict[str, Any]) -> set[str]:
        [event_id] = (await (await post_token(client, source, body)).json())["event_ids"]
        rows = await db_rows(
            database_url,
            "SELECT target_id, status, tenant_id FROM deliveries WHERE event_id = $1",
            event_id,
        )
        assert all(r["status"] == "pending" and r["tenant_id"] == tenant.id for r in rows)
        return {r["target_id"] for r in rows}

    assert await targets_of(s1, {"objectType": "Bill", "action": "paid"}) == {
        all_events["id"],
        bills["id"],
        paid_bills["id"],
    }
    assert await targets_of(s1, {"objectType": "Bill", "action": "created"}) == {
        all_events["id"],
        bills["id"],
    }
    assert await targets_of(s2, {"objectType": "Invoice", "action": "Paid"}) == {
        all_events["id"],
        paid_bills["id"],
        only_s2["id"],
    }
    assert await targets_of(s1, {"no": "fields"}) == {all_events["id"]}
    assert disabled["id"] and foreign["id"]  # neither ever appears above
    # re-enabling takes effect at once
    await client.patch(f"/v1/targets/{disabled['id']}", json={"enabled": True}, headers=tenant.auth)
    assert disabled["id"] in await targets_of(s1, {"x": 1})


async def test_stale_cache_never_routes_to_a_deleted_target(
    aiohttp_client: Any, settings: Settings, database_url: str
) -> None:
    # Given two gateways (the second's cache lives for a minute)
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings.with_overrides(cache_ttl_s=60)))
    tenant = await make_tenant(a)
    source = await make_source(a, tenant)
    target = await make_target(a, tenant)
    assert (await post_token(b, source, {"n": 1})).status == 202  # b caches the target
    # When the target is deleted through gateway a
    assert (await a.delete(f"/v1/targets/{target['id']}", headers=tenant.auth)).status == 204
    # Then gateway b, with its stale cache, creates no delivery for it
    [event_id] = (await (await post_token(b, source, {"n": 2})).json())["event_ids"]
    assert (
        await db_rows(database_url, "SELECT id FROM deliveries WHERE event_id = $1", event_id) == []
    )


async def test_broker_unreachable_still_accepts_and_keeps_deliveries_pending(
    aiohttp_client: Any, settings: Settings, database_url: str, caplog: Any
) -> None:
    client = await aiohttp_client(
        create_app(settings.with_overrides(broker_url="redis://127.0.0.1:1/0"))
    )
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    resp = await post_token(client, source, SOFTLEDGER)
    assert resp.status == 202
    [event_id] = (await resp.json())["event_ids"]
    # the background enqueue was tried, and failed
    await eventually(
        lambda: asyncio.sleep(0, result="enqueue of 1 wake-ups failed" in caplog.text),
        timeout=10,
    )
    rows = await db_rows(
        database_url, "SELECT status, next_attempt_at FROM deliveries WHERE event_id = $1", event_id
    )
    # and the delivery is left, due, for the sweeper
    assert [r["status"] for r in rows] == ["pending"] and rows[0]["next_attempt_at"] is not None


@pytest.mark.parametrize("auth", [{"type": "token"}, {"type": "standard-webhooks"}])
async def test_refusals_write_nothing(
    client: Any, tenant: Tenant, database_url: str, auth: Any
) -> None:
    source = await make_source(client, tenant, auth=auth)
    await client.post(path_of(source), json=SOFTLEDGER)
    rows = await db_rows(database_url, "SELECT id FROM events WHERE source_id = $1", source["id"])
    assert rows == []


async def test_one_structured_log_line_per_request_without_secrets(
    client: Any, tenant: Tenant, caplog: Any
) -> None:
    source = await make_source(client, tenant)
    caplog.set_level("INFO", logger="relay.ingest")
    await post_token(client, source, [{"n": 1}, {"n": 2}])
    await client.post(f"{path_of(source)}?token=wrong", json={"n": 3})
    lines = [r for r in caplog.records if r.name == "relay.ingest"]
    assert [(r.status, getattr(r, "events", None)) for r in lines] == [(202, 2), (401, None)]
    ok = lines[0]
    assert ok.source_id == source["id"] and ok.tenant_id == tenant.id and ok.duration_ms >= 0
    from relay.core.logs import JSONFormatter

    for record in lines:
        text = JSONFormatter().format(record)
        assert source["secret"] not in text and "wrong" not in text and '"n"' not in text
