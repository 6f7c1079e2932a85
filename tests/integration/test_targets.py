"""Tenant API: targets."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relay.core.config import Settings
from relay.web.app import create_app
from tests.conftest import Tenant, assert_error


async def _source(client: Any, tenant: Tenant) -> str:
    body = await (
        await client.post(
            "/v1/sources", json={"name": "s", "auth": {"type": "token"}}, headers=tenant.auth
        )
    ).json()
    source_id: str = body["id"]
    return source_id


async def test_create_target_with_everything(client: Any, tenant: Tenant) -> None:
    source_id = await _source(client, tenant)
    payload = {
        "url": "https://hooks.example.com/softledger",
        "description": "AP sync",
        "filter": {"objectType": ["Bill", "Payment"], "action": ["paid"]},
        "source_ids": [source_id],
        "headers": {"X-Api-Key": "abc"},
        "rate_limit": 10,
        "enabled": True,
    }
    resp = await client.post("/v1/targets", json=payload, headers=tenant.auth)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["id"].startswith("tgt_")
    assert body["secret"].startswith("whsec_")
    assert len(base64.b64decode(body["secret"].removeprefix("whsec_"))) == 32
    for key in ("url", "description", "filter", "source_ids", "rate_limit", "enabled"):
        assert body[key] == payload[key], key
    assert body["headers"] == {"X-Api-Key": "••••"}  # values are credentials: masked
    assert body["disabled_reason"] is None
    got = await (await client.get(f"/v1/targets/{body['id']}", headers=tenant.auth)).json()
    assert "secret" not in got
    assert got == {k: v for k, v in body.items() if k != "secret"}
    listed = await (await client.get("/v1/targets", headers=tenant.auth)).json()
    assert listed["data"] == [got]
    clear = await (
        await client.get(f"/v1/targets/{body['id']}/headers", headers=tenant.auth)
    ).json()
    assert clear == {"headers": {"X-Api-Key": "abc"}}
    secret = await (
        await client.get(f"/v1/targets/{body['id']}/secret", headers=tenant.auth)
    ).json()
    assert secret == {"secret": body["secret"]}


async def test_minimal_target_defaults(client: Any, tenant: Tenant) -> None:
    body = await (
        await client.post("/v1/targets", json={"url": "http://127.0.0.1:9/x"}, headers=tenant.auth)
    ).json()
    assert body["filter"] == {"objectType": [], "action": []}
    assert body["source_ids"] is None and body["headers"] == {} and body["enabled"] is True


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "url"),
        ({"url": "ftp://x.example/"}, "url"),
        ({"url": "/relative"}, "url"),
        ({"url": "http://"}, "url"),
        ({"url": "https://x.example/" + "a" * 2048}, "url"),
        ({"url": 5}, "url"),
        ({"url": "https://x.example", "filter": {"objectType": "Bill"}}, "filter.objectType"),
        ({"url": "https://x.example", "filter": {"objectType": [1]}}, "filter.objectType.0"),
        ({"url": "https://x.example", "filter": {"status": ["x"]}}, "filter.status"),
        ({"url": "https://x.example", "headers": {"Content-Type": "text/plain"}}, "headers"),
        ({"url": "https://x.example", "headers": {"webhook-id": "x"}}, "headers"),
        ({"url": "https://x.example", "headers": {"Connection": "close"}}, "headers"),
        ({"url": "https://x.example", "headers": {"Transfer-Encoding": "chunked"}}, "headers"),
        ({"url": "https://x.example", "headers": {"X-A": "a\r\nb"}}, "headers"),
        ({"url": "https://x.example", "headers": {"bad name": "a"}}, "headers"),
        ({"url": "https://x.example", "headers": {"X-A": 1}}, "headers.X-A"),
        ({"url": "https://x.example", "rate_limit": -1}, "rate_limit"),
        ({"url": "https://x.example", "rate_limit": 1.5}, "rate_limit"),
        ({"url": "https://x.example", "enabled": "yes"}, "enabled"),
        ({"url": "https://x.example", "source_ids": ["src_unknown"]}, "source_ids"),
        ({"url": "https://x.example", "source_ids": "src_x"}, "source_ids"),
    ],
)
async def test_create_target_validation(
    client: Any, tenant: Tenant, payload: dict[str, Any], field: str
) -> None:
    error = await assert_error(
        await client.post("/v1/targets", json=payload, headers=tenant.auth), 422, "validation_error"
    )
    assert field in [d["field"] for d in error["details"]], error
    assert (await (await client.get("/v1/targets", headers=tenant.auth)).json())["data"] == []


async def test_source_ids_must_be_the_tenants_own(
    client: Any, tenant: Tenant, other_tenant: Tenant
) -> None:
    foreign = await _source(client, other_tenant)
    error = await assert_error(
        await client.post(
            "/v1/targets",
            json={"url": "https://x.example", "source_ids": [foreign]},
            headers=tenant.auth,
        ),
        422,
        "validation_error",
    )
    assert error["details"][0]["field"] == "source_ids"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/x",
        "http://localhost/x",
        "http://10.1.2.3/",
        "http://192.168.0.10/",
        "http://172.16.5.4/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
        "http://[fe80::1]/",
        "http://0.0.0.0/",
        "http://[::ffff:127.0.0.1]/",
        "http://127.0.0.1.:8080/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://0x7f.1/",
        "http://[2002:7f00:1::]/",
        "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
        "http://[64:ff9b::7f00:1]/",
        "http://" + "a" * 64 + ".example/",
        "http://a..b/",
    ],
)
async def test_private_targets_refused_unless_allowed(
    aiohttp_client: Any, settings: Settings, url: str
) -> None:
    strict: TestClient[Any, Any] = await aiohttp_client(
        create_app(settings.with_overrides(allow_private_targets=False))
    )
    from tests.conftest import make_tenant

    tenant = await make_tenant(strict)
    error = await assert_error(
        await strict.post("/v1/targets", json={"url": url}, headers=tenant.auth),
        422,
        "validation_error",
    )
    assert error["details"][0]["field"] == "url"
    # A public address is fine, and so is a name that does not resolve (re-checked at connect time).
    for ok in ("https://93.184.215.14/hook", "https://hooks.invalid/x"):
        resp = await strict.post("/v1/targets", json={"url": ok}, headers=tenant.auth)
        assert resp.status == 201, await resp.text()
    # A PATCH to a private address is refused too.
    target = await (await strict.get("/v1/targets", headers=tenant.auth)).json()
    resp = await strict.patch(
        f"/v1/targets/{target['data'][0]['id']}", json={"url": url}, headers=tenant.auth
    )
    await assert_error(resp, 422, "validation_error")


async def test_patch_target(client: Any, tenant: Tenant) -> None:
    source_id = await _source(client, tenant)
    created = await (
        await client.post(
            "/v1/targets",
            json={"url": "https://a.example/", "description": "d", "rate_limit": 3},
            headers=tenant.auth,
        )
    ).json()
    url = f"/v1/targets/{created['id']}"
    body = await (
        await client.patch(
            url,
            json={
                "url": "https://b.example/",
                "filter": {"action": ["Created"]},
                "source_ids": [source_id],
                "description": None,
                "headers": {"X-Env": "prod"},
            },
            headers=tenant.auth,
        )
    ).json()
    assert body["url"] == "https://b.example/"
    assert body["filter"] == {"objectType": [], "action": ["Created"]}
    assert body["source_ids"] == [source_id]
    assert body["description"] is None and body["rate_limit"] == 3
    assert body["headers"] == {"X-Env": "••••"}
    clear = await (await client.get(f"{url}/headers", headers=tenant.auth)).json()
    assert clear == {"headers": {"X-Env": "prod"}}
    body = await (await client.patch(url, json={"headers": {}}, headers=tenant.auth)).json()
    assert body["headers"] == {}
    assert await (await client.get(f"{url}/headers", headers=tenant.auth)).json() == {"headers": {}}
    body = await (await client.patch(url, json={"enabled": False}, headers=tenant.auth)).json()
    assert body["enabled"] is False and body["disabled_reason"]
    body = await (
        await client.patch(url, json={"enabled": True, "source_ids": None}, headers=tenant.auth)
    ).json()
    assert (
        body["enabled"] is True and body["disabled_reason"] is None and body["source_ids"] is None
    )
    for bad in ({"url": None}, {"enabled": None}, {"url": "nope"}, {"secret": "x"}):
        await assert_error(
            await client.patch(url, json=bad, headers=tenant.auth), 422, "validation_error"
        )
    assert (await (await client.get(url, headers=tenant.auth)).json())[
        "url"
    ] == "https://b.example/"


async def test_rotate_secret_and_delete_target(client: Any, tenant: Tenant) -> None:
    created = await (
        await client.post("/v1/targets", json={"url": "https://a.example/"}, headers=tenant.auth)
    ).json()
    url = f"/v1/targets/{created['id']}"
    resp = await client.post(f"{url}/rotate-secret", headers=tenant.auth)
    assert resp.status == 200
    rotated = await resp.json()
    assert set(rotated) == {"secret"} and rotated["secret"] != created["secret"]
    assert await (await client.get(f"{url}/secret", headers=tenant.auth)).json() == rotated
    assert (await client.delete(url, headers=tenant.auth)).status == 204
    for method, path in (
        ("GET", url),
        ("PATCH", url),
        ("DELETE", url),
        ("GET", f"{url}/secret"),
        ("GET", f"{url}/headers"),
        ("POST", f"{url}/rotate-secret"),
    ):
        resp = await client.request(
            method, path, json={} if method == "PATCH" else None, headers=tenant.auth
        )
        await assert_error(resp, 404, "not_found")
    assert (await (await client.get("/v1/targets", headers=tenant.auth)).json())["data"] == []


BAD_HEADER_VALUES = [
    "a\u000bb",  # vertical tab: aiohttp refuses to send it
    "a\u0001b",
    "a\u007fb",
    "a\u00a0b",
    "é",
    "a\u2028b",
]


@pytest.mark.parametrize("value", BAD_HEADER_VALUES)
async def test_header_values_must_be_visible_ascii(client: Any, tenant: Tenant, value: str) -> None:
    payload = {"url": "https://x.example", "headers": {"X-Ok": "fine", "X-Bad": value}}
    error = await assert_error(
        await client.post("/v1/targets", json=payload, headers=tenant.auth),
        422,
        "validation_error",
    )
    assert "X-Bad" in error["message"] and value not in error["message"]
    assert (await (await client.get("/v1/targets", headers=tenant.auth)).json())["data"] == []
    created = await (
        await client.post("/v1/targets", json={"url": "https://x.example"}, headers=tenant.auth)
    ).json()
    url = f"/v1/targets/{created['id']}"
    error = await assert_error(
        await client.patch(url, json={"headers": {"X-Bad": value}}, headers=tenant.auth),
        422,
        "validation_error",
    )
    assert "X-Bad" in error["message"]
    assert (await (await client.get(url, headers=tenant.auth)).json())["headers"] == {}
    await client.delete(url, headers=tenant.auth)


@pytest.mark.parametrize("name", ["X-A\n", "X-A\u000b", "X A", "X:A", "X-\u00e9", ""])
async def test_header_names_must_be_tokens(client: Any, tenant: Tenant, name: str) -> None:
    payload = {"url": "https://x.example", "headers": {name: "v"}}
    error = await assert_error(
        await client.post("/v1/targets", json=payload, headers=tenant.auth),
        422,
        "validation_error",
    )
    assert "headers" in [d["field"] for d in error["details"]]


async def test_header_values_may_hold_spaces_and_tabs(client: Any, tenant: Tenant) -> None:
    headers = {"Authorization": "Bearer a.b-c~d", "X-List": "a,\tb; q=1", "X-Empty": ""}
    resp = await client.post(
        "/v1/targets", json={"url": "https://x.example", "headers": headers}, headers=tenant.auth
    )
    assert resp.status == 201, await resp.text()
