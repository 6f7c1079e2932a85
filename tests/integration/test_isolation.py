"""Tenant isolation: every tenant-scoped route answers 404 to another tenant's ids.

The routes are read from the gateway's route table, so a route added later is
covered without touching this test (and fails it until its ids are known here).
"""

from __future__ import annotations

import re
from typing import Any

from relay.web.app import all_routes
from tests.conftest import Tenant, assert_error

BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("PATCH", "/v1/sources/{source_id}"): {"name": "hijacked"},
    ("PATCH", "/v1/targets/{target_id}"): {"url": "https://evil.example/"},
    ("POST", "/v1/events/{event_id}/replay"): {},
}


async def _objects_of(client: Any, tenant: Tenant) -> dict[str, str]:
    source = await (
        await client.post(
            "/v1/sources", json={"name": "a-src", "auth": {"type": "token"}}, headers=tenant.auth
        )
    ).json()
    target = await (
        await client.post(
            "/v1/targets", json={"url": "https://a.example/hook"}, headers=tenant.auth
        )
    ).json()
    resp = await client.post(f"/in/{source['id']}?token={source['secret']}", json={"uuid": "iso-1"})
    [event_id] = (await resp.json())["event_ids"]
    event = await (await client.get(f"/v1/events/{event_id}", headers=tenant.auth)).json()
    [delivery] = event["deliveries"]
    return {
        "source_id": source["id"],
        "target_id": target["id"],
        "event_id": event_id,
        "delivery_id": delivery["id"],
    }


async def _snapshot(client: Any, tenant: Tenant, ids: dict[str, str]) -> list[Any]:
    delivery = await (
        await client.get(f"/v1/deliveries/{ids['delivery_id']}", headers=tenant.auth)
    ).json()
    delivery.pop("updated_at")
    return [
        delivery,
        await (await client.get(f"/v1/events/{ids['event_id']}", headers=tenant.auth)).json(),
        await (await client.get("/v1/deliveries", headers=tenant.auth)).json(),
        await (await client.get(f"/v1/sources/{ids['source_id']}", headers=tenant.auth)).json(),
        await (await client.get(f"/v1/targets/{ids['target_id']}", headers=tenant.auth)).json(),
        await (
            await client.get(f"/v1/targets/{ids['target_id']}/secret", headers=tenant.auth)
        ).json(),
        await (await client.get("/v1/sources", headers=tenant.auth)).json(),
        await (await client.get("/v1/targets", headers=tenant.auth)).json(),
    ]


async def test_every_tenant_route_hides_other_tenants_objects(
    client: Any, tenant: Tenant, other_tenant: Tenant
) -> None:
    ids = await _objects_of(client, tenant)
    before = await _snapshot(client, tenant, ids)
    checked = 0
    for route in all_routes():
        params = re.findall(r"{(\w+)}", route.path)
        if route.auth != "tenant" or not params:
            continue
        unknown = [p for p in params if p not in ids]
        assert not unknown, f"isolation test does not know how to fill {unknown} in {route.path}"
        path = route.path.format(**ids)
        body = BODIES.get(
            (route.method, route.path), {} if route.method in ("POST", "PATCH") else None
        )
        resp = await client.request(route.method, path, json=body, headers=other_tenant.auth)
        await assert_error(resp, 404, "not_found")
        checked += 1
    assert checked >= 12
    # And nothing of tenant A changed, and B's lists do not show A's objects
    assert await _snapshot(client, tenant, ids) == before
    for path in ("/v1/sources", "/v1/targets", "/v1/events", "/v1/deliveries", "/v1/dead-letters"):
        assert (await (await client.get(path, headers=other_tenant.auth)).json())["data"] == []
