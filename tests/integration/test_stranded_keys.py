"""Ordered keys never strand: retention and the sweeper make a key's next delivery due.

A key whose deliveries are all parked (pending, no ``next_attempt_at``) with
none active is invisible to claims and sweeps: nothing would ever send it.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from prometheus_client import REGISTRY

from relay.core.config import Settings
from relay.delivery.wakeups import Enqueuer, make_broker
from tests.conftest import Tenant
from tests.history import backdate
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.integration.test_ordering import event
from workers.sweeper import Sweeper

REPAIRED = "relay_stranded_keys_repaired_total"


async def _bill(client: Any, tenant: Tenant, source: dict[str, Any], object_id: str) -> list[str]:
    """Two events of one bill; returns their deliveries' ids, in order."""
    resp = await post_token(client, source, [event("Bill", object_id, s) for s in range(2)])
    assert resp.status == 202, await resp.text()
    ids = []
    for event_id in (await resp.json())["event_ids"]:
        found = await client.get(
            "/v1/deliveries", params={"event_id": event_id}, headers=tenant.auth
        )
        [delivery] = (await found.json())["data"]
        ids.append(delivery["id"])
    return ids


async def _delivery(client: Any, tenant: Tenant, delivery_id: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/deliveries/{delivery_id}", headers=tenant.auth)
    assert resp.status == 200, await resp.text()
    found: dict[str, Any] = await resp.json()
    return found


def _sweeper(settings: Settings) -> Sweeper:
    return Sweeper(settings, Enqueuer(make_broker(settings.broker_url, middleware=[])))


async def test_retention_of_the_dead_letter_a_key_blocks_on_lets_the_key_go_on(
    client: Any, tenant: Tenant, settings: Settings, database_url: str
) -> None:
    # Given an ordered target that blocks on dead letters, and a bill whose first event
    # died 31 days ago (nobody replayed it), its second event waiting behind it
    source = await make_source(client, tenant)
    await make_target(client, tenant, ordering="object", on_dead="block")
    first, second = await _bill(client, tenant, source, "retained")
    conn = await asyncpg.connect(database_url)
    sweeper = _sweeper(settings)
    try:
        await conn.execute(
            """
            UPDATE deliveries SET status = 'dead', next_attempt_at = NULL, enqueued_until = NULL,
                   attempt_count = 3, last_error = 'HTTP 500'
            WHERE id = $1
            """,
            first,
        )
        event_id = await conn.fetchval("SELECT event_id FROM deliveries WHERE id = $1", first)
        first = (await backdate(conn, [event_id], days=31))[first]
        waiting = await _delivery(client, tenant, second)
        assert waiting["blocked_by"] == first and waiting["next_attempt_at"] is None

        # When retention purges the old event with its dead letter
        await sweeper.housekeeping(conn)

        # Then the dead letter is gone and the bill's next event is due, blocked by nothing
        gone = await client.get(f"/v1/deliveries/{first}", headers=tenant.auth)
        assert gone.status == 404
        after = await _delivery(client, tenant, second)
        assert after["status"] == "pending"
        assert after.get("blocked_by") is None
        assert after["next_attempt_at"] is not None
    finally:
        await sweeper.enqueuer.close()
        await conn.close()


async def test_the_sweeper_promotes_the_head_of_a_stranded_key_and_counts_it(
    client: Any, tenant: Tenant, settings: Settings, database_url: str
) -> None:
    # Given an ordered target with two bills: one goes on normally (its first event
    # due, its second parked behind it), the other is stranded: its active delivery
    # vanished behind the relay's back, and its second event waits behind nothing
    source = await make_source(client, tenant)
    await make_target(client, tenant, ordering="object")
    healthy_first, healthy_second = await _bill(client, tenant, source, "healthy")
    stranded_first, stranded_second = await _bill(client, tenant, source, "stranded")
    conn = await asyncpg.connect(database_url)
    sweeper = _sweeper(settings)
    try:
        await conn.execute("DELETE FROM deliveries WHERE id = $1", stranded_first)
        stranded = await _delivery(client, tenant, stranded_second)
        assert stranded["next_attempt_at"] is None and stranded.get("blocked_by") is None
        before = REGISTRY.get_sample_value(REPAIRED) or 0.0

        # When the sweeper's housekeeping runs
        await sweeper.housekeeping(conn)

        # Then the stranded key's head is due, counted once; the healthy key is untouched
        repaired = await _delivery(client, tenant, stranded_second)
        assert repaired["status"] == "pending" and repaired["next_attempt_at"] is not None
        assert REGISTRY.get_sample_value(REPAIRED) == before + 1
        assert (await _delivery(client, tenant, healthy_first))["next_attempt_at"] is not None
        parked = await _delivery(client, tenant, healthy_second)
        assert parked["next_attempt_at"] is None and parked["blocked_by"] == healthy_first

        # And a second pass finds nothing more to repair
        await sweeper.housekeeping(conn)
        assert REGISTRY.get_sample_value(REPAIRED) == before + 1
    finally:
        await sweeper.enqueuer.close()
        await conn.close()
