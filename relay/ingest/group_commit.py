"""Group commit: the ingest requests that arrive together are committed together.

A request hands its parsed events to :meth:`GroupCommit.commit` and waits. The
committer puts what arrived in the same turn of the event loop, and everything
that arrived while its transactions were busy, into one transaction: at low
load a group is one request and waits for nothing; under load a commit (and its
WAL flush) is shared by many. A request's answer comes only after the
transaction holding its events has committed.

When a group fails, every request gets the answer it would have had alone:
with Postgres unreachable or too slow, all of them fail (503); any other failure
before the COMMIT was sent (or that Postgres answered to a group stored by one
call, relay_ingest, which is then rolled back) may belong to one request, so
each is committed again on its own and only its own error reaches it. A group
whose commit was sent is never written again: if its outcome is unknown (an
error, a timeout or a lost connection in answer to the COMMIT; a timeout or a
lost connection during the one call), each of its requests is answered 503, as
events without a uuid would otherwise be stored twice. Once a group has
committed, its targets are woken on the broker, each once (the sweeper covers a
wake-up that is lost).

Lanes, so that one tenant's heavy requests never hold up another's: a request
that takes ordered keys' locks or stores more than ``LIGHT_EVENTS`` events is
heavy and goes in its tenant's heavy lane, every other in the light lane. Each
lane forms its own groups (a light request never shares a transaction with, nor
waits for a slot behind, a heavy one that waits on key locks or writes ten
thousand rows). The heavy lanes share ``MAX_RUNNING_HEAVY`` transactions in
flight, at most ``TENANT_HEAVY`` a tenant, handed out in turns: before, one
tenant's ordered requests waiting on their keys' locks held all of the heavy
lane's transactions, and every other tenant's ordered event waited behind them.

A stalled Postgres (a lock wait, a full disk) is not waited for: a pooled
connection is waited for at most ``acquire_timeout_s``, a statement at most the
pool's command timeout, and at most ``max_waiting`` requests wait in a process;
one more is answered 503 at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from relay.core import errors
from relay.core.metrics import INGEST_WAITING
from relay.store.db import POSTGRES_DOWN, MaybeCommitted, Pool
from relay.store.events import IngestRequest, IngestResult, record_event_groups

log = logging.getLogger(__name__)

#: Transactions of groups in flight at once in the light lane; arrivals meanwhile form
#: the next group.
MAX_RUNNING = 4
#: Transactions of heavy groups in flight at once, all tenants together, and per tenant.
MAX_RUNNING_HEAVY = 6
TENANT_HEAVY = 2
#: A request of at most this many events and no ordered key goes in the light lane.
LIGHT_EVENTS = 100
#: Events in one transaction at most (a bigger request is a group of its own).
MAX_GROUP_EVENTS = 2000
#: Ordered keys' advisory locks one transaction takes at most, so that no group fills
#: Postgres's shared lock table (a request needing more is a group of its own; one
#: request takes at most KEY_LOCK_BUCKETS per ordered target).
MAX_GROUP_KEY_LOCKS = 400
#: Requests waiting for their commit (queued or in a group in flight) at most.
MAX_WAITING = 1000
#: Longest wait for a pooled connection.
ACQUIRE_TIMEOUT_S = 5.0

Waiter = tuple[IngestRequest, "asyncio.Future[IngestResult]"]


class _Lane:
    """Requests of one weight (and tenant, when heavy) waiting to be grouped, and their
    groups in flight."""

    def __init__(self, name: str, max_running: int) -> None:
        self.name = name
        self.max_running = max_running
        self.waiting: list[Waiter] = []
        self.scheduled = False
        self.running: set[asyncio.Task[None]] = set()


def is_light(request: IngestRequest) -> bool:
    """A request that takes no ordered key's lock and stores few events."""
    return request.lock_count == 0 and len(request.events) <= LIGHT_EVENTS


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
        max_running_heavy: int = MAX_RUNNING_HEAVY,
        tenant_heavy: int = TENANT_HEAVY,
        max_group_events: int = MAX_GROUP_EVENTS,
        max_waiting: int = MAX_WAITING,
        acquire_timeout_s: float = ACQUIRE_TIMEOUT_S,
    ) -> None:
        self._pool = pool
        self._grace_s = enqueue_grace_s
        self._first_delay_s = first_delay_s
        #: called with the (target, tenant) pairs of each committed group
        self._committed = committed
        self._max_events = max_group_events
        self._max_waiting = max_waiting
        self._acquire_timeout_s = acquire_timeout_s
        #: requests handed to commit() and not answered yet
        self._unanswered = 0
        self._light = _Lane("light", max_running)
        #: each tenant's heavy lane while it has requests, in turn order (the next
        #: to start a group first), and the heavy groups in flight, all lanes together
        self._heavy: dict[str, _Lane] = {}
        self._max_heavy = max_running_heavy
        self._tenant_heavy = min(tenant_heavy, max_running_heavy)
        self._heavy_running = 0
        self._heavy_scheduled = False

    async def commit(self, request: IngestRequest) -> IngestResult:
        """Store ``request``'s events; return once they are committed (or raise its error).

        Beyond ``max_waiting`` requests waiting in this process, raise
        :class:`errors.Unavailable` at once.
        """
        if self._unanswered >= self._max_waiting:
            raise errors.Unavailable(
                "too many requests are waiting for the database; try again shortly"
            )
        future: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        if is_light(request):
            self._light.waiting.append((request, future))
            self._schedule(self._light)
        else:
            lane = self._heavy.get(request.tenant_id)
            if lane is None:
                lane = self._heavy[request.tenant_id] = _Lane("heavy", self._tenant_heavy)
            lane.waiting.append((request, future))
            self._schedule_heavy()
        self._unanswered += 1
        INGEST_WAITING.inc()
        try:
            return await future
        finally:
            self._unanswered -= 1
            INGEST_WAITING.dec()

    def _schedule(self, lane: _Lane) -> None:
        if not lane.scheduled:
            lane.scheduled = True
            asyncio.get_running_loop().call_soon(self._start, lane)

    def _schedule_heavy(self) -> None:
        if not self._heavy_scheduled:
            self._heavy_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_heavy)

    def _start(self, lane: _Lane) -> None:
        """Start groups of what waits in the light lane, while fewer than its
        ``max_running`` are in flight."""
        lane.scheduled = False
        while lane.waiting and len(lane.running) < lane.max_running:
            self._launch(lane, self._take(lane))

    def _start_heavy(self) -> None:
        """Start heavy groups, a tenant's lane at a time in turn, while fewer than
        ``max_running_heavy`` are in flight and the lane has fewer than its own cap."""
        self._heavy_scheduled = False
        started = True
        while started and self._heavy_running < self._max_heavy:
            started = False
            for tenant, lane in list(self._heavy.items()):
                if not lane.waiting or len(lane.running) >= lane.max_running:
                    continue
                del self._heavy[tenant]  # to the back of the turn order
                self._heavy[tenant] = lane
                self._heavy_running += 1
                self._launch(lane, self._take(lane), tenant)
                started = True
                break

    def _launch(self, lane: _Lane, group: list[Waiter], tenant: str | None = None) -> None:
        task = asyncio.ensure_future(self._run(group))
        lane.running.add(task)
        task.add_done_callback(functools.partial(self._done, lane, tenant))

    def _take(self, lane: _Lane) -> list[Waiter]:
        count, locks, taken = 0, 0, 0
        for request, _ in lane.waiting:
            if taken and (
                count + len(request.events) > self._max_events
                or locks + request.lock_count > MAX_GROUP_KEY_LOCKS
            ):
                break
            count += len(request.events)
            locks += request.lock_count
            taken += 1
        group, lane.waiting = lane.waiting[:taken], lane.waiting[taken:]
        return group

    def _done(self, lane: _Lane, tenant: str | None, task: asyncio.Task[None]) -> None:
        lane.running.discard(task)
        if tenant is None:
            if lane.waiting:
                self._schedule(lane)
            return
        self._heavy_running -= 1
        if not lane.waiting and not lane.running and self._heavy.get(tenant) is lane:
            del self._heavy[tenant]
        if any(heavy.waiting for heavy in self._heavy.values()):
            self._schedule_heavy()

    async def _run(self, group: list[Waiter]) -> None:
        failure = await self._attempt(group)
        if failure is None:
            return
        log.warning(
            "a group of %d ingest requests failed (%s); committing each alone",
            len(group),
            type(failure).__name__,
        )
        for waiter in group:
            alone = await self._attempt([waiter])
            if alone is not None:
                _fail([waiter], alone)

    async def _attempt(self, group: list[Waiter]) -> Exception | None:
        """Commit ``group`` and answer its requests.

        Returns, unanswered, the error of a group of several requests that wrote
        nothing and may be committed again request by request; answers every
        other failure.
        """
        try:
            conn = await self._pool.acquire(timeout=self._acquire_timeout_s)
        except Exception as exc:
            _fail(group, _unavailable(exc))
            return None
        try:
            results = await record_event_groups(
                conn,
                [request for request, _ in group],
                enqueue_grace_s=self._grace_s,
                first_delay_s=self._first_delay_s,
            )
        except MaybeCommitted as exc:
            log.error(
                "the outcome of a commit of %d ingest requests is unknown (%s); each is"
                " answered 503 and none is written again",
                len(group),
                type(exc.__cause__).__name__,
            )
            _fail(group, errors.Unavailable("the database did not confirm the commit; try again"))
            return None
        except POSTGRES_DOWN as exc:
            _fail(group, _unavailable(exc))
            return None
        except Exception as exc:
            if len(group) > 1:
                return exc
            _fail(group, exc)
            return None
        else:
            self._answer(group, results)
            return None
        finally:
            await self._release(conn)

    def _answer(self, group: list[Waiter], results: list[IngestResult]) -> None:
        """Answer a committed group's requests, then wake its targets."""
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)
        woken = {
            (target_id, request.tenant_id): None
            for (request, _), result in zip(group, results, strict=True)
            for target_id in result.target_ids
        }
        if woken:
            try:
                self._committed(list(woken))
            except Exception:  # committed and answered: the sweeper wakes them
                log.exception("waking the targets of a committed group failed")

    async def _release(self, conn: Any) -> None:
        try:
            await self._pool.release(conn, timeout=self._acquire_timeout_s)
        except Exception as exc:  # asyncpg has closed it; the pool opens another
            log.debug("a connection could not be released cleanly: %s", type(exc).__name__)

    async def close(self) -> None:
        """Wait for the groups in flight (the server has stopped taking requests)."""
        while self._light.running or self._light.waiting:
            if self._light.running:
                await asyncio.wait(set(self._light.running))
            else:
                self._start(self._light)
        while any(lane.waiting or lane.running for lane in self._heavy.values()):
            running = {task for lane in self._heavy.values() for task in lane.running}
            if running:
                await asyncio.wait(running)
            else:
                self._start_heavy()


def _unavailable(exc: Exception) -> Exception:
    """A timeout is a stalled Postgres: 503, saying so; other faults keep their type."""
    if isinstance(exc, TimeoutError):
        return errors.Unavailable("the database did not answer in time; try again shortly")
    return exc


def _fail(group: list[Waiter], exc: BaseException) -> None:
    for _, future in group:
        if not future.done():
            future.set_exception(exc)
