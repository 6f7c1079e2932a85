"""The connection cap protects against many connections, not against a few idle ones.

Raw sockets against a real gateway (the server `relay serve` runs) whose cap is 5.
"""

from __future__ import annotations

import asyncio
from typing import Any

from relay.core.config import Settings
from relay.web.app import create_app
from tests.conftest import GatewayTestServer
from tests.integration.test_protocol_hardening import exchange, parse, request

CAP = 5

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _gateway(aiohttp_client: Any, settings: Settings) -> int:
    client = await aiohttp_client(
        GatewayTestServer(create_app(settings.with_overrides(max_connections=CAP)))
    )
    port: int = client.server.port
    return port


async def keep_alive(port: int) -> Connection:
    """A connection that made one request, got its answer and stays open, idle."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("/healthz", {}, method="GET"))
    async with asyncio.timeout(10):
        status, headers, _ = parse(await reader.readuntil(b"\r\n\r\n"))
        await reader.readexactly(int(headers["content-length"]))
    assert status == 200
    assert headers.get("connection", "").lower() != "close"
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, wait: float = 0.5) -> bool:
    try:
        async with asyncio.timeout(wait):
            return await reader.read() == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def test_idle_keep_alive_connections_make_room_for_a_new_client(
    aiohttp_client: Any, settings: Settings
) -> None:
    # Given a gateway whose cap of 5 connections is taken by idle keep-alive connections
    port = await _gateway(aiohttp_client, settings)
    idle = []
    for _ in range(CAP):
        idle.append(await keep_alive(port))
        await asyncio.sleep(0.05)  # so that they are idle in this order
    try:
        # When a new client comes
        raw = await exchange(port, request("/healthz", {"Connection": "close"}, method="GET"))

        # Then it is served, and the oldest idle connection was closed to make room
        assert parse(raw)[0] == 200, raw[:300]
        assert await closed_by_server(idle[0][0])
        assert not await closed_by_server(idle[-1][0], wait=0.2)
    finally:
        for _, writer in idle:
            writer.close()


async def test_connections_in_the_middle_of_a_request_are_not_closed_to_make_room(
    aiohttp_client: Any, settings: Settings
) -> None:
    # Given a gateway whose cap is taken by connections each sending a request body
    port = await _gateway(aiohttp_client, settings)
    busy = []
    for _ in range(CAP):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            request(
                "/v1/sources",
                {"Content-Type": "application/json", "Content-Length": "100"},
                b'{"name": ',
            )
        )
        busy.append((reader, writer))
    try:
        # When a new client comes, it is refused as before (nothing idle to close)
        async def refused() -> bool:
            raw = await exchange(port, request("/healthz", {}, method="GET"), timeout=5)
            return raw.startswith(b"HTTP/1.1 503")

        for _ in range(50):
            if await refused():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("a new client was never refused at the cap")
        # and none of the busy connections was closed
        for reader, _ in busy:
            assert not await closed_by_server(reader, wait=0.1)
    finally:
        for _, writer in busy:
            writer.close()
