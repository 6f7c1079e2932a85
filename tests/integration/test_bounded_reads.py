"""Lists and details bound their memory and size, whatever the payloads and attempts."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from relay.core.crypto import new_id
from tests.conftest import OPERATOR, Tenant, make_tenant, stack_env
from tests.integration.test_console import sign_in
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.services import GatewayProcess

MIB = 1024 * 1024
#: A payload of about 1 MB (the largest ingest body by default).
BLOB = 1_000_000


_PREFIXES: set[str] = set()


def _prefix() -> str:
    """10 characters that make synthetic ids unique in this module's database: the time
    part of an id made now (a row's id says when it was made: its delivery's attempts,
    its event's deliveries are read from the days since it only), a new one each call."""
    while (prefix := new_id("x")[2:12]) in _PREFIXES:
        time.sleep(0.001)
    _PREFIXES.add(prefix)
    return prefix


def _rss_kib(pid: int, field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak so far) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def _insert_big_events(database_url: str, tenant_id: str, count: int) -> list[str]:
    """``count`` events of ~1 MB each (written by SQL: the gateway measured only reads)."""
    ids = [f"evt_{n:026d}" for n in range(1, count + 1)]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            INSERT INTO events (id, tenant_id, object_type, action, payload)
            SELECT i, $2, 'Bill', 'paid',
                   convert_to('{"id":"' || i || '","blob":"' || repeat('A', $3) || '"}', 'UTF8')
            FROM unnest($1::text[]) AS i
            """,
            ids,
            tenant_id,
            BLOB,
        )
    finally:
        await conn.close()
    return ids


async def test_listing_1_mb_events_500_at_a_time_keeps_the_gateway_small(
    database_url: str, clean_redis: str, tmp_path: Path
) -> None:
    # Given a gateway process and a tenant with 500 events of 1 MB each
    gateway = GatewayProcess(
        stack_env(database_url, clean_redis), tmp_path / "gateway.log", processes=1
    ).start()
    assert gateway.proc is not None
    pid = gateway.proc.pid
    timeout = aiohttp.ClientTimeout(total=300)
    try:
        async with aiohttp.ClientSession(gateway.url, timeout=timeout) as http:
            resp = await http.post("/v1/tenants", json={"name": "Lister"}, headers=OPERATOR)
            assert resp.status == 201, await resp.text()
            auth = {"Authorization": f"Bearer {(await resp.json())['api_key']}"}
            tenant_id = (await resp.json())["id"]
            ids = await _insert_big_events(database_url, tenant_id, 500)
            resp = await http.get("/v1/events?limit=1", headers=auth)
            assert resp.status == 200
            await resp.read()
            before = _rss_kib(pid, "VmRSS")

            # When it lists them 500 at a time, twice at once
            async def list_all() -> bytes:
                resp = await http.get("/v1/events?limit=500", headers=auth)
                assert resp.status == 200, await resp.text()
                return await resp.read()

            answers = await asyncio.gather(list_all(), list_all())
            peak = _rss_kib(pid, "VmHWM")

            # Then the gateway's memory grew by far less than the 500 MB listed
            grown_mib = (peak - before) / 1024
            print(f"gateway RSS {before / 1024:.0f} MiB, peak +{grown_mib:.1f} MiB")
            assert grown_mib < 100, f"the gateway grew by {grown_mib:.0f} MiB"
            # And each answer is bounded in size, yet names every event
            for raw in answers:
                assert len(raw) < 1.5 * MIB, len(raw)
            resp = await http.get("/v1/events?limit=500", headers=auth)
            page = await resp.json()
            assert [e["id"] for e in page["data"]] == ids[::-1]
            assert page["next_cursor"] is None
            # And each event says its payload's size; the payloads that did not fit are
            # null, and the event itself has the payload
            assert all(e["payload_size"] > BLOB for e in page["data"])
            left_out = [e for e in page["data"] if e["payload"] is None]
            assert len(left_out) >= 499
            resp = await http.get(f"/v1/events/{left_out[0]['id']}", headers=auth)
            assert resp.status == 200
            event = await resp.json()
            assert event["payload"]["id"] == left_out[0]["id"]
            assert len(event["payload"]["blob"]) == BLOB
    finally:
        gateway.stop()
        print(gateway.log()[-5000:])


async def test_small_events_are_listed_with_their_payloads(client: Any, tenant: Tenant) -> None:
    # Given a few small events
    source = await make_source(client, tenant)
    for n in range(3):
        resp = await post_token(client, source, {"uuid": f"small-{n}", "objectType": "Bill"})
        assert resp.status == 202

    # When they are listed, each carries its payload and its size
    page = await (await client.get("/v1/events", headers=tenant.auth)).json()
    assert [e["payload"]["uuid"] for e in page["data"]] == ["small-2", "small-1", "small-0"]
    assert all(e["payload_size"] > 0 for e in page["data"])


async def _delivery_with_attempts(
    client: Any, database_url: str, tenant: Tenant, attempts: int
) -> tuple[str, list[str]]:
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    [event_id] = (await (await post_token(client, source, {"uuid": "many-att"})).json())[
        "event_ids"
    ]
    conn = await asyncpg.connect(database_url)
    try:
        delivery_id = await conn.fetchval("SELECT id FROM deliveries WHERE event_id = $1", event_id)
        prefix = _prefix()
        ids = [f"att_{prefix}{n:016d}" for n in range(1, attempts + 1)]
        await conn.execute(
            """
            INSERT INTO attempts (id, tenant_id, delivery_id, started_at, duration_ms,
                                  status_code, error, response_body)
            SELECT i, $2, $3, now(), 5, 500, 'HTTP 500', repeat('x', 4096)
            FROM unnest($1::text[]) AS i
            """,
            ids,
            tenant.id,
            delivery_id,
        )
    finally:
        await conn.close()
    return delivery_id, ids


async def test_a_delivery_with_thousands_of_attempts_answers_a_bounded_page(
    client: Any, tenant: Tenant, other_tenant: Tenant, database_url: str
) -> None:
    # Given a delivery with 3,000 attempts (each with a 4 KiB response body)
    delivery_id, ids = await _delivery_with_attempts(client, database_url, tenant, 3000)

    # When it is read
    resp = await client.get(f"/v1/deliveries/{delivery_id}", headers=tenant.auth)
    assert resp.status == 200
    raw = await resp.read()
    delivery = await resp.json()

    # Then it shows its latest 100 attempts (oldest first, as always) and a cursor
    assert len(raw) < MIB
    assert [a["id"] for a in delivery["attempts"]] == ids[-100:]
    assert delivery["attempts_next_cursor"] == ids[-100]
    # And the rest come from its attempts' list, newest first, each once
    seen: list[str] = []
    cursor = delivery["attempts_next_cursor"]
    while cursor is not None:
        resp = await client.get(
            f"/v1/deliveries/{delivery_id}/attempts?limit=500&cursor={cursor}",
            headers=tenant.auth,
        )
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        assert len(page["data"]) <= 500
        seen += [a["id"] for a in page["data"]]
        cursor = page["next_cursor"]
    assert seen == ids[:-100][::-1]
    # And another tenant sees neither
    for path in (f"/v1/deliveries/{delivery_id}", f"/v1/deliveries/{delivery_id}/attempts"):
        resp = await client.get(path, headers=other_tenant.auth)
        assert resp.status == 404, path


async def _event_with_deliveries(
    client: Any, database_url: str, tenant: Tenant
) -> tuple[str, list[str]]:
    """An event with 249 deliveries more than its targets gave it, and their ids in order."""
    source = await make_source(client, tenant)
    target = await make_target(client, tenant)
    [event_id] = (await (await post_token(client, source, {"uuid": "many-dlv"})).json())[
        "event_ids"
    ]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            INSERT INTO deliveries (id, tenant_id, event_id, target_id, status)
            SELECT 'dlv_' || $4 || lpad(n::text, 16, '0'), $1, $2, $3, 'succeeded'
            FROM generate_series(1, 249) n
            """,
            tenant.id,
            event_id,
            target["id"],
            _prefix(),
        )
        rows = await conn.fetch(
            "SELECT id FROM deliveries WHERE event_id = $1 ORDER BY id", event_id
        )
    finally:
        await conn.close()
    return event_id, [r["id"] for r in rows]


async def test_an_event_with_hundreds_of_deliveries_answers_a_bounded_page(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given an event with 250 deliveries (replays add deliveries without bound)
    event_id, ids = await _event_with_deliveries(client, database_url, tenant)
    assert len(ids) == 250

    # When it is read, it shows its latest 100 deliveries (oldest first) and a cursor
    event = await (await client.get(f"/v1/events/{event_id}", headers=tenant.auth)).json()
    assert [d["id"] for d in event["deliveries"]] == ids[-100:]
    assert event["deliveries_next_cursor"] == ids[-100]
    # And the rest come from the deliveries' list of the event
    seen: list[str] = []
    cursor = event["deliveries_next_cursor"]
    while cursor is not None:
        page = await (
            await client.get(
                f"/v1/deliveries?event_id={event_id}&limit=100&cursor={cursor}",
                headers=tenant.auth,
            )
        ).json()
        seen += [d["id"] for d in page["data"]]
        cursor = page["next_cursor"]
    assert seen == ids[:-100][::-1]


async def test_the_console_shows_a_bounded_part_of_long_stories(
    client: Any, database_url: str
) -> None:
    # Given a delivery with 3,000 attempts, signed in as its tenant
    tenant = await make_tenant(client, "Console")
    delivery_id, _ = await _delivery_with_attempts(client, database_url, tenant, 3000)
    await sign_in(client, tenant.api_key)

    # When its page (and the fragment that refreshes it) is read
    for path in (f"/console/deliveries/{delivery_id}", f"/console/deliveries/{delivery_id}/live"):
        resp = await client.get(path)
        assert resp.status == 200, path
        html = await resp.text()
        # Then it shows the latest 100 attempts, numbered as they were made, and says
        # how many earlier ones it leaves out
        shown = re.findall(r'<span class="attempt-n">#(\d+)</span>', html)
        assert [int(n) for n in shown] == list(range(2901, 3001)), path
        assert "2,900 earlier attempts" in html, path
        assert len(html) < 2 * MIB, path

    # And the page of an event with 250 deliveries lists the latest 100 of them
    event_id, ids = await _event_with_deliveries(client, database_url, tenant)
    html = await (await client.get(f"/console/events/{event_id}")).text()
    shown = re.findall(r'href="/console/deliveries/(dlv_\w+)"', html)
    assert shown == ids[-100:]
    assert f"{len(ids) - 100} earlier deliveries" in html


async def test_a_listed_event_is_its_detail_payload_and_all(client: Any, tenant: Tenant) -> None:
    # Given an event sent alone (stored as received: spaces, escapes, nesting) and a batch
    source = await make_source(client, tenant)
    alone = b'{ "uuid": "alone",  "objectType": "Bill", "n": [1, 2.5, {"\\u00e9": null}] }'
    assert (await post_token(client, source, alone)).status == 202
    batch = [{"uuid": "b-1", "text": "caf\u00e9 \u2603", "ok": True}, {"uuid": "b-2"}]
    assert (await post_token(client, source, batch)).status == 202

    # When they are listed, each is what its own page shows (payload included)
    listed = await (await client.get("/v1/events?limit=500", headers=tenant.auth)).json()
    assert [e["payload"]["uuid"] for e in listed["data"]] == ["b-2", "b-1", "alone"]
    for event in listed["data"]:
        detail = await (await client.get(f"/v1/events/{event['id']}", headers=tenant.auth)).json()
        assert event == {k: v for k, v in detail.items() if not k.startswith("deliveries")}
    assert listed["data"][2]["payload"]["n"] == [1, 2.5, {"\u00e9": None}]
    assert listed["next_cursor"] is None
