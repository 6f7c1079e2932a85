"""Group commit: requests committed together still get exactly the answer each would alone."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from relay.core.config import Settings
from relay.ingest.group_commit import GroupCommit
from relay.ingest.parse import parse_body
from relay.ingest.routes import TargetRoute
from relay.store.db import create_pool
from relay.store.events import IngestRequest
from relay.store.migrations import migrate
from relay.web.app import create_app
from tests.conftest import make_tenant
from tests.integration.test_ingest import SOFTLEDGER, make_source, make_target, post_token
from tests.services import RestartablePostgres
from tests.stack import fetch


async def test_postgres_stopped_mid_burst_no_202_without_its_event(
    aiohttp_client: Any, settings: Settings, tmp_path: Path
) -> None:
    # Given a gateway on a Postgres of the test's own, a tenant, a source and a target
    postgres = RestartablePostgres(tmp_path / "pg").start()
    conn = await asyncpg.connect(postgres.url)
    await migrate(conn)
    await conn.close()
    client = await aiohttp_client(create_app(settings.with_overrides(database_url=postgres.url)))
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    await make_target(client, tenant)

    # When 200 clients post events without pause, and Postgres stops in the middle
    answers: dict[str, int | str] = {}
    running = True

    async def post_until_stopped(client_no: int) -> None:
        n = 0
        while running:
            uuid = f"burst-{client_no}-{n}"
            n += 1
            try:
                resp = await post_token(client, source, {**SOFTLEDGER, "uuid": uuid})
                answers[uuid] = resp.status
                await resp.read()
            except Exception as exc:  # the test client itself failing: not an answer
                answers[uuid] = type(exc).__name__

    burst = [asyncio.create_task(post_until_stopped(i)) for i in range(200)]
    await asyncio.sleep(1.5)
    accepted_before = sum(1 for status in answers.values() if status == 202)
    await asyncio.to_thread(postgres.stop)
    await asyncio.sleep(1.5)
    running = False
    await asyncio.gather(*burst)
    postgres.start()

    # Then requests were answered 202 before the stop and 503 after it, never anything else
    counts = Counter(answers.values())
    assert accepted_before > 50, counts
    assert counts[503] > 0, counts
    assert set(counts) <= {202, 503}, counts
    # And every 202's event is stored with its delivery; nothing else is
    rows = await fetch(
        postgres.url,
        """
        SELECT e.upstream_uuid, count(d.id) AS deliveries
        FROM events e LEFT JOIN deliveries d ON d.event_id = e.id
        WHERE e.tenant_id = $1 GROUP BY e.upstream_uuid
        """,
        tenant.id,
    )
    stored = {r["upstream_uuid"]: r["deliveries"] for r in rows}
    accepted = {uuid for uuid, status in answers.items() if status == 202}
    assert accepted - set(stored) == set(), "a 202 whose event is not in Postgres"
    assert set(stored) - accepted == set(), "an event stored although its answer was not 202"
    assert set(stored.values()) == {1}
    postgres.stop()


async def test_a_group_answers_each_request_as_if_it_were_alone(
    client: Any, database_url: str
) -> None:
    # Given a tenant with a source and a target, and a group committer on the database
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    target = await make_target(client, tenant)
    routes = [TargetRoute(target["id"], frozenset(), frozenset(), None)]
    woken: list[tuple[str, str]] = []
    pool = await create_pool(database_url, min_size=1, max_size=2)
    group = GroupCommit(
        pool, enqueue_grace_s=30, first_delay_s=0, committed=woken.extend, max_running=1
    )

    def request(body: Any, source_id: str = source["id"]) -> IngestRequest:
        return IngestRequest(tenant.id, source_id, parse_body(json.dumps(body).encode()), routes)

    try:
        # When one group holds: the same uuid three times over two requests, a fresh
        # event, and a request that cannot be stored (its source does not exist)
        fresh = {**SOFTLEDGER, "uuid": "group-fresh"}
        twice = {**SOFTLEDGER, "uuid": "group-twice"}
        answers = await asyncio.gather(
            group.commit(request([twice, twice])),
            group.commit(request(twice)),
            group.commit(request(fresh, source_id="src_does_not_exist")),
            group.commit(request(fresh)),
            return_exceptions=True,
        )
    finally:
        await pool.close()

    # Then the bad request gets its own error and its neighbours are committed
    first, second, bad, last = answers
    assert isinstance(bad, asyncpg.ForeignKeyViolationError)
    assert not isinstance(first, BaseException) and not isinstance(second, BaseException)
    assert not isinstance(last, BaseException)
    # And the repeated uuid is one event, whatever request of the group carried it
    assert first.event_ids[0] == first.event_ids[1] == second.event_ids[0]
    assert (first.duplicates, second.duplicates, last.duplicates) == (1, 1, 0)
    assert len(first.delivery_ids) + len(second.delivery_ids) == 1
    rows = await fetch(
        database_url,
        "SELECT upstream_uuid, count(*) AS n FROM events WHERE source_id = $1"
        " GROUP BY upstream_uuid",
        source["id"],
    )
    assert {r["upstream_uuid"]: r["n"] for r in rows} == {"group-twice": 1, "group-fresh": 1}
    # And the target was woken, once per committed group
    assert set(woken) == {(target["id"], tenant.id)}


async def test_concurrent_requests_with_duplicates_and_invalid_neighbours(
    client: Any, database_url: str
) -> None:
    # Given a tenant with a source and a target
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    await make_target(client, tenant)

    # When 150 requests arrive at once: 10 uuids each sent 10 times, and 50 broken bodies
    bodies: list[Any] = [{**SOFTLEDGER, "uuid": f"mixed-{i % 10}"} for i in range(100)]
    bodies += [b"{not json" for _ in range(25)] + [[] for _ in range(25)]
    started = time.monotonic()
    responses = await asyncio.gather(*(post_token(client, source, b) for b in bodies))
    assert time.monotonic() - started < 60

    # Then each broken body is refused on its own, and every valid one is accepted
    statuses = [r.status for r in responses]
    assert statuses[:100] == [202] * 100
    assert set(statuses[100:]) <= {400, 422}
    # And each uuid names one event, whichever request carried it
    by_uuid: dict[str, set[str]] = {}
    for body, resp in zip(bodies[:100], responses[:100], strict=True):
        by_uuid.setdefault(body["uuid"], set()).update((await resp.json())["event_ids"])
    assert all(len(ids) == 1 for ids in by_uuid.values()), by_uuid
    rows = await fetch(
        database_url,
        """
        SELECT e.upstream_uuid, e.id, count(d.id) AS deliveries
        FROM events e LEFT JOIN deliveries d ON d.event_id = e.id
        WHERE e.source_id = $1 GROUP BY e.upstream_uuid, e.id
        """,
        source["id"],
    )
    assert {r["upstream_uuid"]: {r["id"]} for r in rows} == by_uuid
    assert {r["deliveries"] for r in rows} == {1}
