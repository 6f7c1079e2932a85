"""Operator API: tenants and their API keys."""

from __future__ import annotations

from typing import Any

from tests.conftest import OPERATOR, Tenant, assert_error, make_tenant


async def test_create_tenant_returns_key_once(client: Any) -> None:
    # Given an operator, when a tenant is created
    resp = await client.post("/v1/tenants", json={"name": "  Acme Books "}, headers=OPERATOR)
    # Then the answer carries the key and the tenant with a trimmed name
    assert resp.status == 201
    body = await resp.json()
    assert set(body) == {"id", "name", "created_at", "api_key", "api_key_id"}
    assert body["id"].startswith("ten_") and body["api_key_id"].startswith("key_")
    assert body["name"] == "Acme Books"
    assert body["created_at"].endswith("Z")
    # And reading it back shows no key
    got = await (await client.get(f"/v1/tenants/{body['id']}", headers=OPERATOR)).json()
    assert got == {
        "id": body["id"],
        "name": "Acme Books",
        "created_at": body["created_at"],
        "limits": {
            "ingest_bytes_per_s": None,
            "deliveries_per_s": None,
            "api_requests_per_s": None,
        },
    }
    keys = await (await client.get(f"/v1/tenants/{body['id']}/api-keys", headers=OPERATOR)).json()
    assert keys == {
        "data": [
            {
                "id": body["api_key_id"],
                "created_at": keys["data"][0]["created_at"],
                "revoked_at": None,
            }
        ],
        "next_cursor": None,
    }
    # And the key works as a tenant credential
    assert (
        await client.get("/v1/sources", headers={"Authorization": f"Bearer {body['api_key']}"})
    ).status == 200


async def test_operator_routes_refuse_anything_but_the_admin_token(
    client: Any, tenant: Tenant
) -> None:
    for headers in (
        {},
        tenant.auth,
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic eDp5"},
    ):
        await assert_error(await client.get("/v1/tenants", headers=headers), 401, "unauthorized")
        await assert_error(
            await client.post("/v1/tenants", json={"name": "x"}, headers=headers),
            401,
            "unauthorized",
        )


async def test_create_tenant_validation(client: Any) -> None:
    for body in (
        {},
        {"name": ""},
        {"name": "   "},
        {"name": 5},
        {"name": "x" * 201},
        {"name": "ok", "extra": 1},
    ):
        error = await assert_error(
            await client.post("/v1/tenants", json=body, headers=OPERATOR), 422, "validation_error"
        )
        assert error["details"] and all("field" in d and "message" in d for d in error["details"])
    error = await assert_error(
        await client.post("/v1/tenants", json={"name": 5}, headers=OPERATOR),
        422,
        "validation_error",
    )
    assert error["details"][0]["field"] == "name"
    await assert_error(
        await client.post(
            "/v1/tenants", data=b"{nope", headers={**OPERATOR, "Content-Type": "application/json"}
        ),
        400,
        "invalid_json",
    )
    await assert_error(
        await client.post(
            "/v1/tenants", data=b"name=x", headers={**OPERATOR, "Content-Type": "text/plain"}
        ),
        415,
        "unsupported_media_type",
    )
    await assert_error(
        await client.post("/v1/tenants", json=["x"], headers=OPERATOR), 400, "invalid_request"
    )


async def test_unknown_tenant_is_404(client: Any) -> None:
    await assert_error(await client.get("/v1/tenants/ten_nope", headers=OPERATOR), 404, "not_found")
    await assert_error(
        await client.post("/v1/tenants/ten_nope/api-keys", headers=OPERATOR), 404, "not_found"
    )
    await assert_error(
        await client.get("/v1/tenants/ten_nope/api-keys", headers=OPERATOR), 404, "not_found"
    )
    await assert_error(
        await client.delete("/v1/tenants/ten_nope/api-keys/key_x", headers=OPERATOR),
        404,
        "not_found",
    )


async def test_revoked_key_fails_at_once_and_others_keep_working(
    client: Any, tenant: Tenant
) -> None:
    # Given a second key
    resp = await client.post(f"/v1/tenants/{tenant.id}/api-keys", headers=OPERATOR)
    assert resp.status == 201
    second = await resp.json()
    assert set(second) == {"id", "api_key", "created_at"}
    second_auth = {"Authorization": f"Bearer {second['api_key']}"}
    assert (await client.get("/v1/sources", headers=second_auth)).status == 200
    # When the first key is revoked
    resp = await client.delete(
        f"/v1/tenants/{tenant.id}/api-keys/{tenant.api_key_id}", headers=OPERATOR
    )
    assert resp.status == 204
    # Then it fails on the very next request, and the second key still works
    await assert_error(await client.get("/v1/sources", headers=tenant.auth), 401, "unauthorized")
    assert (await client.get("/v1/sources", headers=second_auth)).status == 200
    keys = await (await client.get(f"/v1/tenants/{tenant.id}/api-keys", headers=OPERATOR)).json()
    revoked = {k["id"]: k["revoked_at"] for k in keys["data"]}
    assert revoked[tenant.api_key_id] is not None and revoked[second["id"]] is None


async def test_another_tenants_key_cannot_be_revoked_through_the_wrong_tenant(
    client: Any, tenant: Tenant, other_tenant: Tenant
) -> None:
    resp = await client.delete(
        f"/v1/tenants/{other_tenant.id}/api-keys/{tenant.api_key_id}", headers=OPERATOR
    )
    await assert_error(resp, 404, "not_found")
    assert (await client.get("/v1/sources", headers=tenant.auth)).status == 200


async def test_tenant_list_paginates_newest_first(client: Any) -> None:
    created = [(await make_tenant(client, f"page-{i}")).id for i in range(7)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        url = "/v1/tenants?limit=3" + (f"&cursor={cursor}" if cursor else "")
        body = await (await client.get(url, headers=OPERATOR)).json()
        assert len(body["data"]) <= 3
        seen += [t["id"] for t in body["data"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages >= 3
    assert seen == sorted(seen, reverse=True)
    assert len(seen) == len(set(seen))
    assert [t for t in seen if t in created] == list(reversed(created))


async def test_limit_out_of_range_is_422(client: Any) -> None:
    for limit in ("0", "501", "x", "-1"):
        error = await assert_error(
            await client.get(f"/v1/tenants?limit={limit}", headers=OPERATOR),
            422,
            "validation_error",
        )
        assert error["details"][0]["field"] == "limit"
