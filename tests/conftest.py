"""Test fixtures: real Postgres and Redis, a fresh database per run and per module.

A template database is created and migrated once per run; each test module
gets its own copy (CREATE DATABASE … TEMPLATE), and every database this run
created is dropped at the end, so runs never collide.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings as hypothesis_settings
from yarl import URL

from relay.core.config import Settings
from relay.store.migrations import migrate
from relay.web.app import create_app
from relay.web.server import GatewayRunner

# No per-example deadline: CI shares 2 cores with real servers, and a slow
# example is not a failing one.
hypothesis_settings.register_profile("relay", deadline=None)
hypothesis_settings.load_profile("relay")

ADMIN_TOKEN = "test-admin-token-" + secrets.token_hex(8)
SECRET_KEY = base64.b64encode(secrets.token_bytes(32)).decode()


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` (the query, e.g. a socket ``host=``, kept)."""
    parsed = URL(url)
    return str(parsed.with_path("/" + name).with_query(parsed.query))


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def services() -> Iterator[dict[str, str]]:
    """URLs of the Postgres server and the Redis db the tests use."""
    pg = os.environ.get("DATABASE_URL")
    rd = os.environ.get("REDIS_URL")
    if not pg or not rd:
        from tests.embedded import start_embedded

        with start_embedded() as (pg_url, redis_url):
            yield {"postgres": pg or pg_url, "redis": rd or redis_url}
        return
    yield {"postgres": pg, "redis": rd}


@pytest.fixture(scope="session")
def template_db(services: dict[str, str]) -> Iterator[str]:
    """A migrated template database for this run."""
    name = f"relay_tpl_{uuid.uuid4().hex[:12]}"
    admin = services["postgres"]
    asyncio.run(_admin(admin, f'CREATE DATABASE "{name}"'))

    async def _migrate() -> None:
        conn = await asyncpg.connect(with_database(admin, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    try:
        asyncio.run(_migrate())
        yield name
    finally:
        asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _template_copy(services: dict[str, str], template_db: str) -> Iterator[str]:
    """A fresh copy of the template, dropped at the end."""
    name = f"relay_t_{uuid.uuid4().hex[:12]}"
    admin = services["postgres"]
    asyncio.run(_admin(admin, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"'))
    try:
        yield with_database(admin, name)
    finally:
        asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def database_url(services: dict[str, str], template_db: str) -> Iterator[str]:
    """A fresh copy of the template for this test module."""
    yield from _template_copy(services, template_db)


@pytest.fixture
def own_database(services: dict[str, str], template_db: str) -> Iterator[str]:
    """A fresh copy of the template for one test (its tables' statistics are the test's)."""
    yield from _template_copy(services, template_db)


@pytest.fixture(scope="session")
def redis_url(services: dict[str, str]) -> str:
    """The Redis database of this run (flushed before each test that asks for it)."""
    return services["redis"]


@pytest.fixture
def clean_redis(redis_url: str) -> Iterator[str]:
    """Redis, flushed."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    yield redis_url


@pytest.fixture
def settings(database_url: str, clean_redis: str) -> Settings:
    """Settings for a gateway on this module's database."""
    return Settings.from_env(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": clean_redis,
            "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "RELAY_SECRET_KEY": SECRET_KEY,
            "RELAY_ALLOW_PRIVATE_TARGETS": "1",
            **_broker(),
        }
    )


class GatewayTestServer(TestServer):
    """A test server running the app the way `relay serve` does."""

    async def _make_runner(self, **kwargs: Any) -> GatewayRunner:
        return GatewayRunner(self.app, **kwargs)


class ClosingTestClient(TestClient[Any, Any]):
    """A TestClient that closes its session when its app fails to start.

    pytest-aiohttp's ``aiohttp_client`` forgets a client whose ``start_server``
    raised, leaking its session into the next test (an error there, under
    ``filterwarnings = error``).
    """

    async def start_server(self) -> None:
        try:
            await super().start_server()
        except BaseException:
            await self.close()
            raise


@pytest.fixture
def aiohttp_client_cls() -> type[TestClient[Any, Any]]:
    """Used by pytest-aiohttp's ``aiohttp_client``."""
    return ClosingTestClient


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> TestClient[Any, Any]:
    """A client of a real gateway on a real database."""
    result: TestClient[Any, Any] = await aiohttp_client(GatewayTestServer(create_app(settings)))
    return result


OPERATOR = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Tenant:
    """A tenant created through the API, with its key."""

    id: str
    api_key: str
    api_key_id: str

    @property
    def auth(self) -> dict[str, str]:
        """Headers that authenticate as this tenant."""
        return {"Authorization": f"Bearer {self.api_key}"}


async def make_tenant(client: TestClient[Any, Any], name: str = "Acme") -> Tenant:
    """Create a tenant through the operator API."""
    resp = await client.post("/v1/tenants", json={"name": name}, headers=OPERATOR)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    return Tenant(body["id"], body["api_key"], body["api_key_id"])


@pytest.fixture
async def tenant(client: TestClient[Any, Any]) -> Tenant:
    """A fresh tenant."""
    return await make_tenant(client, "Tenant A")


@pytest.fixture
async def other_tenant(client: TestClient[Any, Any]) -> Tenant:
    """A second tenant, for isolation tests."""
    return await make_tenant(client, "Tenant B")


async def assert_error(resp: Any, status: int, code: str) -> dict[str, Any]:
    """Assert API.md's error shape, status and code; return the error object."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


WORKER_ENV = {
    "RELAY_RETRY_SCHEDULE": "0,0.3,0.3",
    "RELAY_DELIVERY_TIMEOUT_S": "1",
    "RELAY_REQUEUE_AFTER_S": "2",
    # the breaker's open periods on the scale of the schedule's waits
    "RELAY_BREAKER_OPEN_S": "0.3",
    "RELAY_BREAKER_MAX_OPEN_S": "1",
    # and it opens only where a test sets its threshold: what an open breaker holds past
    # the schedule's total (0.6 s here) is dead without another attempt, which would cut
    # short the schedules the other tests follow (tests/integration/test_breaker_window.py)
    "RELAY_BREAKER_THRESHOLD": "1000000",
    "RELAY_ALLOW_PRIVATE_TARGETS": "1",
}


def _broker() -> dict[str, str]:
    """BROKER_URL when the run names one (CI runs the delivery tests on RabbitMQ too)."""
    url = os.environ.get("BROKER_URL")
    return {"BROKER_URL": url} if url else {}


def stack_env(database_url: str, redis_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a gateway and workers on this test's database and Redis."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
        "RELAY_SECRET_KEY": SECRET_KEY,
        **_broker(),
        **WORKER_ENV,
        **overrides,
    }


@pytest.fixture
async def receiver() -> Any:
    """A recording HTTP receiver on 127.0.0.1."""
    from tests.stack import Receiver

    server = await Receiver().start()
    yield server
    await server.close()


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Any]:
    """The delivery engine of a worker process, in this process, on its own pool, Redis
    and broker connection as a worker process has them; closed at the end."""
    from relay.delivery.wakeups import make_broker
    from workers.broker import close_context, open_context
    from workers.engine import Engine

    broker = make_broker(settings.broker_url, middleware=[], fail_fast=True)
    context = await open_context(settings, broker)
    running = Engine(context)
    try:
        yield running
    finally:
        await running.close(timeout_s=5)
        await close_context(context)


@pytest.fixture
def worker(database_url: str, clean_redis: str, tmp_path: Any) -> Iterator[Any]:
    """A running `relay worker` (1 process) on this module's database and a clean Redis."""
    from tests.stack import WorkerProcess

    process = WorkerProcess(stack_env(database_url, clean_redis), tmp_path / "worker.log").start()
    yield process
    process.stop()
    print(process.log()[-20000:])  # shown by pytest when the test failed


@pytest.fixture
def workers(database_url: str, clean_redis: str, tmp_path: Any) -> Iterator[Any]:
    """Start `relay worker` processes with settings of the test's own; stopped at the end."""
    from tests.stack import Workers

    started = Workers(database_url, clean_redis, tmp_path)
    yield started
    for process in started.started:
        process.stop()
        print(process.log()[-10000:])


@pytest.fixture
def stack_settings(database_url: str, clean_redis: str) -> Settings:
    """Gateway settings matching the worker's."""
    return Settings.from_env(stack_env(database_url, clean_redis))


@pytest.fixture
async def gateway(aiohttp_client: Any, stack_settings: Settings) -> TestClient[Any, Any]:
    """A gateway on the same database, Redis and schedule as the worker."""
    result: TestClient[Any, Any] = await aiohttp_client(
        GatewayTestServer(create_app(stack_settings))
    )
    return result


@pytest.fixture
async def fresh_http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client opening a new connection per request: with SO_REUSEPORT, requests
    spread over a replica's gateway processes."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s
