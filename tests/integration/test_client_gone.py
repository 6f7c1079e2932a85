"""A caller that hangs up mid-request is not a dependency going down.

aiohttp fails the body's read with ConnectionResetError once the caller's
connection is lost. The error middleware took every OSError for Postgres's
(POSTGRES_DOWN): each caller hanging up logged "dependency unavailable" at
WARNING, the line an operator alerts on (seen by bench/history.py at the end of
every wrk run: 14 warnings, with Postgres and Redis up).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import OPERATOR, Tenant, stack_env
from tests.integration.test_ingest import make_source
from tests.services import GatewayProcess


async def send_and_reset(port: int, source: dict[str, Any], uuid: str) -> None:
    """POST a whole one-event request to ``source``, then reset the connection at once."""
    body = f'{{"uuid": "{uuid}", "objectType": "Bill", "action": "paid"}}'.encode()
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /in/{source['id']}?token={source['secret']} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    await asyncio.sleep(0)  # the gateway reads the head and starts the handler
    # hung up with a reset (SO_LINGER 0), as a socket closed with answers unread is
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_a_caller_hanging_up_mid_body_is_not_logged_as_a_dependency_down(
    client: Any, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    source = await make_source(client, tenant)
    caplog.set_level(logging.DEBUG)
    body = b'{"uuid": "gone-1", "objectType": "Bill", "action": "paid", "pad": "' + b"x" * 5000
    # Given a request whose head promises 10,000 bytes of body, of which 100 are sent
    _reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    head = (
        f"POST /in/{source['id']}?token={source['secret']} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nContent-Length: 10000\r\n\r\n"
    )
    writer.write(head.encode() + body[:100])
    await writer.drain()
    await asyncio.sleep(0.3)  # the handler waits in the body's read
    # When the caller hangs up
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.5)
    # Then nothing says a dependency is down, nothing is logged at WARNING or above
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], loud
    assert "dependency unavailable" not in caplog.text
    statuses = [getattr(r, "status", None) for r in caplog.records if r.getMessage() == "ingest"]
    assert statuses == [499], statuses
    # And what the caller never finished sending is not stored, and the next caller is served
    events = await client.get("/v1/events", headers=tenant.auth)
    assert (await events.json())["data"] == []
    answer = await client.post(
        f"/in/{source['id']}?token={source['secret']}",
        json={"uuid": "gone-2", "objectType": "Bill", "action": "paid"},
    )
    assert answer.status == 202, await answer.text()


async def test_callers_hanging_up_after_their_whole_request_are_not_a_dependency_down(
    client: Any, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    source = await make_source(client, tenant)
    # (a budget: the gateway awaits Redis before it reads the body, as a loaded
    # gateway's handler awaits its turn: the hang-up is seen before the read)
    patched = await client.patch(
        f"/v1/tenants/{tenant.id}",
        json={"limits": {"ingest_bytes_per_s": 10_000_000}},
        headers=OPERATOR,
    )
    assert patched.status == 200, await patched.text()
    caplog.set_level(logging.DEBUG)
    # Given callers that send a whole request and hang up at once, before its answer
    # (as wrk does at the end of a run, with 64 requests in flight)
    for n in range(20):
        await send_and_reset(client.server.port, source, f"whole-{n}")
    await asyncio.sleep(1.0)
    # Then nothing says a dependency is down, nothing is logged at WARNING or above
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], loud
    # And no request is logged or counted as a 500 (a caller that hung up is a 499)
    statuses = [getattr(r, "status", None) for r in caplog.records if r.getMessage() == "ingest"]
    assert statuses and 500 not in statuses, statuses
    assert set(statuses) <= {202, 499}, statuses
    # And the gateway goes on serving
    answer = await client.post(
        f"/in/{source['id']}?token={source['secret']}",
        json={"uuid": "after", "objectType": "Bill", "action": "paid"},
    )
    assert answer.status == 202, await answer.text()


@pytest.mark.slow
async def test_callers_hanging_up_on_relay_serve_leave_no_warning_and_no_500(
    database_url: str, clean_redis: str, tmp_path: Path, fresh_http: aiohttp.ClientSession
) -> None:
    # Given `relay serve` itself (aiohttp's handlers not cancelled when a caller goes:
    # the body's read fails instead), a tenant with a budget and a token source
    env = stack_env(database_url, clean_redis, RELAY_LOG_LEVEL="INFO")
    gateway = GatewayProcess(env, tmp_path / "gateway.log", processes=1).start()
    try:
        async with fresh_http.post(
            gateway.url + "/v1/tenants", json={"name": "gone"}, headers=OPERATOR
        ) as resp:
            tenant = await resp.json()
        async with fresh_http.patch(
            f"{gateway.url}/v1/tenants/{tenant['id']}",
            json={"limits": {"ingest_bytes_per_s": 10_000_000}},
            headers=OPERATOR,
        ) as resp:
            assert resp.status == 200, await resp.text()
        async with fresh_http.post(
            gateway.url + "/v1/sources",
            json={"name": "s", "auth": {"type": "token"}},
            headers={"Authorization": f"Bearer {tenant['api_key']}"},
        ) as resp:
            source = await resp.json()
        # When 20 callers send a whole request each and reset the connection at once
        for n in range(20):
            await send_and_reset(gateway.port, source, f"serve-{n}")
        await asyncio.sleep(1.5)
        log = gateway.log()
    finally:
        gateway.stop()
    # Then the gateway's log says no dependency is down, and no request was a 500
    assert "dependency unavailable" not in log, log[-3000:]
    statuses = [
        json.loads(line).get("status")
        for line in log.splitlines()
        if line.startswith("{") and '"msg": "ingest"' in line
    ]
    assert len(statuses) == 20, log[-3000:]
    assert 500 not in statuses, statuses
