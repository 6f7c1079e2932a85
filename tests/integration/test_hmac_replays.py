"""Replays of signed hmac requests, across gateway processes (API.md, Ingest).

An ``hmac`` source with ``auth.timestamp_header`` refuses a signature it already
accepted within the 5-minute tolerance (401), as ``standard-webhooks`` sources
refuse a ``webhook-id`` seen: the memory is in Redis, so a request captured at
one gateway process and replayed at another is refused too. A request that is
refused after its signature was checked (429, 400, 503) does not use the
signature up: the sender's retry of it is accepted. Without a timestamp header a
replay cannot be told from a resend; a ``uuid`` in the event de-duplicates it.

Two gateways (`relay serve`, one process each) on one database and one Redis:
each replay goes to the other process than the original.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiohttp
import pytest

from tests.conftest import ADMIN_TOKEN, stack_env
from tests.services import replicas
from tests.stack import fetch

pytestmark = pytest.mark.slow

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def gateways(database_url: str, clean_redis: str, tmp_path: Path) -> Iterator[list[str]]:
    with replicas(stack_env(database_url, clean_redis), tmp_path) as urls:
        yield urls


@pytest.fixture
def http(fresh_http: aiohttp.ClientSession) -> aiohttp.ClientSession:
    return fresh_http


async def hmac_source(
    http: aiohttp.ClientSession, base: str, **auth: Any
) -> tuple[dict[str, Any], str]:
    """A new tenant's hmac source (``auth`` added to the type), and the tenant's API key."""
    async with http.post(
        f"{base}/v1/tenants",
        json={"name": "Acme Books"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as resp:
        assert resp.status == 201
        key = (await resp.json())["api_key"]
    extra = auth.pop("source", {})
    async with http.post(
        f"{base}/v1/sources",
        json={"name": "SoftLedger", "auth": {"type": "hmac", **auth}, **extra},
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        assert resp.status == 201, await resp.text()
        return await resp.json(), key


def signed(secret: str, body: bytes, ts: int | None = None) -> dict[str, str]:
    """Headers of a request signed over ``timestamp + "." + body`` (hex)."""
    ts = int(time.time()) if ts is None else ts
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256)
    return {**JSON, "X-Signature": mac.hexdigest(), "X-Timestamp": str(ts)}


async def post(
    http: aiohttp.ClientSession, base: str, source: dict[str, Any], body: bytes, headers: Any
) -> tuple[int, Any]:
    async with http.post(f"{base}/in/{source['id']}", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def stored(database_url: str, source: dict[str, Any]) -> int:
    rows = await fetch(
        database_url, "SELECT count(*) AS n FROM events WHERE source_id = $1", source["id"]
    )
    return int(rows[0]["n"])


async def test_a_replayed_hmac_signature_is_refused_by_every_gateway_process(
    gateways: list[str], http: aiohttp.ClientSession, database_url: str
) -> None:
    a, b = gateways
    source, _ = await hmac_source(http, a, timestamp_header="X-Timestamp")
    body = json.dumps({"objectType": "Bill", "action": "paid", "objectId": 7}).encode()  # no uuid
    captured = signed(source["secret"], body)
    status, answer = await post(http, a, source, body, captured)
    assert status == 202, answer
    # When the captured request is sent again, to the other process and to the same one,
    # and with its signature written another way (upper-case hex, base64)
    digest = bytes.fromhex(captured["X-Signature"])
    for base, headers in (
        (b, captured),
        (a, captured),
        (b, {**captured, "X-Signature": digest.hex().upper()}),
        (b, {**captured, "X-Signature": base64.b64encode(digest).decode()}),
    ):
        status, answer = await post(http, base, source, body, headers)
        # Then each is refused, and nothing more is stored
        assert status == 401, (base, headers, answer)
        assert answer["error"]["code"] == "unauthorized"
        assert "already received" in answer["error"]["message"]
    assert await stored(database_url, source) == 1
    # a new signature (the next second's) of the same body is a new request
    fresh_ts = int(captured["X-Timestamp"]) + 1
    status, answer = await post(http, b, source, body, signed(source["secret"], body, fresh_ts))
    assert status == 202, answer
    assert await stored(database_url, source) == 2


async def test_a_refused_request_does_not_use_its_signature_up(
    gateways: list[str], http: aiohttp.ClientSession, database_url: str
) -> None:
    a, b = gateways
    source, _ = await hmac_source(http, a, timestamp_header="X-Timestamp", source={"rate_limit": 1})
    first = json.dumps({"n": 1}).encode()
    status, answer = await post(http, a, source, first, signed(source["secret"], first))
    assert status == 202, answer
    # Given a signed request refused after its signature was checked (over the rate limit)
    second = json.dumps({"n": 2}).encode()
    headers = signed(source["secret"], second)
    status, answer = await post(http, a, source, second, headers)
    assert status == 429, answer
    # When the sender retries it as it was, through the other process, once there is room
    await asyncio.sleep(1.2)
    status, answer = await post(http, b, source, second, headers)
    # Then it is accepted, once
    assert status == 202, answer
    status, answer = await post(http, a, source, second, headers)
    assert status == 401, answer
    assert await stored(database_url, source) == 2


async def test_without_a_timestamp_header_a_resend_is_accepted_and_its_uuid_de_duplicates(
    gateways: list[str], http: aiohttp.ClientSession, database_url: str
) -> None:
    # API.md: such a source cannot tell a replay from a resend; its events' uuid de-duplicates
    a, b = gateways
    source, _ = await hmac_source(http, a)
    body = json.dumps({"uuid": str(uuid4()), "objectType": "Bill"}).encode()
    headers = {
        **JSON,
        "X-Signature": hmac.new(source["secret"].encode(), body, "sha256").hexdigest(),
    }
    ids = []
    for base in (a, b, a):
        status, answer = await post(http, base, source, body, headers)
        assert status == 202, answer
        ids.append(answer["event_ids"])
    assert ids[0] == ids[1] == ids[2]
    assert await stored(database_url, source) == 1
