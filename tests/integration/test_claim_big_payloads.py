"""A claim of big events answers them apart (issue 21, migration 0019).

relay_claim answered its deliveries' payloads in its one row, as one array: for
ten events of 900 KB, Postgres built a 9 MB array, spilled it to a temporary
file as the function's result, and sent it in one message while the target's
claim lock was held; a worker decoded it at once on its event loop. Under a
tenant sending such events to ten targets, a claim took 101 ms on average and
Postgres a whole core (bench/noisy_neighbour.py --kinds big). Now a claim answers
payloads up to ``claims.INLINE_PAYLOAD_BYTES`` in all; the others are read after
it, a row each.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import asyncpg
import pytest

from relay.store import claims
from tests.conftest import Tenant
from tests.integration.test_ingest import make_source, make_target, post_token


def _bodies(count: int, size: int) -> list[dict[str, Any]]:
    """``count`` events of about ``size`` bytes that do not compress, and a small one."""
    pad = [base64.b64encode(os.urandom(size * 3 // 4)).decode() for _ in range(count)]
    return [{"n": n, "pad": pad[n]} for n in range(count)] + [{"n": 999}]


async def _due(client: Any, tenant: Tenant, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, max_in_flight=100)
    for body in bodies:
        resp = await post_token(client, source, body)
        assert resp.status == 202, await resp.text()
    return target


@pytest.mark.parametrize(
    ("count", "size"),
    [(10, 900_000), (80, 60_000)],
    ids=["ten of 900 KB", "eighty of 60 KB, each under the bound"],
)
async def test_a_claim_of_big_events_spills_nothing_and_answers_each_payload_whole(
    client: Any, tenant: Tenant, database_url: str, count: int, size: int
) -> None:
    # Given due deliveries of big events that do not compress, and one of a small event
    bodies = _bodies(count, size)
    target = await _due(client, tenant, bodies)
    args = [target["id"], claims._CLAIM_LOCK, 100, 30.0, None, 0]
    args += [claims.SHARE_S, claims.SHARE_MIN_PART, [], claims.INLINE_PAYLOAD_BYTES, 0]
    conn = await asyncpg.connect(database_url)
    try:
        # When the claim runs (measured, then rolled back), and when a worker claims
        transaction = conn.transaction()
        await transaction.start()
        try:
            [plan] = json.loads(
                await conn.fetchval(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + claims._CLAIM, *args
                )
            )
        finally:
            await transaction.rollback()
        transaction = conn.transaction()
        await transaction.start()
        try:
            answer = await conn.fetchrow(claims._CLAIM, *args)
        finally:
            await transaction.rollback()
        _, claimed = await claims.claim_batch(conn, target["id"], want=100, lease_s=30)
    finally:
        await conn.close()

    # Then the claim's answer did not spill to a temporary file (with every payload
    # in it, 0018 wrote ~1,100 blocks for the ten of 900 KB), and it held payloads
    # (no round trip more for those), at most its bound of bytes of them
    assert plan["Plan"]["Temp Written Blocks"] == 0, plan["Plan"]
    inline = [p for p in answer["payloads"] if p is not None]
    assert inline
    assert sum(map(len, inline)) <= claims.INLINE_PAYLOAD_BYTES
    # and every delivery has its own payload, byte for byte as posted
    assert sorted((json.loads(c.payload) for c in claimed), key=lambda b: b["n"]) == bodies


async def test_a_claim_whose_payload_read_fails_gives_its_deliveries_back(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given two due deliveries of big events, and their payloads' read failing (the
    # function is away: a lost connection or a timeout would do the same)
    target = await _due(client, tenant, _bodies(2, 900_000))
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER FUNCTION relay_payloads(text[]) RENAME TO relay_payloads_away")
        try:
            # When a worker claims them
            with pytest.raises(asyncpg.UndefinedFunctionError):
                await claims.claim_batch(conn, target["id"], want=100, lease_s=60)
        finally:
            await conn.execute(
                "ALTER FUNCTION relay_payloads_away(text[]) RENAME TO relay_payloads"
            )

        # Then none is left leased (an ordered key would wait the lease's 60 s): the
        # next claim gets them all, each with its payload
        leased = await conn.fetchval(
            "SELECT count(*) FROM deliveries WHERE target_id = $1 AND locked_until > now()",
            target["id"],
        )
        assert leased == 0
        _, claimed = await claims.claim_batch(conn, target["id"], want=100, lease_s=60)
        assert sorted(json.loads(c.payload)["n"] for c in claimed) == [0, 1, 999]
    finally:
        await conn.close()
