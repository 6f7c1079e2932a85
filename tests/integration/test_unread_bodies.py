"""A body nobody asked for costs the gateway nothing: it is discarded, never inflated.

`relay serve` as a subprocess, so the test can read the gateway process's own CPU
time from /proc; requests on raw sockets (a client library would not send a
gzip body with a GET).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import OPERATOR, Tenant, stack_env
from tests.integration.test_protocol_hardening import parse
from tests.services import GatewayProcess

#: 900 MiB of "A" inflate from this many bytes of gzip (about 0.9 MB).
BOMB_MIB = 900
#: CPU the gateway may spend on one such request, whatever the answer: generous on a
#: loaded 2-core machine (inflating the whole bomb took about 1.9 s).
CPU_BOUND_S = 0.3


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A gzip stream of 900 MiB of ``A``, made a MiB at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"A" * (1 << 20)
    parts = [packer.compress(block) for _ in range(BOMB_MIB)]
    return b"".join([*parts, packer.flush()])


@pytest.fixture
def gateway(database_url: str, clean_redis: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(stack_env(database_url, clean_redis), tmp_path / "gw.log").start()
    yield process
    process.stop()
    print(process.log()[-5000:])


@pytest.fixture
async def http(gateway: GatewayProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(gateway.url) as session:
        yield session


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (its own, not its children's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


async def send_body(port: int, head: str, body: bytes, *, timeout: float = 30) -> tuple[int, bool]:
    """Send ``head`` and ``body`` on a fresh connection: (status, whether the server closed).

    The body is written while the answer is read, as a client does that does not
    wait for ``100-continue``; a server that stops reading is fine.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def push() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode("latin-1") + b"\r\n")
            for start in range(0, len(body), 65536):
                writer.write(body[start : start + 65536])
                await writer.drain()

    sender = asyncio.create_task(push())
    try:
        async with asyncio.timeout(timeout):
            answer = await reader.readuntil(b"\r\n\r\n")
            status, headers, _ = parse(answer)
            await reader.readexactly(int(headers.get("content-length", "0")))
        try:
            async with asyncio.timeout(5):  # the gateway gives up on the rest of the body
                closed = await reader.read() == b""
        except ConnectionError:
            closed = True
        except TimeoutError:
            closed = False
        return status, closed
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        writer.close()


async def make_token_source(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.post("/v1/tenants", json={"name": "Acme"}, headers=OPERATOR) as resp:
        assert resp.status == 201
        created = await resp.json()
    tenant = Tenant(created["id"], created["api_key"], created["api_key_id"])
    async with http.post(
        "/v1/sources", json={"name": "SL", "auth": {"type": "token"}}, headers=tenant.auth
    ) as resp:
        assert resp.status == 201
        source: dict[str, Any] = await resp.json()
        return source


@pytest.mark.parametrize(
    ("method", "path", "expected", "unread"),
    [
        ("GET", "/healthz", 200, True),
        ("POST", "/in/{source}?token=wrong", 401, True),
        ("POST", "/no/such/route", 404, True),
        # the 0.9 MB are read (under the cap on the wire), and inflated only to the cap
        ("POST", "/in/{source}?token={secret}", 413, False),
    ],
    ids=["healthz", "ingest-401", "unknown-route-404", "ingest-inflates-past-the-cap-413"],
)
async def test_a_gzip_bomb_is_answered_at_once_and_costs_little_cpu(
    gateway: GatewayProcess,
    http: aiohttp.ClientSession,
    bomb: bytes,
    method: str,
    path: str,
    expected: int,
    unread: bool,
) -> None:
    # Given a gateway that is up, and a token source
    source = await make_token_source(http)
    target = path.format(source=source["id"], secret=source["secret"])
    assert gateway.proc is not None
    before = cpu_seconds(gateway.proc.pid)

    # When a client sends 0.9 MB of gzip that inflates to 900 MiB
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n"
    )
    status, closed = await send_body(gateway.port, head, bomb)

    # Then it gets its answer, the gateway spent almost no CPU on it, and the
    # connection ends if the rest of the body was not read
    assert status == expected
    await asyncio.sleep(0.5)  # whatever the gateway still does with the bytes it received
    spent = cpu_seconds(gateway.proc.pid) - before
    print(f"the gateway spent {spent:.3f} s of CPU")
    assert spent < CPU_BOUND_S, f"the gateway spent {spent:.2f} s of CPU on one request"
    assert closed == unread

    # and it still serves, on a fresh connection and on a kept-alive one
    for _ in range(2):
        async with http.get("/healthz") as resp:
            assert resp.status == 200


async def test_a_legit_gzip_ingest_body_is_accepted_and_the_connection_kept(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    source = await make_token_source(http)
    body = gzip.compress(b'{"uuid": "gz-1", "objectType": "Bill", "action": "paid"}')
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        for _ in range(2):  # the second request on the same connection: it was kept alive
            writer.write(
                (
                    f"POST /in/{source['id']}?token={source['secret']} HTTP/1.1\r\n"
                    "Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
            async with asyncio.timeout(10):
                status, headers, _ = parse(await reader.readuntil(b"\r\n\r\n"))
                await reader.readexactly(int(headers["content-length"]))
            assert status == 202
    finally:
        writer.close()


async def test_a_management_body_that_inflates_past_the_cap_is_413(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    source = await make_token_source(http)
    del source
    async with http.post("/v1/tenants", json={"name": "B"}, headers=OPERATOR) as resp:
        key = (await resp.json())["api_key"]
    # valid JSON that inflates to 2 MiB (the cap is 1 MiB), 2 KB on the wire
    body = gzip.compress(b'{"name": "' + b"x" * (2 << 20) + b'"}')
    head = (
        f"POST /v1/sources HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    status, _ = await send_body(gateway.port, head, body)
    assert status == 413


async def test_a_client_that_left_with_its_body_unread_frees_its_place_at_once(
    database_url: str, clean_redis: str, tmp_path: Path
) -> None:
    # Given `relay serve` with a cap of 5 connections, and twice as many clients, one
    # after the other, that each send a body the route does not read (a gzip bomb on
    # /healthz, say), read their answer and leave a moment later
    env = stack_env(database_url, clean_redis, RELAY_MAX_CONNECTIONS="5")
    gateway = GatewayProcess(env, tmp_path / "gw.log").start()
    try:
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(
                b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n" + b"x" * 1000
            )
            async with asyncio.timeout(10):
                status, headers, _ = parse(await reader.readuntil(b"\r\n\r\n"))
                await reader.readexactly(int(headers["content-length"]))
            assert status == 200
            await asyncio.sleep(0.05)  # the gateway discards the rest of the body meanwhile
            writer.close()
            await writer.wait_closed()

        # When a new client comes right after
        await asyncio.sleep(0.1)
        status, _ = await send_body(gateway.port, "GET /healthz HTTP/1.1\r\nHost: x\r\n", b"")

        # Then it is served: a client that left holds no place (before, each held one
        # for the 2 s the gateway went on waiting for the rest of its body, and a
        # noisy client's gzip bombs got a quiet tenant's requests 503)
        assert status == 200
    finally:
        gateway.stop()
        print(gateway.log()[-3000:])


async def _send_all_then_read(port: int, data: bytes) -> int:
    """Write ``data`` whole on a fresh connection, as a flooding client does, then read
    the answer's status (or 0 if the connection was cut first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            async with asyncio.timeout(10):
                status, _, _ = parse(await reader.readuntil(b"\r\n\r\n"))
                return status
        except (ConnectionError, asyncio.IncompleteReadError):
            return 0
    finally:
        writer.close()


async def test_gzip_bombs_cost_no_more_than_the_same_bytes_uncompressed(
    gateway: GatewayProcess, bomb: bytes
) -> None:
    # Given a gateway, and a client that sends requests as a flood does: the head and
    # the whole body at once, on four connections at a time, to a route that reads no
    # body (400 of them)
    assert gateway.proc is not None
    pid = gateway.proc.pid

    async def flood(encoding: str) -> float:
        head = (
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{encoding}Content-Length: {len(bomb)}\r\n\r\n"
        ).encode()
        before = cpu_seconds(pid)
        for _ in range(100):
            statuses = await asyncio.gather(
                *(_send_all_then_read(gateway.port, head + bomb) for _ in range(4))
            )
            assert set(statuses) <= {200, 0}, statuses
        await asyncio.sleep(0.5)  # whatever the gateway still does with the bytes received
        return cpu_seconds(pid) - before

    # When the bodies are the same bytes, once as gzip bombs (900 MiB each inflated)
    # and once as plain bodies
    plain = await flood("")
    bombs = await flood("Content-Encoding: gzip\r\n")
    print(f"gateway CPU for 400 requests: plain {plain:.2f} s, gzip bombs {bombs:.2f} s")

    # Then the bombs cost the gateway what receiving the bytes costs, and nothing is
    # inflated before the route asks for a body (which /healthz never does): before,
    # aiohttp inflated each body's first chunks as they arrived, while the handler ran
    assert bombs < plain * 1.25 + 0.05, (plain, bombs)
