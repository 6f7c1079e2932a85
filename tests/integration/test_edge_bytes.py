"""Bytes that are not UTF-8 in headers, queries and forms: a clean 400, never a 500.

aiohttp hands header values over with undecodable bytes as lone surrogates; a
credential compared or hashed as UTF-8 then raised in the middle of a handler.
Raw sockets, because aiohttp's client refuses to send such bytes.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.conftest import ADMIN_TOKEN, Tenant, assert_error
from tests.integration.test_ingest import make_source
from tests.integration.test_protocol_hardening import exchange, parse

BAD = b"\xff"


def raw_request(
    method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> bytes:
    head = method.encode() + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    head += b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n"
    return head + b"\r\n" + body


def assert_refused(raw: bytes, caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """A 400 in API.md's shape, the byte not echoed, nothing logged at ERROR."""
    import json

    status, headers, body = parse(raw)
    assert status == 400, raw[:500]
    assert headers["content-type"].startswith("application/json"), raw[:500]
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["code"] == "invalid_request", error
    assert error["message"]
    assert BAD not in raw and "\udcff" not in body.decode("utf-8", "surrogateescape")
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]
    assert "\udcff" not in caplog.text and "Traceback" not in caplog.text
    return error


JSON = (b"Content-Type", b"application/json")


async def test_a_non_utf8_bearer_is_400_on_operator_and_tenant_routes(
    client: Any, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for method, path in [
        ("GET", b"/v1/tenants"),
        ("GET", b"/v1/admin/stats"),
        ("GET", b"/v1/targets"),
        ("GET", b"/v1/events"),
    ]:
        for value in (b"Bearer " + BAD, b"Bearer rly_" + BAD * 8, BAD + b" x"):
            raw = await exchange(
                client.server.port, raw_request(method, path, [(b"Authorization", value)])
            )
            assert "Authorization" in assert_refused(raw, caplog)["message"], (path, value)


@pytest.mark.parametrize(
    ("auth", "headers"),
    [
        ({"type": "token"}, [(b"Authorization", b"Bearer " + BAD)]),
        ({"type": "basic", "username": "u"}, [(b"Authorization", b"Basic " + BAD)]),
        ({"type": "hmac"}, [(b"X-Signature", BAD * 32)]),
        ({"type": "hmac", "header": "X-Hub-Signature"}, [(b"X-Hub-Signature", b"sha=" + BAD)]),
        (
            {"type": "hmac", "timestamp_header": "X-Stamp"},
            [(b"X-Signature", b"00"), (b"X-Stamp", b"1" + BAD)],
        ),
        (
            {"type": "standard-webhooks"},
            [
                (b"webhook-id", b"msg_" + BAD),
                (b"webhook-timestamp", b"1700000000"),
                (b"webhook-signature", b"v1," + BAD),
            ],
        ),
    ],
    ids=["token-bearer", "basic", "hmac", "hmac-own-header", "hmac-timestamp", "standard-webhooks"],
)
async def test_a_non_utf8_credential_header_on_ingest_is_refused_without_a_trace(
    client: Any,
    tenant: Tenant,
    caplog: pytest.LogCaptureFixture,
    auth: dict[str, str],
    headers: list[tuple[bytes, bytes]],
) -> None:
    source = await make_source(client, tenant, auth=auth)
    caplog.set_level(logging.DEBUG)
    path = f"/in/{source['id']}".encode()
    raw = await exchange(
        client.server.port, raw_request("POST", path, [JSON, *headers], b'{"uuid": "u1"}')
    )
    assert_refused(raw, caplog)
    events = await client.get("/v1/events", headers=tenant.auth)
    assert (await events.json())["data"] == []


async def test_non_utf8_bytes_in_any_other_header_or_the_query_are_400(
    client: Any, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    source = await make_source(client, tenant)
    caplog.set_level(logging.DEBUG)
    port = client.server.port
    ingest = f"/in/{source['id']}?token={source['secret']}".encode()
    cases = [
        raw_request("POST", ingest, [JSON, (b"X-Upstream", BAD)], b"{}"),
        raw_request("POST", ingest, [(b"Content-Type", b"application/json" + BAD)], b"{}"),
        raw_request("GET", b"/healthz", [(b"User-Agent", b"curl" + BAD)]),
        raw_request(
            "GET",
            b"/v1/targets",
            [(b"Authorization", f"Bearer {tenant.api_key}".encode()), (b"X-Request-Id", BAD)],
        ),
        raw_request("GET", b"/console/login", [(b"Cookie", b"relay_console=" + BAD)]),
        raw_request("GET", f"/in/{source['id']}?token=".encode() + BAD, []),
    ]
    for data in cases:
        raw = await exchange(port, data)
        assert_refused(raw, caplog)


async def test_percent_encoded_bytes_that_are_not_utf8_in_a_query_are_400(
    client: Any, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    source = await make_source(client, tenant)
    caplog.set_level(logging.DEBUG)
    resp = await client.post(f"/in/{source['id']}?token=%FF%FE", json={"uuid": "u"})
    assert (await assert_error(resp, 400, "invalid_request"))["message"]
    resp = await client.get("/v1/events?source_id=%FF", headers=tenant.auth)
    await assert_error(resp, 400, "invalid_request")
    for cursor in ("%00%ff", "%ED%A0%80"):  # an encoded lone surrogate is not UTF-8 either
        resp = await client.get(f"/v1/targets?cursor={cursor}", headers=tenant.auth)
        await assert_error(resp, 400, "invalid_request")
    # what is UTF-8 once decoded still reaches the route (a 422 naming the parameter)
    resp = await client.get("/v1/events?source_id=%C3%BF%00", headers=tenant.auth)
    await assert_error(resp, 422, "validation_error")
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]


async def test_a_non_utf8_sign_in_form_is_refused_without_a_trace(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.integration.test_console import csrf_of

    csrf = await csrf_of(client, "/console/login")
    caplog.set_level(logging.DEBUG)
    for body in (
        f"csrf_token={csrf}&token=%FF".encode(),
        f"csrf_token={csrf}&token=".encode() + BAD,
        f"csrf_token={csrf}&token={ADMIN_TOKEN}&next=%FF".encode(),
    ):
        resp = await client.post(
            "/console/login",
            data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            allow_redirects=False,
        )
        await assert_error(resp, 400, "invalid_request")
    boundary = "b0undary"
    multipart = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n{csrf}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="token"\r\n\r\n'
        ).encode()
        + BAD
        + f"\r\n--{boundary}--\r\n".encode()
    )
    resp = await client.post(
        "/console/login",
        data=multipart,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        allow_redirects=False,
    )
    await assert_error(resp, 400, "invalid_request")
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]
    # the same form in UTF-8 signs in, with a next= that is not ASCII
    resp = await client.post(
        "/console/login",
        data={"csrf_token": csrf, "token": ADMIN_TOKEN, "next": "/console/events?q=ÿ"},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()


async def test_the_openapi_document_says_every_operation_may_be_400(client: Any) -> None:
    doc = await (await client.get("/openapi.json")).json()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert "400" in operation["responses"], (method, path)
