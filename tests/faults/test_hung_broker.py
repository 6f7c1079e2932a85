"""A broker that accepts connections and never answers costs the gateway nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relay.core.config import Settings
from relay.delivery.wakeups import Enqueuer, make_broker
from relay.web.app import create_app
from tests.conftest import make_tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import fetch


@pytest.fixture
async def blackhole() -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1 that accepts and never reads nor answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_hung_broker_starves_neither_dns_nor_memory(
    aiohttp_client: Any, settings: Settings, blackhole: str, database_url: str
) -> None:
    # Given a gateway whose broker hangs, and more ingests than the default executor has threads
    app = create_app(settings.with_overrides(broker_url=blackhole))
    gateway = await aiohttp_client(app)
    tenant = await make_tenant(gateway)
    source = await make_source(gateway, tenant)
    await make_target(gateway, tenant)
    for i in range(12):
        resp = await post_token(gateway, source, {"uuid": f"hung-{i}"})
        assert resp.status == 202

    # Then name resolution (the default executor, which aiohttp's resolver uses) still works
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo("localhost", 80), timeout=10)
    assert infos

    # And every event is committed, its delivery left for the sweeper
    rows = await fetch(
        database_url,
        "SELECT count(*) AS n FROM deliveries WHERE tenant_id = $1 AND status = 'pending'",
        tenant.id,
    )
    assert rows[0]["n"] == 12


async def test_hung_broker_keeps_a_bounded_number_of_enqueues(
    blackhole: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an enqueuer whose broker hangs (Dramatiq's Redis broker sends one at a time)
    enqueuer = Enqueuer(make_broker(blackhole, middleware=[], fail_fast=True), max_pending=3)
    try:
        # When more enqueues are asked than it may keep
        for i in range(10):
            enqueuer.enqueue_soon([f"dlv_{i}"])
        # Then it keeps only its bound; the rest are dropped, logged, left to the sweeper
        assert enqueuer.in_flight == 3
        assert "left to the sweeper" in caplog.text
    finally:
        await enqueuer.close()
