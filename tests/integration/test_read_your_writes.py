"""Read your writes across gateway processes and replicas (API.md, Conventions).

Two replicas on one database: A is `relay serve --processes 2` (two gateway
processes on one port), B a second `relay serve --processes 2`. Changes are
made through one, and the very next request goes through the other, 20 times
in a row for each case. The routing cache is given a long life
(RELAY_CACHE_TTL_S=300) so that only the relay's read-your-writes mechanism,
never a cache's expiry, can make a case pass.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiohttp
import pytest

from tests.conftest import ADMIN_TOKEN, stack_env
from tests.services import replicas as start_replicas

pytestmark = pytest.mark.slow

ROUNDS = 20
BILL = {"date": "2026-11-28T12:00:00Z", "objectType": "Bill", "action": "paid", "objectId": 7}


@pytest.fixture
def replicas(database_url: str, clean_redis: str, tmp_path: Path) -> Iterator[list[str]]:
    env = stack_env(
        database_url,
        clean_redis,
        RELAY_CACHE_TTL_S="300",
        RELAY_ALLOW_PRIVATE_TARGETS="1",
        # revoked keys and old secrets are refused here on purpose, 20 times in a row from
        # one address: the credential throttle (tests/integration/test_credential_guessing.py)
        # would answer 429 from the tenth
        RELAY_AUTH_FAILURE_LIMIT="1000",
        RELAY_AUTH_FAILURE_DELAY_S="0",
    )
    with start_replicas(env, tmp_path, processes=2) as urls:
        yield urls


@pytest.fixture
def http(fresh_http: aiohttp.ClientSession) -> aiohttp.ClientSession:
    return fresh_http


class Api:
    def __init__(self, http: aiohttp.ClientSession, base: str, key: str) -> None:
        self.http, self.base, self.headers = http, base, {"Authorization": f"Bearer {key}"}

    async def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        async with self.http.request(
            method, self.base + path, json=body, headers=self.headers
        ) as resp:
            text = await resp.text()
            assert resp.status == expect, f"{method} {path}: {resp.status} {text}"
            return await resp.json() if text else None


async def tenant_key(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(
        f"{base}/v1/tenants",
        json={"name": "Acme Books"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as resp:
        assert resp.status == 201
        key: str = (await resp.json())["api_key"]
        return key


async def post_event(
    http: aiohttp.ClientSession, base: str, source: dict[str, Any], secret: str, **fields: Any
) -> tuple[int, Any]:
    body = {**BILL, "uuid": str(uuid4()), **fields}
    async with http.post(f"{base}/in/{source['id']}", params={"token": secret}, json=body) as resp:
        return resp.status, await resp.json()


async def delivered_to(api: Api, event_id: str) -> set[str]:
    event = await api.call("GET", f"/v1/events/{event_id}")
    return {d["target_id"] for d in event["deliveries"]}


async def setup(http: aiohttp.ClientSession, replicas: list[str]) -> tuple[Api, Api, Any, str]:
    a_url, b_url = replicas
    key = await tenant_key(http, a_url)
    a, b = Api(http, a_url, key), Api(http, b_url, key)
    source = await a.call(
        "POST", "/v1/sources", {"name": "SoftLedger", "auth": {"type": "token"}}, expect=201
    )
    return a, b, source, source["secret"]


async def warm(http: aiohttp.ClientSession, base: str, source: Any, secret: str) -> None:
    """Fill both processes' caches of a replica with the tenant's current state."""
    for _ in range(6):
        status, _ = await post_event(http, base, source, secret)
        assert status == 202


async def test_a_new_target_gets_the_next_event_through_any_process(
    replicas: list[str], http: aiohttp.ClientSession
) -> None:
    # Given a tenant whose routes every process of replica B has cached
    a, b, source, secret = await setup(http, replicas)
    await warm(http, b.base, source, secret)
    missed = []
    for n in range(ROUNDS):
        # When a target is created through replica A
        target = await a.call("POST", "/v1/targets", {"url": f"http://127.0.0.1:9/{n}"}, expect=201)
        # Then the very next event, posted through replica B, has a delivery to it
        status, answer = await post_event(http, b.base, source, secret)
        assert status == 202, answer
        if target["id"] not in await delivered_to(a, answer["event_ids"][0]):
            missed.append(n)
    assert missed == []


async def test_a_changed_filter_and_enabled_flag_apply_to_the_next_event(
    replicas: list[str], http: aiohttp.ClientSession
) -> None:
    # Given a target for bills, cached by replica B
    a, b, source, secret = await setup(http, replicas)
    target = await a.call(
        "POST",
        "/v1/targets",
        {"url": "http://127.0.0.1:9/", "filter": {"objectType": ["Bill"]}},
        expect=201,
    )
    await warm(http, b.base, source, secret)
    wrong = []
    for n in range(ROUNDS):
        # When its filter or its enabled flag changes through A
        change, wanted = [
            ({"filter": {"objectType": ["Invoice"]}}, False),
            ({"filter": {"objectType": ["Bill"]}}, True),
            ({"enabled": False}, False),
            ({"enabled": True}, True),
        ][n % 4]
        await a.call("PATCH", f"/v1/targets/{target['id']}", change)
        # Then a bill posted through B at once is routed by the new rule
        status, answer = await post_event(http, b.base, source, secret)
        assert status == 202, answer
        got = target["id"] in await delivered_to(a, answer["event_ids"][0])
        if got != wanted:
            wrong.append((n, change))
    assert wrong == []


async def test_a_deleted_target_gets_nothing_more(
    replicas: list[str], http: aiohttp.ClientSession
) -> None:
    a, b, source, secret = await setup(http, replicas)
    wrong = []
    for n in range(ROUNDS):
        target = await a.call("POST", "/v1/targets", {"url": "http://127.0.0.1:9/"}, expect=201)
        await warm(http, b.base, source, secret)
        await a.call("DELETE", f"/v1/targets/{target['id']}", expect=204)
        status, answer = await post_event(http, b.base, source, secret)
        assert status == 202, answer
        if target["id"] in await delivered_to(a, answer["event_ids"][0]):
            wrong.append(n)
    assert wrong == []


async def test_a_rotated_source_secret_is_accepted_at_once(
    replicas: list[str], http: aiohttp.ClientSession
) -> None:
    # Given a source whose current secret every process of B has cached
    a, b, source, secret = await setup(http, replicas)
    await warm(http, b.base, source, secret)
    refused = []
    for n in range(ROUNDS):
        # When the secret is rotated through A
        rotated = await a.call("POST", f"/v1/sources/{source['id']}/rotate-secret")
        secret = rotated["secret"]
        # Then B accepts the new one at once
        status, answer = await post_event(http, b.base, source, secret)
        if status != 202:
            refused.append((n, status, answer))
    assert refused == []


async def test_changed_basic_credentials_apply_at_once(
    replicas: list[str], http: aiohttp.ClientSession
) -> None:
    # Given a basic-auth source, cached by B with its first username
    a, b, _, _ = await setup(http, replicas)
    source = await a.call(
        "POST",
        "/v1/sources",
        {"name": "basic", "auth": {"type": "basic", "username": "user-0"}},
        expect=201,
    )
    wrong = []
    for n in range(ROUNDS):
        # When the username changes through A
        name = f"user-{n + 1}"
        await a.call(
            "PATCH", f"/v1/sources/{source['id']}", {"auth": {"type": "basic", "username": name}}
        )
        # Then B refuses the old username and accepts the new one at once
        for user, wanted in ((f"user-{n}", 401), (name, 202)):
            token = base64.b64encode(f"{user}:{source['secret']}".encode()).decode()
            async with http.post(
                f"{b.base}/in/{source['id']}",
                json={**BILL, "uuid": str(uuid4())},
                headers={"Authorization": f"Basic {token}"},
            ) as resp:
                if resp.status != wanted:
                    wrong.append((n, user, resp.status))
    assert wrong == []


async def test_a_deleted_source_is_refused_at_once(
    replicas: list[str], http: aiohttp.ClientSession
) -> None:
    a, b, _, _ = await setup(http, replicas)
    accepted = []
    for n in range(ROUNDS):
        # Given a source that replica B has just accepted events for
        source = await a.call(
            "POST", "/v1/sources", {"name": f"s{n}", "auth": {"type": "token"}}, expect=201
        )
        await warm(http, b.base, source, source["secret"])
        # When it is deleted through A
        await a.call("DELETE", f"/v1/sources/{source['id']}", expect=204)
        # Then B answers 404 at once and stores nothing
        status, answer = await post_event(http, b.base, source, source["secret"])
        if status != 404:
            accepted.append((n, status, answer))
    assert accepted == []


async def test_a_revoked_api_key_is_refused_at_once(
    replicas: list[str], http: aiohttp.ClientSession
) -> None:
    a_url, b_url = replicas
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.post(f"{a_url}/v1/tenants", json={"name": "Keys"}, headers=admin) as resp:
        tenant = await resp.json()
    refused = []
    for n in range(ROUNDS):
        async with http.post(f"{a_url}/v1/tenants/{tenant['id']}/api-keys", headers=admin) as r:
            key = await r.json()
        b = Api(http, b_url, key["api_key"])
        await b.call("GET", "/v1/targets")
        async with http.delete(
            f"{a_url}/v1/tenants/{tenant['id']}/api-keys/{key['id']}", headers=admin
        ) as r:
            assert r.status == 204
        async with http.get(f"{b_url}/v1/targets", headers=b.headers) as r:
            if r.status != 401:
                refused.append((n, r.status))
    assert refused == []
