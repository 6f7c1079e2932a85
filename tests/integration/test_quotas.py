"""Quotas: targets and sources per tenant, deliveries created by one ingest request."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from relay.core.config import Settings
from relay.web.app import create_app
from tests.conftest import Tenant, assert_error, make_tenant

JSON = {"Content-Type": "application/json"}


async def count(database_url: str, query: str, *args: Any) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(query, *args))
    finally:
        await conn.close()


def create_target(client: Any, tenant: Tenant, **fields: Any) -> Any:
    return client.post(
        "/v1/targets", json={"url": "http://127.0.0.1:9/hook", **fields}, headers=tenant.auth
    )


def create_source(client: Any, tenant: Tenant) -> Any:
    return client.post(
        "/v1/sources", json={"name": "s", "auth": {"type": "token"}}, headers=tenant.auth
    )


@pytest.fixture
async def small(aiohttp_client: Any, settings: Settings) -> Any:
    """A gateway whose quotas are small: 3 targets, 2 sources, 6 deliveries per request."""
    return await aiohttp_client(
        create_app(
            settings.with_overrides(
                max_targets_per_tenant=3,
                max_sources_per_tenant=2,
                max_deliveries_per_request=6,
            )
        )
    )


def test_quotas_have_sensible_defaults() -> None:
    defaults = Settings()
    assert defaults.max_targets_per_tenant == 100
    assert defaults.max_sources_per_tenant == 100
    assert defaults.max_deliveries_per_request == 10_000


async def test_target_over_the_quota_is_422_and_a_freed_slot_is_usable(small: Any) -> None:
    tenant = await make_tenant(small)
    ids = []
    for _ in range(3):
        resp = await create_target(small, tenant)
        assert resp.status == 201, await resp.text()
        ids.append((await resp.json())["id"])
    error = await assert_error(await create_target(small, tenant), 422, "validation_error")
    assert "3 targets" in error["message"] and "RELAY_MAX_TARGETS_PER_TENANT" not in str(error)
    # another tenant has its own quota
    other = await make_tenant(small, "Other")
    assert (await create_target(small, other)).status == 201
    # a deleted target frees its slot
    assert (await small.delete(f"/v1/targets/{ids[0]}", headers=tenant.auth)).status == 204
    assert (await create_target(small, tenant)).status == 201
    await assert_error(await create_target(small, tenant), 422, "validation_error")


async def test_concurrent_target_creates_stop_exactly_at_the_quota(
    small: Any, database_url: str
) -> None:
    tenant = await make_tenant(small)
    responses = await asyncio.gather(*(create_target(small, tenant) for _ in range(12)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] * 3 + [422] * 9
    live = await count(
        database_url,
        "SELECT count(*) FROM targets WHERE tenant_id = $1 AND deleted_at IS NULL",
        tenant.id,
    )
    assert live == 3


async def test_source_over_the_quota_is_422(small: Any, database_url: str) -> None:
    tenant = await make_tenant(small)
    responses = await asyncio.gather(*(create_source(small, tenant) for _ in range(8)))
    assert sorted(r.status for r in responses) == [201] * 2 + [422] * 6
    refused = next(r for r in responses if r.status == 422)
    error = await assert_error(refused, 422, "validation_error")
    assert "2 sources" in error["message"]
    live = await count(
        database_url,
        "SELECT count(*) FROM sources WHERE tenant_id = $1 AND deleted_at IS NULL",
        tenant.id,
    )
    assert live == 2


async def test_ingest_over_the_delivery_quota_writes_nothing(small: Any, database_url: str) -> None:
    tenant = await make_tenant(small)
    source = await (await create_source(small, tenant)).json()
    for _ in range(3):
        assert (await create_target(small, tenant)).status == 201
    url = f"/in/{source['id']}?token={source['secret']}"
    # 3 events x 3 targets = 9 deliveries > 6
    resp = await small.post(url, data=json.dumps([{"n": i} for i in range(3)]), headers=JSON)
    error = await assert_error(resp, 422, "validation_error")
    assert "9 deliveries" in error["message"] and "6" in error["message"]
    for table in ("events", "deliveries"):
        rows = await count(
            database_url, f"SELECT count(*) FROM {table} WHERE tenant_id = $1", tenant.id
        )
        assert rows == 0, table
    # exactly at the quota is accepted: 2 x 3 = 6 (a repeated uuid counts once)
    batch = [{"uuid": "a"}, {"uuid": "b"}, {"uuid": "a"}]
    resp = await small.post(url, data=json.dumps(batch), headers=JSON)
    assert resp.status == 202, await resp.text()
    assert (
        await count(database_url, "SELECT count(*) FROM deliveries WHERE tenant_id = $1", tenant.id)
        == 6
    )


async def test_events_that_match_no_target_count_no_deliveries(small: Any) -> None:
    tenant = await make_tenant(small)
    source = await (await create_source(small, tenant)).json()
    for _ in range(3):
        resp = await create_target(small, tenant, filter={"objectType": ["Bill"]})
        assert resp.status == 201
    url = f"/in/{source['id']}?token={source['secret']}"
    batch = [{"objectType": "Invoice", "n": i} for i in range(50)] + [{"objectType": "bill"}] * 2
    resp = await small.post(url, data=json.dumps(batch), headers=JSON)
    assert resp.status == 202, await resp.text()
