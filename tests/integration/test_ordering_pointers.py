"""An ``ordering_key`` through the end of an array is refused; ingest never fails on a key."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import Tenant, assert_error
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import fetch


@pytest.mark.parametrize("pointer", ["/a/-", "/-", "/a/-/b"])
async def test_a_pointer_through_the_end_of_an_array_is_422_naming_the_field(
    client: Any, tenant: Tenant, pointer: str
) -> None:
    resp = await client.post(
        "/v1/targets",
        json={"url": "http://127.0.0.1:9/x", "ordering": "object", "ordering_key": pointer},
        headers=tenant.auth,
    )
    error = await assert_error(resp, 422, "validation_error")
    assert [d["field"] for d in error["details"]] == ["ordering_key"]
    target = await make_target(client, tenant, ordering="object", ordering_key="/a/0")
    resp = await client.patch(
        f"/v1/targets/{target['id']}", json={"ordering_key": pointer}, headers=tenant.auth
    )
    error = await assert_error(resp, 422, "validation_error")
    assert [d["field"] for d in error["details"]] == ["ordering_key"]
    shown = await (await client.get(f"/v1/targets/{target['id']}", headers=tenant.auth)).json()
    assert shown["ordering_key"] == "/a/0"


async def test_an_event_whose_key_cannot_be_read_is_accepted_unordered(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    source = await make_source(client, tenant)
    stored = await make_target(client, tenant, ordering="object", ordering_key="/a/0")
    # as a target created before "-" was refused has it
    await fetch(
        database_url, "UPDATE targets SET ordering_key = '/a/-' WHERE id = $1", stored["id"]
    )
    body = [
        {"uuid": "list", "a": [1, 2]},
        {"uuid": "empty", "a": []},
        {"uuid": "text", "a": "text"},
        {"uuid": "number", "a": 3},
        {"uuid": "member", "a": {"-": 5}},
    ]
    resp = await post_token(client, source, json.dumps(body).encode())
    assert resp.status == 202, await resp.text()
    rows = await fetch(
        database_url,
        """
        SELECT e.upstream_uuid, d.order_key, d.next_attempt_at IS NOT NULL AS due
        FROM deliveries d JOIN events e ON e.id = d.event_id WHERE d.target_id = $1
        """,
        stored["id"],
    )
    keys = {r["upstream_uuid"]: r["order_key"] for r in rows}
    assert keys == {"list": None, "empty": None, "text": None, "number": None, "member": "5"}
    assert all(r["due"] for r in rows)
