"""A claim's transaction commits without waiting for its WAL to be flushed.

A claim is a lease: one that a crash of Postgres loses is a delivery claimed
again, as when a worker dies holding it. Its commit spared the flush (an fsync
here) that a record's commit pays anyway, and flushes the claim's WAL with.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from relay.store import claims
from tests.integration.test_lighter_record import tenant_and_target


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


async def test_a_claims_transaction_commits_without_a_flush(
    conn: asyncpg.Connection,
) -> None:
    # Given a target with a due delivery, on a connection that commits synchronously
    _, target = await tenant_and_target(conn, 1)
    await conn.execute("SET synchronous_commit = on")

    # When a worker claims it, in the claim's transaction
    async with conn.transaction():
        _, claimed = await claims.claim_batch(conn, target, want=10, lease_s=30)
        during = await conn.fetchval("SHOW synchronous_commit")

    # Then that transaction committed asynchronously, and the connection's own
    # setting is back for what follows: the record, a synchronous commit
    assert len(claimed) == 1
    assert during == "off"
    assert await conn.fetchval("SHOW synchronous_commit") == "on"
