"""Special-purpose addresses (site-local ``fec0::/10`` first): refused at creation and connect."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from relay.core.config import Settings
from relay.web.app import create_app
from tests.conftest import GatewayTestServer, Tenant, assert_error, make_tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Workers, eventually, fetch

SPECIAL = [
    "http://[fec0::1]/hook",
    "http://[fec0:0:0:ffff::1]:8080/",
    "http://[3fff::1]/",
    "http://[2620:4f:8000::1]/",
    "http://192.0.0.9/",
    "http://192.88.99.1/",
    "http://192.31.196.1/",
]


@pytest.mark.parametrize("url", SPECIAL)
async def test_a_special_purpose_target_is_refused_at_creation(
    aiohttp_client: Any, settings: Settings, url: str
) -> None:
    strict: TestClient[Any, Any] = await aiohttp_client(
        GatewayTestServer(create_app(settings.with_overrides(allow_private_targets=False)))
    )
    tenant = await make_tenant(strict)
    resp = await strict.post("/v1/targets", json={"url": url}, headers=tenant.auth)
    error = await assert_error(resp, 422, "validation_error")
    assert error["details"][0]["field"] == "url"
    ok = await make_target(strict, tenant, url="https://93.184.215.14/hook")
    resp = await strict.patch(f"/v1/targets/{ok['id']}", json={"url": url}, headers=tenant.auth)
    await assert_error(resp, 422, "validation_error")


async def test_a_site_local_target_is_refused_at_connect_time(
    gateway: Any, tenant: Tenant, workers: Workers, database_url: str
) -> None:
    # Given a target stored before the table had fec0::/10 (its URL set past the API's check)
    source = await make_source(gateway, tenant)
    target = await make_target(gateway, tenant)
    await fetch(
        database_url,
        "UPDATE targets SET url = 'http://[fec0::1]:9/hook' WHERE id = $1",
        target["id"],
    )
    # When a worker that allows no private target attempts its delivery
    workers.start(RELAY_ALLOW_PRIVATE_TARGETS="0")
    resp = await post_token(gateway, source, {"uuid": "site-local", "objectType": "Bill"})
    assert resp.status == 202, await resp.text()

    # Then the attempt is refused by the egress policy, not sent
    async def attempted() -> list[Any] | None:
        rows = await fetch(
            database_url,
            """
            SELECT a.error FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
            WHERE d.target_id = $1
            """,
            target["id"],
        )
        return rows or None

    rows = await eventually(attempted, timeout=30)
    assert rows[0]["error"].startswith("refused by egress policy"), rows
