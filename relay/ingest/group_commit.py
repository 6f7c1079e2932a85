"""Group commit: the ingest requests that arrive together are committed together.

A request hands its parsed events to :meth:`GroupCommit.commit` and waits. The
committer puts what arrived in the same turn of the event loop, and everything
that arrived while its transactions were busy, into one transaction: at low
load a group is one request and waits for nothing; under load a commit (and its
WAL flush) is shared by many. A request's answer comes only after the
transaction holding its events has committed.

When a group fails, every request gets the answer it would have had alone:
with Postgres unreachable, all of them fail (503); any other failure may belong
to one request, so each is committed again on its own and only its own error
reaches it. Once a group has committed, its targets are woken on the broker,
each once (the sweeper covers a wake-up that is lost).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from relay.store.db import POSTGRES_DOWN, Pool
from relay.store.events import IngestRequest, IngestResult, record_event_groups

log = logging.getLogger(__name__)

#: Transactions of groups in flight at once; arrivals meanwhile form the next group.
MAX_RUNNING = 4
#: Events in one transaction at most (a bigger request is a group of its own).
MAX_GROUP_EVENTS = 2000

Waiter = tuple[IngestRequest, "asyncio.Future[IngestResult]"]


class GroupCommit:
    """Commits concurrent ingest requests in shared transactions."""

    def __init__(
        self,
        pool: Pool,
        *,
        enqueue_grace_s: float,
        first_delay_s: float,
        committed: Callable[[Sequence[tuple[str, str]]], None],
        max_running: int = MAX_RUNNING,
        max_group_events: int = MAX_GROUP_EVENTS,
    ) -> None:
        self._pool = pool
        self._grace_s = enqueue_grace_s
        self._first_delay_s = first_delay_s
        #: called with the (target, tenant) pairs of each committed group
        self._committed = committed
        self._max_running = max_running
        self._max_events = max_group_events
        self._waiting: list[Waiter] = []
        self._scheduled = False
        self._running: set[asyncio.Task[None]] = set()

    async def commit(self, request: IngestRequest) -> IngestResult:
        """Store ``request``'s events; return once they are committed (or raise its error)."""
        future: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)
        return await future

    def _start(self) -> None:
        """Start groups of what waits, while fewer than ``max_running`` are in flight."""
        self._scheduled = False
        while self._waiting and len(self._running) < self._max_running:
            group = self._take()
            task = asyncio.ensure_future(self._run(group))
            self._running.add(task)
            task.add_done_callback(self._done)

    def _take(self) -> list[Waiter]:
        count, taken = 0, 0
        for request, _ in self._waiting:
            if taken and count + len(request.events) > self._max_events:
                break
            count += len(request.events)
            taken += 1
        group, self._waiting = self._waiting[:taken], self._waiting[taken:]
        return group

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self._waiting and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    async def _run(self, group: list[Waiter]) -> None:
        try:
            await self._commit_group(group)
        except POSTGRES_DOWN as exc:
            _fail(group, exc)
        except Exception as exc:
            if len(group) == 1:
                _fail(group, exc)
                return
            log.warning(
                "a group of %d ingest requests failed (%s); committing each alone",
                len(group),
                type(exc).__name__,
            )
            for waiter in group:
                try:
                    await self._commit_group([waiter])
                except Exception as alone:
                    _fail([waiter], alone)

    async def _commit_group(self, group: list[Waiter]) -> None:
        async with self._pool.acquire() as conn:
            results = await record_event_groups(
                conn,
                [request for request, _ in group],
                enqueue_grace_s=self._grace_s,
                first_delay_s=self._first_delay_s,
            )
        woken = {
            (target_id, request.tenant_id): None
            for (request, _), result in zip(group, results, strict=True)
            for target_id in result.target_ids
        }
        if woken:
            self._committed(list(woken))
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        """Wait for the groups in flight (the server has stopped taking requests)."""
        while self._running or self._waiting:
            if self._running:
                await asyncio.wait(set(self._running))
            else:
                self._start()


def _fail(group: list[Waiter], exc: BaseException) -> None:
    for _, future in group:
        if not future.done():
            future.set_exception(exc)
