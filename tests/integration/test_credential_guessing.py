"""Failed credentials cost the guesser: a growing delay per client address, then 429.

The state is in Redis, so two gateway processes (`relay serve --processes 2`, a
fresh connection per request so that both take turns) count one guesser's
failures together. Addresses: the guesser connects from 127.0.0.1, a bystander
from 127.0.0.2 (both loopback).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.core.config import Settings
from relay.web.app import create_app
from tests.conftest import ADMIN_TOKEN, OPERATOR, GatewayTestServer, make_tenant, stack_env
from tests.integration.test_ingest import make_source
from tests.services import GatewayProcess
from tests.stack import fetch

LIMIT = 10
#: The first failure's delay in these tests (doubling with each failure).
DELAY_S = 0.05
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def gateway(database_url: str, clean_redis: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    env = stack_env(database_url, clean_redis, RELAY_AUTH_FAILURE_DELAY_S=str(DELAY_S))
    process = GatewayProcess(env, tmp_path / "gw.log", processes=2).start()
    yield process
    process.stop()
    print(process.log()[-5000:])


def session(gateway: GatewayProcess, address: str) -> aiohttp.ClientSession:
    """A client connecting from ``address``, on a fresh connection per request."""
    connector = aiohttp.TCPConnector(force_close=True, local_addr=(address, 0))
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
    return aiohttp.ClientSession(gateway.url, connector=connector, cookie_jar=jar)


@pytest.fixture
async def guesser(gateway: GatewayProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with session(gateway, "127.0.0.1") as client:
        yield client


@pytest.fixture
async def bystander(gateway: GatewayProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with session(gateway, "127.0.0.2") as client:
        yield client


async def console_sign_in(client: aiohttp.ClientSession, token: str) -> aiohttp.ClientResponse:
    async with client.get("/console/login") as resp:
        csrf = CSRF.search(await resp.text())
    assert csrf is not None
    async with client.post(
        "/console/login",
        data={"token": token, "csrf_token": csrf.group(1)},
        allow_redirects=False,
    ) as resp:
        await resp.read()
        return resp


async def guess_until_refused(
    attempt: Any, *, expected: int = 401
) -> tuple[list[float], aiohttp.ClientResponse]:
    """Fail ``LIMIT - 1`` times (each answered ``expected``), then once more: its answer."""
    took = []
    for _ in range(LIMIT - 1):
        started = time.monotonic()
        resp = await attempt()
        took.append(time.monotonic() - started)
        assert resp.status == expected
    return took, await attempt()


def assert_refused(resp: aiohttp.ClientResponse) -> None:
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 60


async def test_console_sign_in_the_tenth_failure_in_a_minute_is_429(
    gateway: GatewayProcess,
    guesser: aiohttp.ClientSession,
    bystander: aiohttp.ClientSession,
) -> None:
    # When one address fails to sign in ten times, across both gateway processes
    took, tenth = await guess_until_refused(lambda: console_sign_in(guesser, "wrong-token-guess"))

    # Then each failure cost a growing delay, and the tenth is refused with Retry-After
    assert took[0] >= DELAY_S
    assert took[3] >= 8 * DELAY_S
    assert_refused(tenth)
    # even the right token is refused from there, so a guess cannot be told right
    assert_refused(await console_sign_in(guesser, ADMIN_TOKEN))
    # while another address signs in
    resp = await console_sign_in(bystander, ADMIN_TOKEN)
    assert resp.status == 303


async def test_wrong_admin_tokens_and_api_keys_are_throttled_per_address(
    guesser: aiohttp.ClientSession, bystander: aiohttp.ClientSession
) -> None:
    async def wrong_admin_token() -> aiohttp.ClientResponse:
        async with guesser.get(
            "/v1/admin/stats", headers={"Authorization": "Bearer wrong-admin-token-0123"}
        ) as resp:
            await resp.read()
            return resp

    async def wrong_api_key() -> aiohttp.ClientResponse:
        async with guesser.get(
            "/v1/targets", headers={"Authorization": "Bearer rly_wrongwrongwrong"}
        ) as resp:
            await resp.read()
            return resp

    # admin tokens and API keys are guessed at the same door: they count together
    for attempt in [wrong_admin_token, wrong_api_key] * ((LIMIT - 1) // 2):
        assert (await attempt()).status == 401
    if (LIMIT - 1) % 2:
        assert (await wrong_admin_token()).status == 401
    assert_refused(await wrong_api_key())
    assert_refused(await wrong_admin_token())
    async with guesser.get("/v1/admin/stats", headers=OPERATOR) as resp:
        assert resp.status == 429
    async with bystander.get("/v1/admin/stats", headers=OPERATOR) as resp:
        assert resp.status == 200


async def test_wrong_source_credentials_are_throttled_per_address_and_source(
    guesser: aiohttp.ClientSession, bystander: aiohttp.ClientSession
) -> None:
    tenant = await make_tenant(bystander)  # type: ignore[arg-type]
    source = await make_source(bystander, tenant)
    other = await make_source(bystander, tenant)
    event = {"uuid": "u-1", "objectType": "Bill", "action": "paid"}

    async def ingest(
        client: aiohttp.ClientSession, src: dict[str, Any], token: str
    ) -> aiohttp.ClientResponse:
        async with client.post(f"/in/{src['id']}?token={token}", json=event) as resp:
            await resp.read()
            return resp

    _, tenth = await guess_until_refused(lambda: ingest(guesser, source, "wrong"))
    assert_refused(tenth)
    assert_refused(await ingest(guesser, source, source["secret"]))
    # another source from the same address (one upstream serves many tenants) is not held
    assert (await ingest(guesser, other, other["secret"])).status == 202
    # nor is another address
    assert (await ingest(bystander, source, source["secret"])).status == 202


# -- one process: what a guess costs the database, logs and metrics -------------------------


async def _gateway(aiohttp_client: Any, settings: Settings, **overrides: Any) -> Any:
    changed = settings.with_overrides(auth_failure_delay_s=DELAY_S, **overrides)
    return await aiohttp_client(GatewayTestServer(create_app(changed)))


async def test_a_locked_out_guesser_costs_no_fresh_read_of_the_source(
    aiohttp_client: Any, settings: Settings, database_url: str
) -> None:
    # Given a source in the gateway's cache, and an address that guessed its token ten times
    client = await _gateway(aiohttp_client, settings, cache_ttl_s=300.0)
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    path = f"/in/{source['id']}"
    resp = await client.post(f"{path}?token={source['secret']}", json={"uuid": "warm"})
    assert resp.status == 202
    for _ in range(LIMIT):
        resp = await client.post(f"{path}?token=wrong", json={})
    assert resp.status == 429

    # When its further guesses come while the sources table cannot be read
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE sources IN ACCESS EXCLUSIVE MODE")
            # Then they are answered 429 at once: no read of the source afresh is made
            for _ in range(3):
                resp = await asyncio.wait_for(client.post(f"{path}?token=wrong", json={}), 3)
                assert resp.status == 429
    finally:
        await conn.close()
    assert await fetch(database_url, "SELECT 1")


async def test_failures_are_counted_and_logged_once_per_window_without_the_guess(
    aiohttp_client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    client = await _gateway(aiohttp_client, settings)

    def failures(text: str, kind: str) -> float:
        for line in text.splitlines():
            if line.startswith(f'relay_auth_failures_total{{kind="{kind}"}}'):
                return float(line.split()[1])
        return 0.0

    before = failures(await (await client.get("/metrics")).text(), "operator")
    caplog.set_level(logging.DEBUG)
    guesses = [f"guess-number-{i}-of-the-admin-token" for i in range(12)]
    statuses = []
    for guess in guesses:
        resp = await client.get("/v1/admin/stats", headers={"Authorization": f"Bearer {guess}"})
        statuses.append(resp.status)
    assert statuses == [401] * (LIMIT - 1) + [429] * 3

    text = await (await client.get("/metrics")).text()
    assert failures(text, "operator") == before + 12
    assert "tenant" not in "".join(
        line for line in text.splitlines() if line.startswith("relay_auth_")
    )
    logged = [r for r in caplog.records if "credential" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert "127.0.0.1" in logged[0].getMessage()
    everything = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert not [g for g in guesses if g in everything]
