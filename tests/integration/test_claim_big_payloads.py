"""A claim of big events answers them apart (issue 21, migration 0019).

relay_claim answered its deliveries' payloads in its one row, as one array: for
ten events of 900 KB, Postgres built a 9 MB array, spilled it to a temporary
file as the function's result, and sent it in one message while the target's
claim lock was held; a worker decoded it at once on its event loop. Under a
tenant sending such events to ten targets, a claim took 101 ms on average and
Postgres a whole core (bench/noisy_neighbour.py --kinds big). Now a payload over
``claims.INLINE_PAYLOAD_BYTES`` is read after the claim, a row each.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from relay.store import claims
from tests.conftest import Tenant
from tests.integration.test_ingest import make_source, make_target, post_token

BIG = 900_000
EVENTS = 10


async def test_a_claim_of_big_events_spills_nothing_and_answers_each_payload_whole(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given ten due deliveries of ~900 KB events, and one of a small event
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, max_in_flight=50)
    bodies = [{"n": n, "pad": chr(ord("a") + n) * BIG} for n in range(EVENTS)] + [{"n": 99}]
    for body in bodies:
        resp = await post_token(client, source, body)
        assert resp.status == 202, await resp.text()
    conn = await asyncpg.connect(database_url)
    try:
        # When the claim runs (measured, then rolled back), and when a worker claims
        transaction = conn.transaction()
        await transaction.start()
        try:
            [plan] = json.loads(
                await conn.fetchval(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + claims._CLAIM,
                    target["id"],
                    claims._CLAIM_LOCK,
                    50,
                    30.0,
                    None,
                    0,
                    claims.SHARE_S,
                    claims.SHARE_MIN_PART,
                    [],
                    claims.INLINE_PAYLOAD_BYTES,
                )
            )
        finally:
            await transaction.rollback()
        _, claimed = await claims.claim_batch(conn, target["id"], want=50, lease_s=30)
    finally:
        await conn.close()

    # Then the claim's answer did not spill to a temporary file (on 0018 it wrote
    # ~1,100 blocks: the ten payloads, in one array)
    assert plan["Plan"]["Temp Written Blocks"] == 0, plan["Plan"]
    # and every delivery has its own payload, byte for byte as posted
    assert sorted((json.loads(c.payload) for c in claimed), key=lambda b: b["n"]) == bodies
