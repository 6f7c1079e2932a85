"""Group commit: requests committed together still get exactly the answer each would alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from relay.core import errors
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
from tests.stack import TcpProxy, eventually, fetch


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


# -- a stalled Postgres (a lock wait, a full disk): bounded waits, 503, nothing stored twice -----


@contextlib.asynccontextmanager
async def events_locked(database_url: str) -> AsyncIterator[None]:
    """Postgres stalls every insert into ``events`` (a lock held) until the block ends."""
    conn = await asyncpg.connect(database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await tx.rollback()
    finally:
        await conn.close()


async def test_a_stalled_postgres_refuses_requests_beyond_the_waiting_bound_at_once(
    aiohttp_client: Any, settings: Settings
) -> None:
    # Given a gateway that lets 10 ingest requests wait for Postgres, with a long statement
    # timeout (so only the bound answers here), a tenant, a source and a target
    gateway = settings.with_overrides(ingest_max_waiting=10, db_statement_timeout_s=60)
    client = await aiohttp_client(create_app(gateway))
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    answers: dict[str, Any] = {}

    async def post(uuid: str) -> None:
        resp = await post_token(client, source, {**SOFTLEDGER, "uuid": uuid})
        answers[uuid] = (resp.status, resp.headers.get("Retry-After"), await resp.json())

    # When Postgres stalls on the events table and 40 requests arrive
    async with events_locked(settings.database_url):
        posts = [asyncio.create_task(post(f"stall-{i}")) for i in range(40)]

        # Then 30 are answered 503 with Retry-After while Postgres is still stalled
        async def refused() -> bool:
            return len(answers) >= 30

        try:
            await eventually(refused, timeout=20)
        except AssertionError:
            raise AssertionError(
                f"{len(answers)} of 40 requests answered while Postgres stalled: the rest pile up"
            ) from None
        assert len(answers) == 30, answers
        for status, retry_after, body in answers.values():
            assert (status, body["error"]["code"]) == (503, "unavailable"), body
            assert retry_after is not None and int(retry_after) >= 1
    # And once Postgres moves again, the 10 that waited are committed, and only they
    await asyncio.gather(*posts)
    accepted = {uuid for uuid, (status, _, _) in answers.items() if status == 202}
    assert len(accepted) == 10, answers
    rows = await fetch(
        settings.database_url, "SELECT upstream_uuid FROM events WHERE source_id = $1", source["id"]
    )
    assert {r["upstream_uuid"] for r in rows} == accepted


async def test_a_stalled_postgres_answers_503_in_time_and_a_resent_event_is_stored_once(
    aiohttp_client: Any, settings: Settings
) -> None:
    # Given a gateway whose statements and pool waits time out after a second, a source
    # and a target; and upstream clients that give up on a request after 4 s and send it
    # again, as SoftLedger does, with events that carry no uuid (nothing de-duplicates them)
    gateway = settings.with_overrides(db_statement_timeout_s=1, db_acquire_timeout_s=1)
    client = await aiohttp_client(create_app(gateway))
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    await make_target(client, tenant)
    no_uuid = {k: v for k, v in SOFTLEDGER.items() if k != "uuid"}
    seen: Counter[int | str] = Counter()

    async def send_until_accepted(n: int) -> None:
        while True:
            try:
                resp = await post_token(
                    client,
                    source,
                    {**no_uuid, "objectId": f"resend-{n}"},
                    timeout=aiohttp.ClientTimeout(total=4),
                )
                seen[resp.status] += 1
                if resp.status == 503:
                    assert resp.headers["Retry-After"]
                await resp.read()
                if resp.status == 202:
                    return
            except TimeoutError:
                seen["client timeout"] += 1
            await asyncio.sleep(0.2)

    # When Postgres stalls on the events table for 6 s while 10 clients send
    async with events_locked(settings.database_url):
        senders = [asyncio.create_task(send_until_accepted(n)) for n in range(10)]
        await asyncio.sleep(6)
    async with asyncio.timeout(60):
        await asyncio.gather(*senders)

    # Then each event is stored once, and the stall was answered 503 before any client gave up
    rows = await fetch(
        settings.database_url,
        "SELECT object_id, count(*) AS n FROM events WHERE source_id = $1 GROUP BY object_id",
        source["id"],
    )
    stored = {r["object_id"]: r["n"] for r in rows}
    assert stored == {f"resend-{n}": 1 for n in range(10)}, (stored, seen)
    assert seen[503] > 0 and seen["client timeout"] == 0, seen


class CommitProxy(TcpProxy):
    """A proxy to Postgres that, once armed, loses the server's answer to the next commit.

    The commit is a COMMIT, or a call of relay_ingest() outside a transaction (the
    call that is its own transaction). ``error``: the client gets an error instead
    of the answer to a COMMIT (to a call alone, an error means it was rolled back);
    ``drop``: the connection is cut once the server has committed; ``stall``: the
    answer never comes. The server has committed in every case: only the client
    does not know.
    """

    SSL_OR_GSS_REQUEST = (80877103, 80877104)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.armed: str | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.unix_path:
            up_reader, up_writer = await asyncio.open_unix_connection(self.unix_path)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        lost: list[str] = []  # what to do with the answer to the COMMIT just forwarded
        await asyncio.gather(
            self._from_client(reader, up_writer, lost),
            self._from_server(up_reader, writer, lost),
            return_exceptions=True,
        )
        self._writers -= {writer, up_writer}

    async def _from_client(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, lost: list[str]
    ) -> None:
        typed = False  # the startup messages have no type byte
        statements: dict[bytes, bytes] = {}  # prepared statement name -> its query
        in_transaction = False
        try:
            while True:
                kind = await reader.readexactly(1) if typed else b""
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head) - 4)
                if not typed:
                    typed = int.from_bytes(body[:4]) not in self.SSL_OR_GSS_REQUEST
                elif kind == b"Q":
                    in_transaction = body.startswith(b"BEGIN") or (
                        in_transaction and not body.startswith((b"COMMIT", b"ROLLBACK"))
                    )
                    if body.startswith(b"COMMIT") and self.armed:
                        lost.append(self.armed)
                        self.armed = None
                elif kind == b"P":  # Parse: name, query
                    name, query = body.split(b"\0", 2)[:2]
                    statements[name] = query
                elif kind == b"B":  # Bind: portal, statement
                    query = statements.get(body.split(b"\0", 2)[1], b"")
                    alone = b"relay_ingest(" in query and not in_transaction
                    if alone and self.armed in ("drop", "stall"):
                        lost.append(self.armed)
                        self.armed = None
                up.write(kind + head + body)
                await up.drain()
        finally:
            up.close()

    async def _from_server(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, lost: list[str]
    ) -> None:
        try:
            while data := await up.read(65536):
                if lost:
                    # the client waits for this answer alone: it starts a message
                    while not _ends_with_ready_for_query(data):
                        data += await up.read(65536)
                    mode = lost.pop()
                    if mode == "drop":
                        writer.transport.abort()
                        return
                    if mode == "stall":
                        while await up.read(65536):
                            pass  # never answered; the client cuts the connection
                        return
                    data = (
                        _error_response("XX000", "the answer to COMMIT was lost")
                        + b"Z"
                        + (5).to_bytes(4)
                        + b"I"
                    )
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


def _ends_with_ready_for_query(data: bytes) -> bool:
    at = 0
    while at + 5 <= len(data):
        end = at + 1 + int.from_bytes(data[at + 1 : at + 5])
        if end > len(data):
            return False
        if data[at : at + 1] == b"Z" and end == len(data):
            return True
        at = end
    return False


def _error_response(code: str, message: str) -> bytes:
    fields = b"".join(
        key + value.encode() + b"\0"
        for key, value in ((b"S", "ERROR"), (b"V", "ERROR"), (b"C", code), (b"M", message))
    )
    return b"E" + (len(fields) + 5).to_bytes(4) + fields + b"\0"


@pytest.mark.parametrize(
    ("lost", "ordered"),
    [("error", True), ("drop", True), ("stall", True), ("drop", False), ("stall", False)],
)
async def test_a_group_whose_commit_answer_is_lost_is_answered_503_and_never_written_again(
    client: Any, database_url: str, lost: str, ordered: bool
) -> None:
    # Given a source and a target (ordered: the group commits in a transaction; not
    # ordered: in one call, relay_ingest), and a group committer whose Postgres
    # connections go through a proxy, with a statement timeout of a second
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    target = await make_target(client, tenant, ordering="object" if ordered else "none")
    routes = [TargetRoute(target["id"], frozenset(), frozenset(), None, ordered=ordered)]
    proxy, url = await CommitProxy.in_front_of(database_url, 5432)
    pool = await create_pool(url, min_size=1, max_size=2, command_timeout=1)
    group = GroupCommit(
        pool,
        enqueue_grace_s=30,
        first_delay_s=0,
        committed=lambda woken: None,
        max_running=1,
        acquire_timeout_s=1,
    )
    no_uuid = {k: v for k, v in SOFTLEDGER.items() if k != "uuid"}

    def request(n: int) -> IngestRequest:
        body = json.dumps({**no_uuid, "objectId": f"lost-{lost}-{ordered}-{n}"}).encode()
        return IngestRequest(tenant.id, source["id"], parse_body(body), routes)

    try:
        # When one group of three requests of events without uuid commits, and the
        # answer to its commit is lost
        proxy.armed = lost
        async with asyncio.timeout(30):
            answers = await asyncio.gather(
                *(group.commit(request(n)) for n in range(3)), return_exceptions=True
            )
    finally:
        await pool.close()
        await proxy.cut()

    # Then each event is stored once, with its delivery
    rows = await fetch(
        database_url,
        """
        SELECT e.object_id, count(DISTINCT e.id) AS events, count(d.id) AS deliveries
        FROM events e LEFT JOIN deliveries d ON d.event_id = e.id
        WHERE e.source_id = $1 AND e.object_id LIKE $2 GROUP BY e.object_id
        """,
        source["id"],
        f"lost-{lost}-{ordered}-%",
    )
    assert {r["object_id"]: (r["events"], r["deliveries"]) for r in rows} == {
        f"lost-{lost}-{ordered}-{n}": (1, 1) for n in range(3)
    }
    # And each request is answered 503 (its outcome is unknown to the gateway), not retried
    for answer in answers:
        assert isinstance(answer, errors.Unavailable), answers


async def test_no_free_connection_in_time_is_answered_503(client: Any, database_url: str) -> None:
    # Given a group committer on a pool of one connection, which something else holds
    tenant = await make_tenant(client)
    source = await make_source(client, tenant)
    pool = await create_pool(database_url, min_size=1, max_size=1)
    group = GroupCommit(
        pool, enqueue_grace_s=30, first_delay_s=0, committed=lambda woken: None, acquire_timeout_s=1
    )
    body = json.dumps({**SOFTLEDGER, "uuid": "no-connection"}).encode()
    try:
        async with pool.acquire():
            # When a request is to be committed
            async with asyncio.timeout(30):
                answer = await asyncio.gather(
                    group.commit(IngestRequest(tenant.id, source["id"], parse_body(body), [])),
                    return_exceptions=True,
                )
    finally:
        await pool.close()

    # Then it is answered 503 once the acquire timeout has passed, and nothing is stored
    assert isinstance(answer[0], errors.Unavailable), answer
    assert not await fetch(database_url, "SELECT 1 FROM events WHERE source_id = $1", source["id"])
