"""Bad bytes, slow clients and too many connections: answered in API.md's shape, never logged.

Raw sockets against a real gateway (the server `relay serve` runs, on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from relay.core.config import Settings
from relay.web.app import create_app
from relay.web.server import GatewayRequestHandler
from tests.conftest import ADMIN_TOKEN, GatewayTestServer, Tenant, make_tenant, stack_env
from tests.integration.test_ingest import make_source
from tests.stack import eventually


async def exchange(port: int, data: bytes, *, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body of one HTTP/1.x answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def assert_error_shape(raw: bytes, status: int, code: str) -> dict[str, Any]:
    got, headers, body = parse(raw)
    assert got == status, raw[:500]
    assert headers["content-type"].startswith("application/json"), raw[:500]
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["code"] == code and error["message"], error
    return error


def request(path: str, headers: dict[str, str], body: bytes = b"", method: str = "POST") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


# -- 3. a body aiohttp cannot decode is the client's fault ---------------------------------


@pytest.mark.parametrize(
    "auth",
    [{"type": "hmac", "header": "X-Signature"}, {"type": "standard-webhooks"}],
    ids=["hmac", "standard-webhooks"],
)
async def test_undecodable_gzip_body_on_a_signed_source_is_400(
    client: Any, tenant: Tenant, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    source = await make_source(client, tenant, auth=auth)
    caplog.set_level(logging.DEBUG)
    resp = await client.post(
        f"/in/{source['id']}",
        data=b'{"not": "gzip"}',
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert resp.status == 400, await resp.text()
    body = await resp.json()
    assert body["error"]["code"] == "invalid_request"
    assert "Traceback" not in await resp.text()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]


async def test_undecodable_gzip_body_on_the_management_api_is_400(
    client: Any, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    resp = await client.post(
        "/v1/sources",
        data=b'{"name": "x"}',
        headers={**tenant.auth, "Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]["code"] == "invalid_request"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


# -- 4. aiohttp's own 400s: API.md's shape, no request bytes anywhere -----------------------


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Content-Length": "-1"}, b""),
        ({"Content-Length": "3", "Transfer-Encoding": "chunked"}, b"abc"),
        (
            {
                "Content-Length": "3",
                "Content-Encoding": "br",
                "Content-Type": "application/json",
                "Connection": "close",  # refused by the route, which read the body whole
            },
            b"abc",
        ),
    ],
    ids=["negative-length", "length-and-chunked", "brotli"],
)
async def test_low_level_bad_requests_are_answered_in_the_error_shape(
    client: Any, tenant: Tenant, headers: dict[str, str], body: bytes
) -> None:
    source = await make_source(client, tenant)
    raw = await exchange(
        client.server.port, request(f"/in/{source['id']}?token={source['secret']}", headers, body)
    )
    error = assert_error_shape(raw, 400, "invalid_request")
    assert source["secret"] not in json.dumps(error)
    assert b"install" not in raw


def _oversized(path: str, secret: str) -> list[tuple[int, bytes]]:
    """An over-long request line and an over-long header, both carrying ``secret``."""
    return [
        (431, request(f"{path}?token={secret}&pad={'a' * 9000}", {"Content-Length": "0"})),
        (
            431,
            request(
                f"{path}", {"Authorization": f"Bearer {secret}{'a' * 9000}", "Content-Length": "0"}
            ),
        ),
        (431, request(f"{path}?token={secret}", {f"X-Pad-{i}": "y" for i in range(200)})),
    ]


async def test_a_token_in_an_oversized_request_is_never_logged_nor_echoed(
    client: Any, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    source = await make_source(client, tenant)
    secret = source["secret"]
    caplog.set_level(logging.DEBUG)
    for status, data in _oversized(f"/in/{source['id']}", secret):
        raw = await exchange(client.server.port, data)
        assert_error_shape(raw, status, "invalid_request")
        assert secret.encode() not in raw
    lines = [caplog.text, *(r.getMessage() for r in caplog.records)]
    lines += [str(r.args) + str(r.exc_info) + str(r.__dict__) for r in caplog.records]
    assert not [line for line in lines if secret in line]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_relay_serve_logs_no_token_from_an_oversized_request(
    database_url: str, clean_redis: str, tmp_path: Any
) -> None:
    import aiohttp

    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        **stack_env(database_url, clean_redis, RELAY_LOG_LEVEL="DEBUG"),
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

            async def up() -> bool:
                try:
                    async with session.get("/healthz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(up, timeout=30)
            async with session.post(
                "/v1/tenants",
                json={"name": "T"},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as resp:
                created = await resp.json()
            tenant = Tenant(created["id"], created["api_key"], created["api_key_id"])
            source = await make_source(session, tenant)
        secret = source["secret"]
        for status, data in _oversized(f"/in/{source['id']}", secret):
            raw = await exchange(port, data)
            assert_error_shape(raw, status, "invalid_request")
            assert secret.encode() not in raw
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log_path.read_text()
    assert text.strip(), "the gateway logged nothing at DEBUG"
    assert secret not in text
    assert "Traceback" not in text


# -- 7. slow clients are cut; connections are capped ----------------------------------------


async def _gateway(aiohttp_client: Any, settings: Settings, **overrides: Any) -> Any:
    return await aiohttp_client(GatewayTestServer(create_app(settings.with_overrides(**overrides))))


async def test_a_client_trickling_its_headers_is_cut_off(
    aiohttp_client: Any, settings: Settings
) -> None:
    client = await _gateway(aiohttp_client, settings, header_timeout_s=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    started = time.monotonic()
    closed = False
    try:
        for i in range(100):  # one header line every 50 ms (under the 128 allowed): no end
            writer.write(f"X-Slow-{i}: y\r\n".encode())
            await writer.drain()
            try:
                async with asyncio.timeout(0.05):
                    if await reader.read() == b"" or reader.at_eof():
                        closed = True
                        break
            except TimeoutError:
                continue
    except ConnectionError:
        closed = True
    finally:
        writer.close()
    assert closed, "the gateway kept a connection whose head never ended"
    assert time.monotonic() - started < 4


async def test_a_failing_head_deadline_still_closes_the_connection_and_is_reported(
    aiohttp_client: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a gateway whose head deadline fails when it fires (as when an aiohttp
    # internal it relied on was renamed: an AttributeError in a timer callback)
    def gone(self: Any) -> None:
        raise AttributeError("'GatewayRequestHandler' object has no attribute '_renamed'")

    monkeypatch.setattr(GatewayRequestHandler, "force_close", gone)
    client = await _gateway(aiohttp_client, settings, header_timeout_s=0.5)
    before = _metric(
        await (await client.get("/metrics")).text(), "relay_head_deadline_errors_total"
    )

    # When a client sends half a request head and nothing more
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        async with asyncio.timeout(10):
            closed = await reader.read() == b""
    except TimeoutError:
        closed = False
    finally:
        writer.close()

    # Then the connection is closed all the same, and the failure is counted and logged
    assert closed, "a failing head deadline left the connection open"
    after = _metric(await (await client.get("/metrics")).text(), "relay_head_deadline_errors_total")
    assert after == before + 1
    assert any(
        r.name == "relay.web.server" and r.levelno == logging.ERROR for r in caplog.records
    ), caplog.text


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_a_stalled_body_is_answered_408(aiohttp_client: Any, settings: Settings) -> None:
    client = await _gateway(aiohttp_client, settings, body_timeout_s=0.5)
    tenant = await make_tenant(client)
    data = request(
        "/v1/sources",
        {**tenant.auth, "Content-Type": "application/json", "Content-Length": "100"},
        b'{"name": ',
    )
    raw = await exchange(client.server.port, data, timeout=10)
    assert_error_shape(raw, 408, "request_timeout")


async def test_connections_over_the_cap_are_refused_and_a_request_works_after(
    aiohttp_client: Any, settings: Settings
) -> None:
    client = await _gateway(aiohttp_client, settings, max_connections=3)
    port = client.server.port
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    try:
        # the cap is reached only once the server has accepted the three
        async def refused() -> bytes | None:
            raw = await exchange(port, request("/healthz", {}, method="GET"), timeout=5)
            return raw if raw.startswith(b"HTTP/1.1 503") else None

        raw = await eventually(refused, timeout=10)
        assert_error_shape(raw, 503, "unavailable")
    finally:
        for _, writer in held:
            writer.close()

    async def served() -> bool:
        return (await client.get("/healthz")).status == 200

    await eventually(served, timeout=10)


# -- 8. /metrics names no tenant's resources; worker metrics listen where configured --------


async def test_public_metrics_name_no_tenant_or_source(client: Any, tenant: Tenant) -> None:
    source = await make_source(client, tenant)
    resp = await client.post(f"/in/{source['id']}?token={source['secret']}", json={"uuid": "m-1"})
    assert resp.status == 202
    await client.post(f"/in/{source['id']}?token=wrong", json={})
    text = await (await client.get("/metrics")).text()
    assert "relay_events_ingested_total" in text
    assert source["id"] not in text
    assert tenant.id not in text


async def test_worker_metrics_listen_only_where_configured(
    database_url: str, clean_redis: str, tmp_path: Any
) -> None:
    import aiohttp

    from tests.stack import WorkerProcess

    port = _free_port()
    worker = WorkerProcess(
        stack_env(
            database_url,
            clean_redis,
            RELAY_WORKER_METRICS_PORT=str(port),
            RELAY_WORKER_METRICS_HOST="127.0.0.2",
        ),
        tmp_path / "w.log",
    ).start()

    async def answers(host: str) -> bool:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://{host}:{port}/metrics") as resp,
            ):
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await eventually(lambda: answers("127.0.0.2"), timeout=30)
        assert not await answers("127.0.0.1")
    finally:
        worker.stop()
