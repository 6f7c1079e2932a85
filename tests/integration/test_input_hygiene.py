"""No input a tenant or the internet can send makes a 500: each is a clear 4xx, nothing written."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import OPERATOR, Tenant, assert_error
from tests.integration.test_ingest import make_source, post_token
from tests.stack import fetch

NUL, SURROGATE = "\\u0000", "\\ud800"  # as JSON escapes


async def _events(database_url: str, tenant: Tenant) -> int:
    rows = await fetch(
        database_url, "SELECT count(*) AS n FROM events WHERE tenant_id = $1", tenant.id
    )
    return int(rows[0]["n"])


@pytest.mark.parametrize(
    "body",
    [
        '{"uuid": "a", "objectType": "Bill' + NUL + '"}',
        '{"uuid": "a' + NUL + '"}',
        '{"objectType": "' + SURROGATE + '"}',
        '[{"uuid": "ok"}, {"uuid": "b", "note": "x' + SURROGATE + '"}]',
        '{"uuid": "big", "n": 1' + "0" * 5000 + "}",
        '{"uuid": "nan", "amount": NaN}',
        '{"uuid": "inf", "amount": Infinity}',
        '{"uuid": "dup", "objectType": "Bill", "objectType": "Invoice"}',
        '{"uuid": "huge", "amount": 1e999}',
        "[" * 100_000 + "]" * 100_000,
    ],
    ids=[
        "nul-objectType",
        "nul-uuid",
        "surrogate-objectType",
        "surrogate-in-batch",
        "5000-digit-int",
        "NaN",
        "Infinity",
        "duplicate-key",
        "float-out-of-range",
        "deep-nesting",
    ],
)
async def test_ingest_refuses_what_is_not_standard_json_with_400(
    client: Any, tenant: Tenant, database_url: str, body: str
) -> None:
    source = await make_source(client, tenant)
    resp = await post_token(client, source, body.encode())
    await assert_error(resp, 400, "invalid_json")
    assert await _events(database_url, tenant) == 0


async def test_a_nul_in_a_body_field_is_422_naming_the_field(client: Any, tenant: Tenant) -> None:
    cases = [
        ("/v1/tenants", OPERATOR, '{"name": "A' + NUL + '"}', "name"),
        ("/v1/sources", tenant.auth, '{"name": "S' + NUL + '", "auth": {"type": "token"}}', "name"),
        (
            "/v1/targets",
            tenant.auth,
            '{"url": "http://127.0.0.1:9/h", "description": "d' + NUL + '"}',
            "description",
        ),
        (
            "/v1/targets",
            tenant.auth,
            '{"url": "http://127.0.0.1:9/h", "filter": {"objectType": ["B' + SURROGATE + '"]}}',
            "filter.objectType[0]",
        ),
    ]
    for path, headers, body, field in cases:
        resp = await client.post(
            path, data=body, headers={**headers, "content-type": "application/json"}
        )
        error = await assert_error(resp, 422, "validation_error")
        assert error["details"][0]["field"] == field, (path, error)
    listed = await client.get("/v1/targets", headers=tenant.auth)
    assert (await listed.json())["data"] == []


async def test_deep_nesting_in_a_management_body_is_400(client: Any, tenant: Tenant) -> None:
    body = '{"url": "http://127.0.0.1:9/h", "filter": ' + "[" * 100_000 + "]" * 100_000 + "}"
    resp = await client.post(
        "/v1/targets", data=body, headers={**tenant.auth, "content-type": "application/json"}
    )
    await assert_error(resp, 400, "invalid_json")


TENANT_LISTS = ["/v1/sources", "/v1/targets", "/v1/events", "/v1/deliveries", "/v1/dead-letters"]
OPERATOR_LISTS = ["/v1/tenants", "/v1/admin/dead-letters"]


# (a cursor whose bytes are not UTF-8 is a 400 before any route: test_edge_bytes.py)
@pytest.mark.parametrize("cursor", ["!!not-a-cursor!!", "%00%C3%BF", "evt_", "%EF%BF%BD"])
async def test_a_cursor_that_is_not_one_is_422_on_every_list(
    client: Any, tenant: Tenant, cursor: str
) -> None:
    paths = [(p, tenant.auth) for p in TENANT_LISTS] + [(p, OPERATOR) for p in OPERATOR_LISTS]
    paths.append((f"/v1/tenants/{tenant.id}/api-keys", OPERATOR))
    for path, headers in paths:
        resp = await client.get(f"{path}?cursor={cursor}", headers=headers)
        error = await assert_error(resp, 422, "validation_error")
        assert error["details"][0]["field"] == "cursor", (path, error)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("source_id=%00", "source_id"),
        ("since=0001-01-01T00:00:00%2B14:00", "since"),
        ("until=9999-12-31T23:59:59-14:00", "until"),
    ],
)
async def test_bad_query_parameters_are_422_naming_them(
    client: Any, tenant: Tenant, query: str, field: str
) -> None:
    resp = await client.get(f"/v1/events?{query}", headers=tenant.auth)
    error = await assert_error(resp, 422, "validation_error")
    assert error["details"][0]["field"] == field


@pytest.mark.parametrize("bad_id", ["%00", "tgt_%00", "tgt_!!", "x" * 300, "%ED%A0%80"])
async def test_a_path_id_that_is_not_an_id_is_404(client: Any, tenant: Tenant, bad_id: str) -> None:
    for path in ("/v1/targets/{}", "/v1/sources/{}", "/v1/events/{}", "/v1/deliveries/{}"):
        resp = await client.get(path.format(bad_id), headers=tenant.auth)
        await assert_error(resp, 404, "not_found")
    resp = await client.get(f"/v1/tenants/{bad_id}", headers=OPERATOR)
    await assert_error(resp, 404, "not_found")
