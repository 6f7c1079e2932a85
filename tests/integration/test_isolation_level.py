"""Relay's transactions read committed, whatever the database's default says.

The claims and records lock first (a target's claim lock, ordered keys' locks)
and then read in a later statement what other workers committed meanwhile: a
read-committed snapshot per statement. A database whose default is repeatable
read (a DBA's choice, or a managed Postgres's preset) gave a claim the snapshot
of its first statement, taken before it waited for the lock: it could not see
the leases of the claim it waited for, and failed on their rows.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from relay.store import claims
from relay.store.db import create_pool
from tests.conftest import Tenant
from tests.integration.test_ingest import make_source, make_target, post_token

CAP = 3


@pytest.fixture
async def repeatable_read_by_default(database_url: str) -> Any:
    admin = await asyncpg.connect(database_url)
    name = await admin.fetchval("SELECT current_database()")
    await admin.execute(
        f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'"
    )
    yield
    await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_isolation')
    await admin.close()


async def test_a_claim_waiting_for_another_sees_its_leases(
    client: Any, tenant: Tenant, database_url: str, repeatable_read_by_default: None
) -> None:
    source = await make_source(client, tenant)
    target = (await make_target(client, tenant, max_in_flight=CAP))["id"]
    resp = await post_token(client, source, [{"n": n} for n in range(10)])
    assert resp.status == 202
    pool = await create_pool(database_url, min_size=2, max_size=2)
    other = await asyncpg.connect(database_url)
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW transaction_isolation") == "read committed"
        # Given another worker claiming the target's whole cap, holding its claim lock
        await other.execute("SELECT pg_advisory_lock($1, hashtext($2))", claims._CLAIM_LOCK, target)
        async with pool.acquire() as conn:
            # When this worker's claim starts meanwhile, and waits for the lock
            waiting = asyncio.create_task(claims.claim_batch(conn, target, want=CAP, lease_s=60))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            # (the same backend takes the claim's lock again at once)
            _, held = await claims.claim_batch(other, target, want=CAP, lease_s=60)
            assert len(held) == CAP
            await other.execute(
                "SELECT pg_advisory_unlock($1, hashtext($2))", claims._CLAIM_LOCK, target
            )
            # Then it sees the cap taken, and claims nothing (no error, no excess)
            _, mine = await asyncio.wait_for(waiting, timeout=10)
        assert mine == []
    finally:
        await other.close()
        await pool.close()
