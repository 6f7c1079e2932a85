"""A tenant's budget on the shared relay (issue 21): ingest bytes, deliveries created and
API requests per second.

The operator sets it with ``PATCH /v1/tenants/{id}`` (``limits``), or for every tenant
without one with RELAY_TENANT_INGEST_BYTES_PER_S, RELAY_TENANT_DELIVERIES_PER_S and
RELAY_TENANT_API_REQUESTS_PER_S. Before,
a tenant could take as much of the gateway, Postgres and the workers as it could send:
under tests/faults/noise.py's noise, a quiet tenant's ingest p99 was 387 ms
(bench/noisy_neighbour.py). The budget is one for all gateway processes: the tests
that count it run two `relay serve` replicas on one database and Redis, and send
alternately through each.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.core.config import ConfigError, Settings
from relay.web.app import create_app
from tests.conftest import ADMIN_TOKEN, OPERATOR, Tenant, assert_error, make_tenant, stack_env
from tests.services import replicas as start_replicas

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BILL = {"date": "2026-12-06T12:00:00Z", "objectType": "Bill", "action": "paid", "objectId": 7}
#: the replicas' largest body, and so the burst of a bytes budget below it
MAX_BODY = 65_536


# ---- the setting, in the API ----


async def test_the_operator_sets_shows_and_clears_a_budget(client: Any, tenant: Tenant) -> None:
    url = f"/v1/tenants/{tenant.id}"
    # Given a new tenant: no budget of its own
    got = await (await client.get(url, headers=OPERATOR)).json()
    none = {"ingest_bytes_per_s": None, "deliveries_per_s": None, "api_requests_per_s": None}
    assert got["limits"] == none
    # When the operator sets all three (a JSON integer may be written 2000.0)
    limits = {"ingest_bytes_per_s": 500_000, "deliveries_per_s": 2000.0, "api_requests_per_s": 20}
    resp = await client.patch(url, json={"limits": limits}, headers=OPERATOR)
    assert resp.status == 200, await resp.text()
    set_ = {"ingest_bytes_per_s": 500_000, "deliveries_per_s": 2000, "api_requests_per_s": 20}
    assert (await resp.json())["limits"] == set_
    # Then reading the tenant shows them, and a list too
    assert (await (await client.get(url, headers=OPERATOR)).json())["limits"] == set_
    listed = await (await client.get("/v1/tenants", headers=OPERATOR)).json()
    assert [t["limits"] for t in listed["data"] if t["id"] == tenant.id] == [set_]
    # And a field left out is left as it is; null clears one (back to the default)
    resp = await client.patch(url, json={"limits": {"deliveries_per_s": None}}, headers=OPERATOR)
    assert (await resp.json())["limits"] == {**set_, "deliveries_per_s": None}
    # And a rename leaves the budget alone
    resp = await client.patch(url, json={"name": "Acme Ltd"}, headers=OPERATOR)
    body = await resp.json()
    assert body["name"] == "Acme Ltd" and body["limits"]["ingest_bytes_per_s"] == 500_000


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"limits": {"deliveries_per_s": -5}}, "deliveries_per_s"),
        ({"limits": {"deliveries_per_s": 1.5}}, "deliveries_per_s"),
        ({"limits": {"deliveries_per_s": "100"}}, "deliveries_per_s"),
        ({"limits": {"deliveries_per_s": True}}, "deliveries_per_s"),
        ({"limits": {"deliveries_per_s": 1 << 31}}, "deliveries_per_s"),
        ({"limits": {"ingest_bytes_per_s": (1 << 40) + 1}}, "ingest_bytes_per_s"),
        ({"limits": {"api_requests_per_s": -1}}, "api_requests_per_s"),
        ({"limits": {"events_per_s": 5}}, "events_per_s"),
        ({"limits": None}, "limits"),
        ({"limits": []}, "limits"),
        ({"name": None}, "name"),
        ({"name": ""}, "name"),
        ({"id": "ten_x"}, "id"),
    ],
)
async def test_a_bad_budget_is_422_naming_the_field_and_changes_nothing(
    client: Any, tenant: Tenant, body: dict[str, Any], field: str
) -> None:
    url = f"/v1/tenants/{tenant.id}"
    before = await (await client.get(url, headers=OPERATOR)).json()
    error = await assert_error(
        await client.patch(url, json=body, headers=OPERATOR), 422, "validation_error"
    )
    assert any(field in d["field"] for d in error["details"]), error
    assert await (await client.get(url, headers=OPERATOR)).json() == before


async def test_a_budget_is_the_operators_alone(client: Any, tenant: Tenant) -> None:
    url = f"/v1/tenants/{tenant.id}"
    limits = {"limits": {"deliveries_per_s": 1_000_000}}
    # A tenant cannot raise its own budget, with its key or none
    await assert_error(
        await client.patch(url, json=limits, headers=tenant.auth), 401, "unauthorized"
    )
    await assert_error(await client.patch(url, json=limits), 401, "unauthorized")
    # And an unknown tenant is 404
    await assert_error(
        await client.patch("/v1/tenants/ten_nope", json=limits, headers=OPERATOR), 404, "not_found"
    )


def test_the_default_budget_comes_from_the_environment() -> None:
    assert Settings.from_env({}).tenant_deliveries_per_s is None  # none unless set
    settings = Settings.from_env(
        {
            "RELAY_TENANT_INGEST_BYTES_PER_S": "2000000",
            "RELAY_TENANT_DELIVERIES_PER_S": "0",
            "RELAY_TENANT_API_REQUESTS_PER_S": "50",
        }
    )
    assert settings.tenant_ingest_bytes_per_s == 2_000_000
    assert settings.tenant_deliveries_per_s is None  # 0: none
    assert settings.tenant_api_requests_per_s == 50
    assert (
        Settings.from_env({"RELAY_TENANT_DELIVERIES_PER_S": "00"}).tenant_deliveries_per_s is None
    )
    for bad in ("-1", "1.5", "lots", str(1 << 41)):
        with pytest.raises(ConfigError, match="RELAY_TENANT_DELIVERIES_PER_S"):
            Settings.from_env({"RELAY_TENANT_DELIVERIES_PER_S": bad})


# ---- the budget, across two gateway replicas ----


@pytest.fixture
def replicas(database_url: str, clean_redis: str, tmp_path: Path) -> Iterator[list[str]]:
    env = stack_env(
        database_url,
        clean_redis,
        RELAY_CACHE_TTL_S="300",  # only read-your-writes, never a cache's expiry, can pass
        RELAY_MAX_BODY_BYTES=str(MAX_BODY),
        RELAY_AUTH_FAILURE_LIMIT="1000",
        RELAY_AUTH_FAILURE_DELAY_S="0",
    )
    with start_replicas(env, tmp_path) as urls:
        yield urls


class Replicas:
    """Two replicas, and a tenant with one target (no worker: deliveries are only stored)."""

    def __init__(self, http: aiohttp.ClientSession, urls: list[str]) -> None:
        self.http, self.urls = http, urls
        self.tenant_id = self.key = ""

    async def call(self, n: int, method: str, path: str, body: Any = None, **headers: str) -> Any:
        async with self.http.request(
            method, self.urls[n % 2] + path, json=body, headers=headers
        ) as resp:
            answer = await resp.json()
            assert resp.status < 300, f"{method} {path}: {resp.status} {answer}"
            return answer

    async def setup(self) -> None:
        tenant = await self.call(0, "POST", "/v1/tenants", {"name": "Acme"}, **ADMIN)
        self.tenant_id, self.key = tenant["id"], tenant["api_key"]
        await self.call(
            0,
            "POST",
            "/v1/targets",
            {"url": "http://127.0.0.1:9/hook"},
            Authorization=f"Bearer {self.key}",
        )

    async def source(self, auth: dict[str, Any]) -> dict[str, Any]:
        body = {"name": "upstream", "auth": auth}
        return dict(
            await self.call(0, "POST", "/v1/sources", body, Authorization=f"Bearer {self.key}")
        )

    async def token_source(self) -> tuple[dict[str, Any], dict[str, str]]:
        """A token source, and the headers that authenticate ingest with it."""
        source = await self.source({"type": "token"})
        return source, {"Authorization": f"Bearer {source['secret']}"}

    async def limits(self, n: int, **limits: int | None) -> None:
        await self.call(n, "PATCH", f"/v1/tenants/{self.tenant_id}", {"limits": limits}, **ADMIN)

    async def ingest(
        self, n: int, source: dict[str, Any], body: bytes, **headers: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        async with self.http.post(
            f"{self.urls[n % 2]}/in/{source['id']}",
            data=body,
            headers={"Content-Type": "application/json", **headers},
        ) as resp:
            return resp.status, await resp.json(), dict(resp.headers)

    async def events(self) -> int:
        answer = await self.call(
            0, "GET", "/v1/events?limit=500", Authorization=f"Bearer {self.key}"
        )
        return len(answer["data"])


@pytest.fixture
async def two(replicas: list[str], fresh_http: aiohttp.ClientSession) -> Replicas:
    stack = Replicas(fresh_http, replicas)
    await stack.setup()
    return stack


def batch(count: int, pad: int = 0) -> bytes:
    return json.dumps([{**BILL, "objectId": i, "pad": "x" * pad} for i in range(count)]).encode()


@pytest.mark.slow
async def test_a_deliveries_budget_is_one_for_both_replicas(two: Replicas) -> None:
    # Given a budget of 1 delivery per second, set through replica 0
    source, token = await two.token_source()
    await two.limits(0, deliveries_per_s=1)
    # When ten one-event requests go as fast as they can, alternately through each replica
    started = time.monotonic()
    answers = [await two.ingest(n, source, batch(1), **token) for n in range(10)]
    elapsed = time.monotonic() - started
    # Then the two together accepted one per second (a replica with a budget of its own
    # would have let a second one in), and refused the rest with 429 and a Retry-After
    accepted = [a for a in answers if a[0] == 202]
    assert 1 <= len(accepted) <= 1 + int(elapsed), (elapsed, [a[0] for a in answers])
    refused = [a for a in answers if a[0] != 202]
    assert {status for status, _, _ in refused} == {429}
    for _, body, headers in refused:
        assert body["error"]["code"] == "rate_limited"
        assert "budget of 1 deliveries/s" in body["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
    # And nothing refused was stored
    assert await two.events() == len(accepted)
    # And a request creating more than a second's worth never fits, and says so
    status, body, _ = await two.ingest(1, source, batch(2), **token)
    assert status == 429 and "send smaller batches" in body["error"]["message"]
    # And once the budget has recovered, either replica takes an event again
    await asyncio.sleep(1.1)
    status, _, _ = await two.ingest(1, source, batch(1), **token)
    assert status == 202


@pytest.mark.slow
async def test_a_budget_changed_through_one_replica_holds_at_once_on_the_other(
    two: Replicas,
) -> None:
    source, token = await two.token_source()
    # Given replica 1 has the source cached (for 300 s) with no budget
    assert (await two.ingest(1, source, batch(1), **token))[0] == 202
    # When a budget of 1 delivery/s is set through replica 0
    await two.limits(0, deliveries_per_s=1)
    # Then replica 1's very next requests are held to it
    started = time.monotonic()
    statuses = [(await two.ingest(1, source, batch(1), **token))[0] for _ in range(3)]
    elapsed = time.monotonic() - started
    assert set(statuses) <= {202, 429} and statuses.count(202) <= 1 + int(elapsed), statuses
    # And once the budget is cleared through replica 0, replica 1 takes the next at once
    await two.limits(0, deliveries_per_s=None)
    statuses = [(await two.ingest(1, source, batch(1), **token))[0] for _ in range(3)]
    assert statuses == [202, 202, 202]


@pytest.mark.slow
async def test_a_bytes_budget_refuses_before_the_body_is_read(two: Replicas) -> None:
    # Given a budget of 1 byte/s (its burst: the largest body, 64 KiB), 60 KB of it spent
    # by a request through replica 0
    source, token = await two.token_source()
    await two.limits(0, ingest_bytes_per_s=1)
    body = batch(100, pad=500)
    assert 60_000 < len(body) < MAX_BODY
    assert (await two.ingest(0, source, body, **token))[0] == 202
    host, port = two.urls[1].removeprefix("http://").split(":")

    async def head_and_some(head: str, some: bytes) -> bytes:
        """What replica 1 answers a request of which only ``some`` of the body was sent."""
        reader, writer = await asyncio.open_connection(host, int(port))
        line = f"POST /in/{source['id']}?token={source['secret']} HTTP/1.1\r\nHost: {host}\r\n"
        writer.write(f"{line}Content-Type: application/json\r\n{head}\r\n".encode() + some)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()

    # When another 60 KB request to replica 1 sends its head and only a tenth of its body
    answer = await head_and_some(f"Content-Length: {len(body)}\r\n", body[: len(body) // 10])
    # Then it is answered 429 without waiting for the rest, and the connection closed
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429"), answer[:300]
    assert b"budget of 1 ingest bytes/s" in rest
    # And once the rest of the burst is spent exactly, a body of unknown length (chunked)
    # is refused too, on its head and first chunk
    fill = json.dumps({"pad": "x" * (MAX_BODY - len(body) - 11)}).encode()
    assert len(body) + len(fill) == MAX_BODY
    assert (await two.ingest(0, source, fill, **token))[0] == 202
    chunk = body[:1000]
    answer = await head_and_some(
        "Transfer-Encoding: chunked\r\n", f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 429"), answer[:300]
    assert await two.events() == 101


@pytest.mark.slow
async def test_a_stranger_cannot_spend_a_signed_sources_budget(two: Replicas) -> None:
    # Given an hmac source whose tenant may send 1,000 bytes/s (bursts of 64 KiB)
    source = await two.source({"type": "hmac"})
    await two.limits(0, ingest_bytes_per_s=1000)
    body = batch(100, pad=500)

    def signed(payload: bytes) -> dict[str, str]:
        digest = hmac.new(source["secret"].encode(), payload, hashlib.sha256).hexdigest()
        return {"X-Signature": digest}

    # When a stranger sends five 60 KB bodies with a wrong signature through both replicas
    for n in range(5):
        status, _, _ = await two.ingest(n, source, body, **{"X-Signature": "00" * 32})
        assert status == 401
    # Then the tenant's own signed 60 KB body still fits: the stranger spent nothing
    status, answer, _ = await two.ingest(1, source, body, **signed(body))
    assert status == 202, answer
    # And the next one, now over the budget, is refused
    status, answer, _ = await two.ingest(0, source, body, **signed(body))
    assert status == 429 and "ingest bytes/s" in answer["error"]["message"]
    # And a stranger still learns nothing of the budget: 401 before any 429
    status, _, _ = await two.ingest(1, source, body, **{"X-Signature": "00" * 32})
    assert status == 401
    assert await two.events() == 100


@pytest.mark.slow
async def test_a_captured_signed_request_sent_again_spends_nothing(two: Replicas) -> None:
    # Given an hmac source with a timestamp header, whose tenant may send 1,000 bytes/s
    source = await two.source({"type": "hmac", "timestamp_header": "X-Timestamp"})
    await two.limits(0, ingest_bytes_per_s=1000)
    body = batch(50, pad=500)  # ~33 KB: one fits the 64 KiB burst, two do not
    stamp = str(int(time.time()))
    digest = hmac.new(
        source["secret"].encode(), stamp.encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    captured = {"X-Signature": digest, "X-Timestamp": stamp}
    assert (await two.ingest(0, source, body, **captured))[0] == 202
    # When someone who captured it sends it again, five times, through both replicas
    for n in range(5):
        assert (await two.ingest(n, source, body, **captured))[0] == 401
    # Then the tenant's own next request of the same size still fits its budget
    stamp = str(int(time.time()))
    other = batch(50, pad=400)
    digest = hmac.new(
        source["secret"].encode(), stamp.encode() + b"." + other, hashlib.sha256
    ).hexdigest()
    headers = {"X-Signature": digest, "X-Timestamp": stamp}
    status, answer, _ = await two.ingest(1, source, other, **headers)
    assert status == 202, answer


@pytest.mark.slow
async def test_raising_a_budget_lifts_the_debt_run_up_at_the_old_one(two: Replicas) -> None:
    # Given a tenant that spent 60 KB of a 1,000 bytes/s budget: a minute to wait
    source, token = await two.token_source()
    await two.limits(0, ingest_bytes_per_s=1000)
    body = batch(100, pad=500)
    assert (await two.ingest(0, source, body, **token))[0] == 202
    status, _, headers = await two.ingest(1, source, body, **token)
    assert status == 429 and int(headers["Retry-After"]) > 30
    # When the operator raises it to 10 MB/s
    await two.limits(1, ingest_bytes_per_s=10_000_000)
    # Then the next request through either replica goes at once (before: 429, a minute)
    assert (await two.ingest(1, source, body, **token))[0] == 202
    assert (await two.ingest(0, source, body, **token))[0] == 202


@pytest.mark.slow
async def test_a_request_routed_again_pays_for_the_targets_it_found(two: Replicas) -> None:
    # Given a tenant with no target yet, whose replica 1 has cached its empty routes
    tenant = await two.call(0, "POST", "/v1/tenants", {"name": "Empty"}, **ADMIN)
    key = {"Authorization": f"Bearer {tenant['api_key']}"}
    body = {"name": "s", "auth": {"type": "token"}}
    source = await two.call(0, "POST", "/v1/sources", body, **key)
    token = {"Authorization": f"Bearer {source['secret']}"}
    path = f"/v1/tenants/{tenant['id']}"
    await two.call(0, "PATCH", path, {"limits": {"deliveries_per_s": 10}}, **ADMIN)
    assert (await two.ingest(1, source, batch(1), **token))[0] == 202  # no delivery
    # When a target is created through replica 0, and replica 1 is sent 100 events
    await two.call(0, "POST", "/v1/targets", {"url": "http://127.0.0.1:9/hook"}, **key)
    status, answer, _ = await two.ingest(1, source, batch(100), **token)
    # Then the 100 deliveries it found on routing again are paid for: more than a
    # second's worth, refused (before: let in, 100 deliveries on a budget of 10)
    assert status == 429 and "100 deliveries" in answer["error"]["message"], answer


async def test_zero_exempts_a_tenant_from_the_default_budget(
    aiohttp_client: Any, settings: Settings
) -> None:
    client = await aiohttp_client(create_app(settings.with_overrides(tenant_api_requests_per_s=1)))
    held, exempt = await make_tenant(client, "Held"), await make_tenant(client, "Exempt")
    await client.patch(
        f"/v1/tenants/{exempt.id}", json={"limits": {"api_requests_per_s": 0}}, headers=OPERATOR
    )
    # Given a default of 1 API request a second: the one tenant is held to it
    started = time.monotonic()
    statuses = [(await client.get("/v1/sources", headers=held.auth)).status for _ in range(3)]
    elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 429} and statuses.count(200) <= 1 + int(elapsed), statuses
    # And the one whose own budget is 0 is held to none
    statuses = [(await client.get("/v1/sources", headers=exempt.auth)).status for _ in range(3)]
    assert statuses == [200, 200, 200]


@pytest.mark.slow
async def test_an_api_budget_is_one_for_both_replicas_and_the_tenants_alone(
    two: Replicas,
) -> None:
    # Given a budget of 1 API request per second, and a source for ingest
    source, token = await two.token_source()
    await two.limits(0, api_requests_per_s=1)
    other = await two.call(0, "POST", "/v1/tenants", {"name": "Other"}, **ADMIN)
    # When the tenant lists its events ten times, alternately through each replica
    started = time.monotonic()
    answers = []
    for n in range(10):
        async with two.http.get(
            f"{two.urls[n % 2]}/v1/events", headers={"Authorization": f"Bearer {two.key}"}
        ) as resp:
            answers.append((resp.status, await resp.json(), resp.headers.get("Retry-After")))
    elapsed = time.monotonic() - started
    # Then the two replicas together answered one a second, and 429 the rest
    ok = [a for a in answers if a[0] == 200]
    assert 1 <= len(ok) <= 1 + int(elapsed), (elapsed, [a[0] for a in answers])
    for status, body, retry_after in answers:
        if status != 200:
            assert status == 429 and body["error"]["code"] == "rate_limited"
            assert "budget of 1 API requests/s" in body["error"]["message"]
            assert retry_after is not None and int(retry_after) >= 1
    # And its ingest is not counted in it, nor is another tenant held by it
    assert (await two.ingest(1, source, batch(1), **token))[0] == 202
    for n in range(3):
        async with two.http.get(
            f"{two.urls[n % 2]}/v1/events",
            headers={"Authorization": f"Bearer {other['api_key']}"},
        ) as resp:
            assert resp.status == 200


@pytest.mark.slow
async def test_a_compressed_body_pays_for_what_it_inflates_to(two: Replicas) -> None:
    # Given a budget of 1,000 bytes/s (bursts of 64 KiB), and a 60 KB batch gzipped to ~1 KB
    source, token = await two.token_source()
    await two.limits(0, ingest_bytes_per_s=1000)
    body = batch(100, pad=500)
    packed = gzip.compress(body)
    assert len(packed) < 5_000 < 60_000 < len(body)
    headers = {**token, "Content-Encoding": "gzip"}
    # When it is sent once, then again through the other replica
    first = await two.ingest(0, source, packed, **headers)
    second = await two.ingest(1, source, packed, **headers)
    # Then the first spent 60 KB of the budget, not 1 KB, and the second does not fit
    assert first[0] == 202, first
    assert second[0] == 429 and "ingest bytes/s" in second[1]["error"]["message"], second
    assert await two.events() == 100
