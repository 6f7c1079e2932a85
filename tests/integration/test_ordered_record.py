"""An ordered target's record is one call: the keys' locks, the record, the next promoted.

Issue 24 (item 3): an ordered record was five round trips (BEGIN, the ended keys'
locks, the record, the promotion of each key's next delivery, COMMIT) where an
unordered one is one; `bench/ordering.py` drains an ordered target at 0.63-0.77
of the same target unordered. relay_record_ordered() (migration 0020) does the
three statements in one call.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from relay.store import claims
from tests.conftest import Tenant
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import ended_attempt


async def test_an_ordered_record_is_one_round_trip_and_makes_each_keys_next_due(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given an ordered target and two bills of three events each: each bill's first
    # is due, the others parked behind it
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, ordering="object")
    events = [
        {"uuid": f"rec-{bill}-{n}", "objectType": "Bill", "objectId": bill, "action": "updated"}
        for bill in ("1", "2")
        for n in range(3)
    ]
    ids = (await (await post_token(client, source, events)).json())["event_ids"]
    conn = await asyncpg.connect(database_url)
    try:
        _, firsts = await claims.claim_batch(conn, target["id"], want=10, lease_s=60)
        assert sorted(c.event_id for c in firsts) == sorted([ids[0], ids[3]])

        # When the worker records both successes, one after the other (the first
        # record also has asyncpg learn the statement's types)
        one, other = sorted(firsts, key=lambda c: c.event_id)
        assert await claims.record_batch(
            conn, target["id"], [ended_attempt(one, 200)], breaker=None, failing=False
        ) == [one.id]
        sent: list[str] = []

        def log(record: Any) -> None:
            sent.append(record.query)

        conn.add_query_logger(log)
        recorded = await claims.record_batch(
            conn, target["id"], [ended_attempt(other, 200)], breaker=None, failing=False
        )
        await asyncio.sleep(0.05)  # asyncpg calls its query loggers soon after, not at once
        conn.remove_query_logger(log)

        # Then a record took one statement (five before: BEGIN, locks, record, promote,
        # COMMIT)
        assert recorded == [other.id]
        assert len(sent) == 1, sent
        # and each bill's second event is due now, its third still parked
        rows = await conn.fetch(
            "SELECT event_id, status, next_attempt_at IS NOT NULL AS due FROM deliveries"
            " WHERE target_id = $1",
            target["id"],
        )
        state = {r["event_id"]: (r["status"], r["due"]) for r in rows}
        assert state == {
            ids[0]: ("succeeded", False),
            ids[1]: ("pending", True),
            ids[2]: ("pending", False),
            ids[3]: ("succeeded", False),
            ids[4]: ("pending", True),
            ids[5]: ("pending", False),
        }
        _, seconds = await claims.claim_batch(conn, target["id"], want=10, lease_s=60)
        assert sorted(c.event_id for c in seconds) == sorted([ids[1], ids[4]])
    finally:
        await conn.close()
