"""The delivery engine: many attempts in flight per process, fair across tenants.

A broker message only says "target T has due work" (``wake``). Each worker
process keeps one *drainer* coroutine per target it was woken for: the drainer
claims up to the target's free share of its ``max_in_flight`` in one statement,
sends them concurrently on the event loop, records what ended in one
transaction, and claims again until nothing is due; then it ends, leaving a
timer for the target's next retry. So a hanging target costs coroutines and
sockets, never a thread, and broker traffic follows targets, not deliveries.

Attempt slots (``RELAY_WORKER_CONCURRENCY`` per process) are shared by tenants
in round robin (:class:`FairSlots`), and no tenant holds more than three
quarters of them, so one tenant's backlog delays another's fresh event by at
most the time one of its attempts takes to end. A target's circuit breaker
(Postgres, shared by every process) stops its claims while open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from relay.core.config import Settings
from relay.core.crypto import SecretBox, new_id, open_headers
from relay.core.metrics import (
    ATTEMPT_LATENCY,
    BREAKER_OPENED,
    DELIVERIES,
    ENGINE_IN_FLIGHT,
    status_class,
)
from relay.core.ratelimit import RateLimiter
from relay.delivery.egress import EgressClient, EgressRefused, describe_error
from relay.delivery.outcome import (
    Breaker,
    decide,
    delivery_headers,
    next_breaker,
    parse_retry_after,
    trips_breaker,
)
from relay.delivery.wakeups import (
    DRAINING_TTL_MS,
    HELP_KEY,
    Enqueuer,
    draining_key,
    help_asked,
    help_member,
    woken_key,
)
from relay.store import claims
from relay.store.claims import Attempt, BreakerChange, Claimed, SendTarget
from relay.store.db import POSTGRES_DOWN, Conn, Pool

log = logging.getLogger("relay.deliver")

#: A wait up to this long is carried by a timer of the worker that recorded it;
#: a longer one is the sweeper's, once due.
SHORT_WAIT_S = 60.0
#: Leases last the delivery timeout plus this; an attempt is not started unless
#: the lease outlasts the whole timeout by ``LEASE_GUARD_S``.
LEASE_MARGIN_S = 10.0
LEASE_GUARD_S = 3.0
#: How long the end of one attempt waits for others of its batch, to record together.
GATHER_S = 0.005
#: Postgres connections of one worker process.
POOL_SIZE = 10
#: The longest a worker waits for a pooled connection before it gives up the round.
ACQUIRE_TIMEOUT_S = 5.0
#: The most of a process's connections one tenant's drainers hold at once: another
#: tenant's claim never waits behind a tenant whose records all wait (on its keys' locks,
#: held by its own long ingest), only for its turn (round robin, as attempt slots).
TENANT_CONNECTION_SHARE = 0.7


@dataclass
class WorkerContext:
    """What the engine and the actors need, opened once per worker process."""

    settings: Settings
    pool: Pool
    egress: EgressClient
    redis: Any
    limiter: RateLimiter
    enqueuer: Enqueuer
    secrets: SecretBox


class FairSlots:
    """Attempt slots shared by tenants: round robin among the waiting, a cap per tenant."""

    def __init__(self, capacity: int, tenant_share: float = 0.75) -> None:
        self.capacity = capacity
        self.free = capacity
        self.per_tenant = max(1, int(capacity * tenant_share))
        self.held: Counter[str] = Counter()
        self._waiting: dict[str, deque[tuple[int, asyncio.Future[int]]]] = {}

    def _grant(self, tenant: str, want: int) -> int:
        n = max(0, min(want, self.free, self.per_tenant - self.held[tenant]))
        self.free -= n
        self.held[tenant] += n
        return n

    def try_acquire(self, tenant: str, want: int) -> int:
        """Up to ``want`` slots now, or 0: waiting tenants that can be served go first."""
        self._dispatch()
        return self._grant(tenant, want)

    async def acquire(self, tenant: str, want: int) -> int:
        """Between 1 and ``want`` slots, waiting for the tenant's turn (0: shutting down)."""
        granted = self.try_acquire(tenant, want)
        if granted:
            return granted
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, deque()).append((want, future))
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(tenant, future.result())
            raise

    def weigh(self, tenant: str, weights: list[int], granted: int, *, first: bool) -> int:
        """How many of a tenant's items of these weights, in order, the ``granted`` slots
        and those the tenant may take now hold; what they do not use goes back. ``first``:
        the drainer has nothing else in flight; then, if the tenant holds no other slot,
        the first item is kept regardless (an item heavier than the tenant's whole share
        still goes, alone: one at a time for the tenant)."""
        kept, total = 0, 0
        for weight in weights:
            if total + weight > granted:
                granted += self.try_acquire(tenant, total + weight - granted)
                alone = first and kept == 0 and self.held[tenant] == granted
                if total + weight > granted and not alone:
                    break
            total += weight
            kept += 1
        if total < granted:
            self.release(tenant, granted - total)
        elif total > granted:  # the first item, over the share: it holds what it uses
            self.hold(tenant, total - granted)
        return kept

    def hold(self, tenant: str, n: int) -> None:
        """Hold ``n`` more slots at once, past the tenant's share and the free ones if
        need be (what is free goes negative until they are released)."""
        self.free -= n
        self.held[tenant] += n

    def release(self, tenant: str, n: int) -> None:
        """Give ``n`` slots back; the next waiting tenants get them in turn."""
        if n <= 0:
            return
        self.free += n
        self.held[tenant] -= n
        if self.held[tenant] <= 0:
            del self.held[tenant]
        self._dispatch()

    def _dispatch(self) -> None:
        progressed = True
        while self.free > 0 and self._waiting and progressed:
            progressed = False
            for tenant in list(self._waiting):
                queue = self._waiting.pop(tenant)
                want, future = queue[0]
                granted = 0 if future.done() else self._grant(tenant, want)
                if future.done() or granted:
                    queue.popleft()
                    progressed = True
                    if not future.done():
                        future.set_result(granted)
                if queue:  # back of the ring: the next tenant is served first
                    self._waiting[tenant] = queue
                if self.free == 0:
                    break

    def close(self) -> None:
        """Answer every waiting drainer with 0 slots."""
        for queue in self._waiting.values():
            for _, future in queue:
                if not future.done():
                    future.set_result(0)
        self._waiting.clear()


@dataclass(frozen=True)
class _Sent:
    attempt: Attempt
    trips: bool | None  # what it says of the target's health (relay.delivery.trips_breaker)


#: How long a rate-limit mark outlasts the limiter's wait (waiting_for "rate_limit").
RATE_MARK_S = 1.0

#: A drainer keeps its target's draining key (relay.delivery.wakeups.draining_key)
#: from its second claim that found work, renewed this often while it drains.
DRAINING_RENEW_S = 1.0
#: A drainer keeps the key while its attempts end within this: an event whose
#: wake-up is skipped waits for the drainer's next claim, after the next end.
DRAINING_SOON_S = 0.05
#: The longest a drainer waits for Redis to keep or delete that key.
DRAINING_REDIS_S = 0.5

#: A process draining backlogs of two targets or more hands them to idle processes:
#: a drainer with a backlog, of a cap that can be shared (two parts of
#: claims.SHARE_MIN_PART or more) that no other process's drainer shares, asks for
#: help this often (HELP_KEY) while its process has another backlog; a process with
#: no backlog of its own takes the ask (one process per ask) and drains the target;
#: once another process's drainer shares the cap and claims a backlog (HANDED_S),
#: the asking drainer gives its part up, claims no more and ends, unless a wake-up
#: comes meanwhile (then it claims again, sharing). Without it a backlog stays with
#: the process that was woken for it: in
#: durable_ratio.py's drain (no ingest, so no wake-up after the first two), one
#: worker process took both targets' wake-ups at its start and sent every delivery
#: at ~80 % of a core while the other idled at 5 %.
HELP_EVERY_S = 0.2
#: An ask lapses after this, unless its drainer renews it.
HELP_TTL_S = 1.0
#: A process with no backlog looks for asks this often, and up to HELP_IDLE_POLL_S
#: (doubling) while there are none.
HELP_POLL_S = 0.1
HELP_IDLE_POLL_S = 1.0
#: An asking drainer hands its target over only to a drainer whose claims found a
#: backlog this recently, and ends without a timer only if one still does.
HANDED_S = 1.0
#: The asks a process reads per look (it takes the first it does not drain already).
HELP_TAKE = 4


@dataclass
class _Handover:
    """One drainer's asks for help and its handing over of the target (HELP_EVERY_S)."""

    #: when it last asked an idle process for help (None: not since its process had
    #: one backlog only)
    asked_at: float | None = None
    #: it leaves the target to another process's drainer: it claims no more
    handing_off: bool = False


class _Queued(NamedTuple):
    """A delivery leased ahead of the drainer's part of the cap (migration 0024): its
    attempt starts, with what its claim read, as one of the drainer's attempts ends."""

    target: SendTarget
    sealed: tuple[list[str], dict[str, str]]
    row: Claimed
    #: when its lease no longer outlasts an attempt (Engine._attempt gives it back)
    deadline: float
    #: the slots it holds (slot_weight)
    weight: int


#: A drainer alone on a target with a closed breaker leases this many times its part
#: of the cap ahead (migration 0024), while its attempts all succeed and end within
#: DRAINING_SOON_S: the rows past the part wait in its process, and one starts the
#: moment an attempt ends, while the next claim is made. Without it, every slot of
#: the cap waited ~40 % of the time for the next claim (bench/drain.py: a cycle of
#: 32 took 10.3 ms, 4.15 of it the claim, 3.06 waiting for the record).
AHEAD_PARTS = 1

#: Deliveries a drainer claims first, before it knows the target's own cap.
FIRST_CLAIM = 10
#: A drainer kept out of its target's cap by other processes' drainers (a backlog
#: they hold) claims again after this, doubling up to the longest wait.
KEPT_OUT_WAIT_S = 0.005
KEPT_OUT_MAX_WAIT_S = 0.1


class _Round(NamedTuple):
    """What a drainer's last claim found."""

    #: the target as read (None: not read yet, or gone)
    target: SendTarget | None
    #: a further claim may find more
    more: bool
    #: due deliveries were left because other processes' drainers fill the cap
    kept_out: bool
    #: the claim keeps a share of the cap for this drainer (ended with the drainer)
    sharing: bool
    #: drainers of other processes sharing the cap
    sharers: int
    #: a look instead of a claim found nothing due: what it saw (None: a claim)
    looked: claims.LastLook | None = None


#: A body this large is signed on a thread of the engine's, not on the event loop:
#: HMAC-SHA256 of a 900 KB body takes ~2 ms (it lets the GIL go), a quarter of the
#: loop's time while a tenant sent such bodies to many targets (issue 21: another
#: tenant's delivery p50 was 139-154 ms under that noise, 97-111 ms signed here).
SIGN_ON_THREAD_BYTES = 64 * 1024
#: Threads that sign large bodies, per worker process.
SIGNING_THREADS = 2
#: An attempt holds one slot per this many bytes of its payload (at least one): a
#: tenant's share of the slots bounds the bytes it has in flight, not only its
#: attempts. Before, a tenant sending 900 KB events to ten targets held 192 of a
#: process's 256 slots with them (170 MB in flight), and the loop spent its time
#: writing them: another tenant's delivery p50 was 265-312 ms (issue 21).
SLOT_BYTES = 64 * 1024


#: Targets whose last claim's weight a process remembers at most (then it forgets all).
MAX_WEIGHT_HINTS = 10_000


def slot_weight(payload_bytes: int) -> int:
    """The slots an attempt with a payload of ``payload_bytes`` holds."""
    return max(1, -(-payload_bytes // SLOT_BYTES))


class Engine:
    """One worker process's deliveries: a drainer per woken target, slots shared fairly."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.slots = FairSlots(ctx.settings.worker_concurrency)
        #: the pool's connections, shared by tenants as attempt slots are
        self.connections = FairSlots(POOL_SIZE, tenant_share=TENANT_CONNECTION_SHARE)
        self.lease_s = ctx.settings.delivery_timeout_s + LEASE_MARGIN_S
        self._drainers: dict[str, asyncio.Task[None]] = {}
        self._rewake: set[str] = set()
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        #: until when (monotonic) this process marked each target rate-limited
        self._rate_marked: dict[str, float] = {}
        self._closing = False
        self._signing = ThreadPoolExecutor(SIGNING_THREADS, thread_name_prefix="relay-sign")
        #: this process's drainers, as they share targets' caps with other processes'
        self.holder = new_id("drn")
        #: the slots each attempt in flight holds, when more than one (slot_weight)
        self._weights: dict[asyncio.Task[_Sent | Claimed], int] = {}
        #: per target, the slots its last claim's attempts held on average
        self._weight_hint: dict[str, int] = {}
        self._helping: asyncio.Task[None] | None = None
        #: targets whose drainer's last claim left due deliveries behind (a backlog)
        self._backlogged: set[str] = set()
        self._asks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Take other processes' asks for help with their backlogs (HELP_POLL_S)."""
        if self._helping is None:
            self._helping = asyncio.get_running_loop().create_task(self._take_asks())

    # --- waking ---------------------------------------------------------------

    def wake(self, target_id: str, tenant_id: str) -> None:
        """Drain ``target_id`` (again, if a drainer is at it: it claims once more)."""
        if self._closing:
            return
        if target_id in self._drainers:
            self._rewake.add(target_id)
            return
        task = asyncio.get_running_loop().create_task(self._drain(target_id, tenant_id))
        self._drainers[target_id] = task
        task.add_done_callback(partial(self._drainer_done, target_id, tenant_id))

    async def wake_taken(self, target_id: str, tenant_id: str) -> None:
        """A wake-up taken from the broker: delete its woken key (relay.delivery.wakeups
        .woken_key), then drain. The delete comes first, so what is committed after it
        gets a wake-up of its own, and what was committed before it this drain claims."""
        try:
            async with asyncio.timeout(DRAINING_REDIS_S):
                await self.ctx.redis.delete(woken_key(target_id))
        except Exception as exc:  # it lapses (WOKEN_TTL_MS); the sweeper backs it up
            log.warning("woken key of %s not deleted: %s", target_id, type(exc).__name__)
        self.wake(target_id, tenant_id)

    def _drainer_done(self, target_id: str, tenant_id: str, task: asyncio.Task[None]) -> None:
        if self._drainers.get(target_id) is task:
            del self._drainers[target_id]
        if not task.cancelled() and task.exception() is not None:
            # the deliveries stay in Postgres: the sweeper wakes the target again
            log.error("drainer of %s failed: %r", target_id, task.exception())
        if target_id in self._rewake:
            # woken after the drainer's last claim (while it looked for its next due
            # time, or failed): the wake-up is not lost to the sweeper's 30 s
            self._rewake.discard(target_id)
            self.wake(target_id, tenant_id)

    def wake_later(self, target_id: str, tenant_id: str, delay_s: float) -> None:
        """Wake the target in ``delay_s`` (one timer per target: the earliest wins)."""
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay_s)
        current = self._timers.get(target_id)
        if current is not None and current[0] <= when:
            return
        if current is not None:
            current[1].cancel()
        handle = loop.call_at(when, self._timer_fired, target_id, tenant_id)
        self._timers[target_id] = (when, handle)

    def _timer_fired(self, target_id: str, tenant_id: str) -> None:
        self._timers.pop(target_id, None)
        self.wake(target_id, tenant_id)

    async def close(self, timeout_s: float) -> None:
        """Claim nothing more; let attempts in flight end and be recorded (up to ``timeout_s``)."""
        self._closing = True
        if self._helping is not None:
            self._helping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._helping
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self.slots.close()
        drainers = list(self._drainers.values())
        if drainers:
            _, late = await asyncio.wait(drainers, timeout=timeout_s)
            for task in late:
                task.cancel()  # their leases lapse; the sweeper resends them
        self._signing.shutdown(wait=False, cancel_futures=True)

    # --- helping other processes ----------------------------------------------

    async def _ask_or_hand_over(
        self, target_id: str, tenant_id: str, claim: _Round, handover: _Handover
    ) -> bool:
        """After a claim: note whether the target has a backlog; while this process has
        another, ask an idle process for help, or hand the target over once that
        process drains it. True: the drainer has just started handing over (its share
        of the cap is to be given up at once)."""
        if claim.more or claim.kept_out:
            self._backlogged.add(target_id)
        else:
            self._backlogged.discard(target_id)
        if len(self._backlogged) < 2:
            handover.asked_at = None
            return False
        if (
            handover.asked_at is not None
            and claim.sharers
            and await self._another_drains(target_id, tenant_id)
        ):
            # a process that took the ask drains the target: it gets the whole cap
            # as this drainer's attempts end (taken back by a wake-up, the drainer
            # hands over again while that process drains: it still asked)
            handover.handing_off = True
            self._backlogged.discard(target_id)
            return True
        if (
            claim.more
            and claim.sharers == 0
            and claim.target is not None
            and claim.target.max_in_flight >= 2 * claims.SHARE_MIN_PART
            and (handover.asked_at is None or time.monotonic() - handover.asked_at >= HELP_EVERY_S)
        ):
            handover.asked_at = self._ask_help(target_id, tenant_id)
        return False

    def _ask_help(self, target_id: str, tenant_id: str) -> float:
        """Ask an idle process to take the target over (until HELP_TTL_S), in the
        background (a stalled Redis holds no claim); when."""
        task = asyncio.get_running_loop().create_task(self._send_ask(target_id, tenant_id))
        self._asks.add(task)
        task.add_done_callback(self._asks.discard)
        return time.monotonic()

    async def _send_ask(self, target_id: str, tenant_id: str) -> None:
        now = time.time()
        try:
            async with asyncio.timeout(DRAINING_REDIS_S):
                pipe = self.ctx.redis.pipeline(transaction=False)
                pipe.zadd(HELP_KEY, {help_member(target_id, tenant_id): (now + HELP_TTL_S) * 1000})
                pipe.zremrangebyscore(HELP_KEY, "-inf", now * 1000)
                await pipe.execute()
        except Exception as exc:  # best effort: the backlog is sent all the same
            log.debug("help with %s not asked: %s", target_id, type(exc).__name__)

    async def _take_asks(self) -> None:
        """While this process has no backlog, drain a target another process asks help
        with: each ask is taken by one process (ZREM)."""
        redis = self.ctx.redis
        wait_s = HELP_POLL_S
        while not self._closing:
            await asyncio.sleep(wait_s)
            if self._backlogged:
                wait_s = HELP_POLL_S
                continue
            wait_s = min(2 * wait_s, HELP_IDLE_POLL_S)
            try:
                async with asyncio.timeout(DRAINING_REDIS_S):
                    asks = await redis.zrangebyscore(
                        HELP_KEY, time.time() * 1000, "+inf", start=0, num=HELP_TAKE
                    )
                    if asks:
                        wait_s = HELP_POLL_S
                    for ask in asks:
                        target_id, tenant_id = help_asked(ask)
                        if target_id not in self._drainers and await redis.zrem(HELP_KEY, ask):
                            # a backlog of this process's now: it takes no other ask
                            # while its drainer waits for room in the target's cap
                            self._backlogged.add(target_id)
                            self.wake(target_id, tenant_id)
                            break
            except Exception as exc:
                log.debug("asks for help not read: %s", type(exc).__name__)

    @contextlib.asynccontextmanager
    async def _connection(self, tenant_id: str) -> AsyncIterator[Conn]:
        """A pooled connection, in the tenant's turn and within its share; TimeoutError
        after ACQUIRE_TIMEOUT_S (the tenant's turn and the pool's wait together)."""
        async with asyncio.timeout(ACQUIRE_TIMEOUT_S) as deadline:
            granted = await self.connections.acquire(tenant_id, 1)
        try:
            remaining = max(0.001, (deadline.when() or 0.0) - asyncio.get_running_loop().time())
            async with self.ctx.pool.acquire(timeout=remaining) as conn:
                yield conn
        finally:
            self.connections.release(tenant_id, granted)

    # --- one target -------------------------------------------------------------

    async def _drain(self, target_id: str, tenant_id: str) -> None:
        in_flight: set[asyncio.Task[_Sent | Claimed]] = set()
        claim = _Round(None, True, False, False, 0)
        kept_out_wait = KEPT_OUT_WAIT_S
        sharing = False
        # the record of the attempts that ended last, made while the next claim is
        recording: asyncio.Task[bool] | None = None
        ending: list[str] = []
        # claims that found work; when this drainer last renewed the draining key;
        # whether it deleted the key since its last claim (one more claim is owed)
        found = 0
        kept_at: float | None = None
        owed = False
        # how long the last wait for an attempt to end took
        waited_s = 0.0
        handover = _Handover()
        # the last claim left due deliveries (it took all it asked, or was kept out)
        backlog = False
        # the last claim took all that was due (fewer than it asked, none kept out by
        # the cap) and no wake-up came since: once attempts that all succeeded end, a
        # look at the target decides whether to claim (one cheap round trip, and the
        # drainer's last look too, where the claim that found nothing was two more)
        settled = False
        # leased ahead of this drainer's part of the cap, started as attempts end; and
        # whether the attempts that ended last all succeeded (it leases ahead only then)
        queued: deque[_Queued] = deque()
        clean = False
        try:
            while True:
                if handover.handing_off and target_id in self._rewake:
                    handover.handing_off = False  # woken meanwhile: it claims again, sharing
                if target_id in self._rewake:
                    settled = False
                self._rewake.discard(target_id)
                if claim.more and not self._closing and not handover.handing_off:
                    try:
                        started = len(in_flight) + len(queued)
                        look = (
                            settled
                            and clean
                            and kept_at is None
                            and not owed
                            and not queued
                            and not handover.handing_off
                        )
                        owed = False
                        ahead = (
                            clean
                            and waited_s < DRAINING_SOON_S
                            and not handover.handing_off
                            and claim.sharers == 0
                            and claim.target is not None
                            and claim.target.breaker == "closed"
                            and not claim.target.failing
                            # (a rate limit's tokens are taken at the claim: none ahead)
                            and claim.target.rate_limit is None
                        )
                        claim = await self._claim_more(
                            target_id,
                            tenant_id,
                            claim,
                            in_flight,
                            ending,
                            queued,
                            ahead=ahead,
                            look=look,
                        )
                        if claim.looked is None:
                            # (a claim trimmed by others' leases, or by a breaker not
                            # closed, also takes fewer than it asked: then it claims)
                            settled = (
                                not claim.more
                                and not claim.kept_out
                                and claim.sharers == 0
                                and claim.target is not None
                                and claim.target.breaker == "closed"
                            )
                        sharing = sharing or claim.sharing
                        backlog = claim.more or claim.kept_out
                        fresh = len(in_flight) + len(queued) > started  # it found work
                        found += fresh
                        keep = fresh and found >= 2 and self._keeps_target(claim, waited_s)
                        if keep and (
                            kept_at is None or time.monotonic() - kept_at > DRAINING_RENEW_S
                        ):
                            kept_at = await self._keep_draining(target_id)
                        elif not keep and kept_at is not None:
                            kept_at, owed = None, await self._stop_draining(target_id)
                        handed = await self._ask_or_hand_over(target_id, tenant_id, claim, handover)
                        if handed and queued:
                            # what it leased ahead and did not start goes to the process
                            # the target went to (due at once, no attempt spent), whose
                            # next claim takes it; before, this drainer started it after
                            # the handover (test_cap_shares' handover test: 3 attempts
                            # of 1,209 in one CI run)
                            await self._release(
                                tenant_id, self._unqueue(tenant_id, queued), delay_s=0.0
                            )
                        if handed and sharing:
                            sharing = False
                            await self._end_share(target_id, tenant_id)
                    except (*POSTGRES_DOWN, TimeoutError) as exc:
                        log.warning("claim of %s failed: %s", target_id, type(exc).__name__)
                        self.wake_later(target_id, tenant_id, 1.0)
                        claim = claim._replace(more=False, kept_out=False, looked=None)
                if recording is not None:
                    promoted = await recording
                    recording, ending = None, []
                    if promoted:  # the next of a key was made due: claim, do not look
                        settled = False
                    if (
                        promoted
                        and not in_flight
                        and not self._closing
                        and not (
                            handover.handing_off
                            and await self._another_drains(target_id, tenant_id)
                        )
                    ):
                        # the record let the next of a key go, after the claim looked
                        # (the process the target is handed to claims it, if it drains)
                        claim = claim._replace(more=True)
                        handover.handing_off = False
                        continue
                if self._closing and queued:
                    # none is started once the engine closes: given back, and another
                    # process is woken for them once this drainer ends
                    backlog = True
                    await self._give_back(target_id, tenant_id, queued)
                self._start_queued(tenant_id, in_flight, queued, self._part(claim))
                if not in_flight:
                    if self._closing:
                        break
                    if target_id in self._rewake:
                        claim = claim._replace(more=True)
                        continue
                    if claim.kept_out and not handover.handing_off:
                        # other processes' drainers hold the cap: their part of it
                        # shrinks to make room for this one's (claims.claim_share);
                        # (a drainer handing the target over claims no more: it ends)
                        await asyncio.sleep(kept_out_wait)
                        kept_out_wait = min(2 * kept_out_wait, KEPT_OUT_MAX_WAIT_S)
                        claim = claim._replace(more=True)
                        continue
                    if kept_at is not None:
                        kept_at, owed = None, await self._stop_draining(target_id)
                    if owed and not handover.handing_off:
                        # the gateway skipped wake-ups while the key was kept: what
                        # was committed before it was deleted, this last claim finds
                        # (or the drainer the target is handed to)
                        claim = claim._replace(more=True)
                        continue
                    if handover.handing_off and not await self._another_drains(
                        target_id, tenant_id
                    ):
                        # the process it was handed to drains it no more (it ended or
                        # handed it back): what is due now sets no timer, so claim
                        handover.handing_off = False
                        claim = claim._replace(more=True)
                        continue
                    break
                kept_out_wait = KEPT_OUT_WAIT_S
                waiting_since = time.monotonic()
                done = await self._wait_some(tenant_id, in_flight)
                waited_s = time.monotonic() - waiting_since
                clean = all(isinstance(t, _Sent) and t.attempt.status == "succeeded" for t in done)
                if clean:
                    # what was leased ahead takes the ended attempts' places at once
                    self._start_queued(tenant_id, in_flight, queued, self._part(claim))
                recording = asyncio.ensure_future(
                    self._record_ended(target_id, tenant_id, claim.target, done)
                )
                if clean:
                    # recorded while the next claim is made, which does not count
                    # their leases against the cap: they are not in flight any more
                    ending = [t.attempt.delivery.id for t in done if isinstance(t, _Sent)]
                else:
                    # a failure may open the breaker or disable the target, a
                    # skipped claim is given back: the next claim sees the record;
                    # what was leased ahead is given back unsent
                    await asyncio.wait({recording})
                    if queued:
                        await self._give_back(target_id, tenant_id, queued)
                claim = claim._replace(more=True)
        finally:
            self._backlogged.discard(target_id)
            # first what needs no waiting: attempts, slots, the gauge
            if in_flight:  # only when the drainer itself is cancelled or fails
                for task in in_flight:
                    task.cancel()
                self.slots.release(tenant_id, self._held_by(in_flight))
                ENGINE_IN_FLIGHT.dec(len(in_flight))
            self._unqueue(tenant_id, queued)  # likewise: their leases lapse, the sweeper wakes them
            current = asyncio.current_task()
            if recording is not None and current is not None and current.cancelling():
                recording.cancel()  # their leases lapse: the sweeper resends them
            elif recording is not None:  # the drainer failed: what was answered is kept
                await asyncio.wait({recording})
            if kept_at is not None or owed:  # closing or failed: another process claims
                if kept_at is not None:
                    await self._stop_draining(target_id)
                await self.ctx.enqueuer.wake([(target_id, tenant_id)])
                backlog = False
        if sharing:
            await self._end_share(target_id, tenant_id)
        if self._closing and backlog:
            # closing with a backlog left: another process claims it now, not the
            # sweeper seconds later (for a target handed over to this process, no
            # other drains it); after the share ended, so that it claims the whole cap
            await self.ctx.enqueuer.wake([(target_id, tenant_id)])
        target = claim.target
        # a drainer still handing over ended because, as its loop last asked, the
        # process it went to drains the target: that one times it
        if target is not None and target.live and not self._closing and not handover.handing_off:
            await self._time_next(target_id, tenant_id, claim.looked)

    @staticmethod
    def _keeps_target(claim: _Round, waited_s: float) -> bool:
        """Whether a drainer after this claim is all its target can use, and claims
        again soon: its cap is too small to share with a drainer of another process
        (claims.SHARE_MIN_PART), and it took all it asked for (a backlog waits) or
        its attempts end quickly (its next claim comes within DRAINING_SOON_S)."""
        target = claim.target
        return (
            target is not None
            and target.max_in_flight < 2 * claims.SHARE_MIN_PART
            and (claim.more or waited_s < DRAINING_SOON_S)
        )

    async def _keep_draining(self, target_id: str) -> float:
        """Keep (or renew) the target's draining key; when. A failed call may have set
        it all the same: the caller treats the key as kept (it deletes it, and claims
        once more, before it ends)."""
        try:
            async with asyncio.timeout(DRAINING_REDIS_S):
                await self.ctx.redis.set(draining_key(target_id), self.holder, px=DRAINING_TTL_MS)
        except Exception as exc:
            log.debug("draining key of %s not kept: %s", target_id, type(exc).__name__)
        return time.monotonic()

    async def _stop_draining(self, target_id: str) -> bool:
        """Delete the target's draining key (the gateway wakes the target again); True:
        the caller owes one more claim, for what the gateway did not wake meanwhile."""
        try:
            async with asyncio.timeout(DRAINING_REDIS_S):
                await self.ctx.redis.delete(draining_key(target_id))
        except Exception as exc:  # it lapses (DRAINING_TTL_MS); the sweeper backs it up
            log.warning("draining key of %s not deleted: %s", target_id, type(exc).__name__)
        return True

    async def _claim_more(
        self,
        target_id: str,
        tenant_id: str,
        last: _Round,
        in_flight: set[asyncio.Task[_Sent | Claimed]],
        ending: list[str],
        queued: deque[_Queued],
        *,
        ahead: bool,
        look: bool = False,
    ) -> _Round:
        """Claim and start what the target's cap (this drainer's part of it), the slots
        and its rate limit allow (``ending``: leases whose attempts ended, being recorded);
        ``ahead``: lease AHEAD_PARTS parts more if alone on the target, into ``queued``;
        ``look``: first look whether anything is due, and claim only then."""
        last = last._replace(looked=None)
        target = last.target
        part = self._part(last)
        extra = AHEAD_PARTS * part if ahead else 0
        held = len(in_flight) + len(queued)
        # with no room, nothing is claimed: whether a backlog waits is as the last
        # claim found (a process asking for help goes on asking while its part of the
        # cap is full, and hands the target over once the helper drains it)
        room = part + extra - held
        if room <= 0:
            return last._replace(kept_out=False)
        if look:
            async with self._connection(tenant_id) as conn:
                seen = await claims.last_look(conn, target_id)
            if not seen.due:
                return last._replace(more=False, kept_out=False, looked=seen)
        slots = (
            self.slots.try_acquire(tenant_id, room)
            if held
            else await self.slots.acquire(tenant_id, room)
        )
        if slots == 0:
            return last._replace(kept_out=False)
        # as many as the slots hold, at the weight of the target's last claim's payloads;
        # if they do not hold one while the tenant has others in flight, wait for those
        hint = self._weight_hint.get(target_id, 1)
        if slots < hint:
            slots += self.slots.try_acquire(tenant_id, hint - slots)
            if slots < hint and self.slots.held[tenant_id] > slots:
                self.slots.release(tenant_id, slots)
                return last._replace(more=False, kept_out=not in_flight)
        want = max(1, slots // hint)
        limit = target.rate_limit if target is not None else None
        if limit is not None:
            want, wait_s = await self.ctx.limiter.take(f"tgt:{target_id}", limit, want)
            if want == 0:
                self.slots.release(tenant_id, slots)
                await self._mark_rate_limited(tenant_id, target_id, wait_s)
                if not in_flight:
                    await asyncio.sleep(min(wait_s, 1.0))
                    self._rewake.add(target_id)
                DELIVERIES.labels("rate-limited").inc()
                # the limit defers a backlog: what is due waits all the same
                return last._replace(more=True, kept_out=False)
        claimed_at = time.monotonic()
        try:
            async with self._connection(tenant_id) as conn:
                share = await claims.claim_share(
                    conn,
                    target_id,
                    want=want,
                    lease_s=self.lease_s,
                    holder=self.holder,
                    holding=held,
                    ending=ending,
                    ahead=extra,
                )
        except BaseException:
            self.slots.release(tenant_id, slots)
            raise
        fresh, rows = share.target, share.rows
        if queued and (
            fresh is None or not fresh.live or fresh.cooling or fresh.breaker != "closed"
        ):
            # gone, disabled or its breaker opened since they were leased: not sent
            try:
                await self._give_back(target_id, tenant_id, queued)
            except BaseException:  # cancelled (a close that timed out): their leases lapse
                self.slots.release(tenant_id, slots)
                raise
        if fresh is None:
            self.slots.release(tenant_id, slots)
            return _Round(None, False, False, share.sharing, 0)
        fresh_part = claims.part_of_cap(fresh.max_in_flight, share.sharers)
        if fresh.rate_limit is not None and limit is None and rows:
            # the first claim learnt of the limit: give back what it does not admit
            taken, wait_s = await self.ctx.limiter.take(
                f"tgt:{target_id}", fresh.rate_limit, len(rows)
            )
            if taken < len(rows):
                try:
                    await self._release(tenant_id, rows[taken:], delay_s=max(wait_s, 0.1))
                except BaseException:
                    self.slots.release(tenant_id, slots)
                    raise
                rows = rows[:taken]
                await self._mark_rate_limited(tenant_id, target_id, wait_s)
                DELIVERIES.labels("rate-limited").inc()
        weights = [slot_weight(len(row.payload)) for row in rows]
        kept = self.slots.weigh(tenant_id, weights, slots, first=not held)
        rows, given_back, weights = rows[:kept], rows[kept:], weights[:kept]
        if rows:
            if len(self._weight_hint) >= MAX_WEIGHT_HINTS:
                self._weight_hint.clear()
            self._weight_hint[target_id] = max(1, sum(weights) // len(rows))
            box = self._sealed(fresh)
            deadline = claimed_at + self.lease_s - LEASE_GUARD_S
            queued.extend(
                _Queued(fresh, box, row, deadline, weight)
                for row, weight in zip(rows, weights, strict=True)
            )
            self._start_queued(tenant_id, in_flight, queued, fresh_part)
        if given_back:
            # the tenant's share of the slots does not hold their payloads: given back
            # (after the kept ones' slots went to their attempts), due at once, claimed
            # again as its attempts end, or after a pause if it has none in flight
            await self._release(tenant_id, given_back, delay_s=0.0)
            return _Round(fresh, False, not rows, share.sharing, share.sharers)
        # a claim trimmed to this drainer's part of the cap (its part shrank since the
        # last claim: another process joined) takes fewer than it wanted, and leaves
        # a backlog all the same: it shares because as many were due as it asked
        more = len(rows) == want or (share.sharing and bool(rows))
        if not rows and held >= fresh_part:
            # asked to lease ahead, it found its part full (the cap is shared now, or
            # another drainer holds leases): as with no room, the backlog is as it was
            more = last.more
        return _Round(fresh, more, share.kept_out, share.sharing, share.sharers)

    @staticmethod
    def _part(claim: _Round) -> int:
        """The attempts a drainer may have in flight at once: its part of the cap."""
        cap = claim.target.max_in_flight if claim.target is not None else FIRST_CLAIM
        return claims.part_of_cap(cap, claim.sharers)

    def _start_queued(
        self,
        tenant_id: str,
        in_flight: set[asyncio.Task[_Sent | Claimed]],
        queued: deque[_Queued],
        part: int,
    ) -> None:
        """Start what is queued, in claim order, while fewer than ``part`` are in flight
        (nothing once the engine closes: what is queued is given back)."""
        if self._closing:
            return
        started = 0
        loop = asyncio.get_running_loop()
        while queued and len(in_flight) < part:
            q = queued.popleft()
            task = loop.create_task(self._attempt(q.target, q.sealed, q.row, q.deadline))
            in_flight.add(task)
            if q.weight > 1:
                self._weights[task] = q.weight
            started += 1
        ENGINE_IN_FLIGHT.inc(started)

    def _unqueue(self, tenant_id: str, queued: deque[_Queued]) -> list[Claimed]:
        """Empty ``queued``, its slots released; its claims."""
        rows = [q.row for q in queued]
        self.slots.release(tenant_id, sum(q.weight for q in queued))
        queued.clear()
        return rows

    async def _give_back(self, target_id: str, tenant_id: str, queued: deque[_Queued]) -> None:
        """Give back what was leased ahead and not started, due at once, no attempt spent."""
        rows = self._unqueue(tenant_id, queued)
        try:
            await self._release(tenant_id, rows, delay_s=0.0)
        except Exception as exc:  # their leases lapse: the sweeper wakes them
            log.warning("release of %d claims of %s failed: %r", len(rows), target_id, exc)
        self._rewake.add(target_id)

    def _held_by(self, tasks: Iterable[asyncio.Task[_Sent | Claimed]]) -> int:
        """The slots ``tasks`` hold, forgetting their weights."""
        return sum(self._weights.pop(task, 1) for task in tasks)

    async def _another_drains(self, target_id: str, tenant_id: str) -> bool:
        """Whether another process's drainer claimed a backlog of the target lately."""
        try:
            async with self._connection(tenant_id) as conn:
                return await claims.another_drains(conn, target_id, self.holder, within_s=HANDED_S)
        except (*POSTGRES_DOWN, TimeoutError):
            return False

    async def _end_share(self, target_id: str, tenant_id: str) -> None:
        """Give this drainer's part of the target's cap back to the other drainers."""
        try:
            async with self._connection(tenant_id) as conn:
                await claims.end_share(conn, target_id, self.holder)
        except (*POSTGRES_DOWN, TimeoutError):
            pass  # it lapses (claims.SHARE_S)

    async def _mark_rate_limited(self, tenant_id: str, target_id: str, wait_s: float) -> None:
        """Let the API say that due deliveries wait for the rate limit (waiting_for).

        The mark in Postgres lasts until the limiter's window has room plus
        ``RATE_MARK_S``, renewed while deferrals go on (at most about twice a
        second per target and process); it lapses by itself. Best effort: a
        failure costs only what the API shows.
        """
        now = time.monotonic()
        until = now + max(wait_s, 0.0) + RATE_MARK_S
        if self._rate_marked.get(target_id, 0.0) >= until - RATE_MARK_S / 2:
            return
        try:
            async with self._connection(tenant_id) as conn:
                await claims.mark_rate_limited(conn, target_id, for_s=until - now)
        except Exception as exc:
            log.warning("rate-limit mark of %s failed: %r", target_id, exc)
            return
        self._rate_marked[target_id] = until

    def _sealed(self, target: SendTarget) -> tuple[list[str], dict[str, str]]:
        """The target's signing secrets (both during a rotation's overlap) and its headers."""
        box = self.ctx.secrets
        secrets = [box.open(target.secret_enc, bound_to=target.id)]
        rotated = target.secret_rotated_at
        if (
            target.previous_secret_enc is not None
            and rotated is not None
            and rotated.timestamp() + self.settings.secret_overlap_s > time.time()
        ):
            secrets.append(box.open(target.previous_secret_enc, bound_to=target.id))
        return secrets, open_headers(box, target.id, target.headers_enc)

    async def _attempt(
        self,
        target: SendTarget,
        sealed: tuple[list[str], dict[str, str]],
        row: Claimed,
        deadline: float,
    ) -> _Sent | Claimed:
        """One attempt; the claim itself if its lease no longer outlasts the timeout."""
        if time.monotonic() + self.settings.delivery_timeout_s > deadline:
            return row
        secrets, target_headers = sealed
        started_at = datetime.now(UTC)
        started = time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        response_body: str | None = None
        retry_after: float | None = None
        try:
            sign = partial(
                delivery_headers,
                event_id=row.event_id,
                body=row.payload,
                secrets=secrets,
                timestamp=int(time.time()),
                target_headers=target_headers,
            )
            if len(row.payload) < SIGN_ON_THREAD_BYTES:
                headers = sign()
            else:
                headers = await asyncio.get_running_loop().run_in_executor(self._signing, sign)
            response = await self.ctx.egress.post(target.url, row.payload, headers)
            status_code = response.status
            response_body = response.body.decode("utf-8", "replace").replace("\x00", "")
            retry_after = parse_retry_after(response.headers.get("Retry-After"), started_at)
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
        except (EgressRefused, aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = describe_error(exc)
        except Exception as exc:  # whatever happens, the attempt is recorded
            # The text may quote what was sent: mask the target's header values.
            error = "unexpected error: " + _redact(describe_error(exc), target_headers.values())
            log.error(
                "attempt raised",
                extra={"delivery_id": row.id, "target_id": target.id, "error": error},
            )
        elapsed = time.perf_counter() - started
        ATTEMPT_LATENCY.labels(status_class(status_code)).observe(elapsed)
        outcome = decide(
            status_code=status_code,
            attempt_number=row.attempt_count + 1,
            schedule=self.settings.retry_schedule,
            retry_after_s=retry_after,
        )
        carried = (
            outcome.delay_s + self.settings.requeue_after_s
            if outcome.delay_s is not None and outcome.delay_s <= SHORT_WAIT_S
            else None
        )
        attempt = Attempt(
            delivery=row,
            started_at=started_at,
            duration_ms=int(elapsed * 1000),
            status_code=status_code,
            error=error if outcome.reason is None else f"{error}; {outcome.reason}",
            response_body=response_body,
            status=outcome.status,  # type: ignore[arg-type]
            delay_s=outcome.delay_s,
            carried_for_s=carried,
            disable_reason=outcome.disable_target,
        )
        return _Sent(attempt, trips_breaker(status_code, error))

    async def _wait_some(
        self, tenant_id: str, in_flight: set[asyncio.Task[_Sent | Claimed]]
    ) -> list[_Sent | Claimed]:
        """Wait for attempts to end (and briefly for others, to record together)."""
        done, pending = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            more, _ = await asyncio.wait(pending, timeout=GATHER_S)
            done |= more
        in_flight -= done
        self.slots.release(tenant_id, self._held_by(done))
        ENGINE_IN_FLIGHT.dec(len(done))
        return [t.result() for t in done]

    async def _record_ended(
        self,
        target_id: str,
        tenant_id: str,
        target: SendTarget | None,
        ended: list[_Sent | Claimed],
    ) -> bool:
        """Record the attempts that ended, together; True if that may have made the
        next of an ordering key due."""
        sent = [s for s in ended if isinstance(s, _Sent)]
        skipped = [c for c in ended if isinstance(c, Claimed)]
        if skipped:
            # started too late to end within the lease (a stalled loop or Postgres)
            log.warning("%d claims of %s given back unsent", len(skipped), target_id)
            try:
                await self._release(tenant_id, skipped, delay_s=0.0)
            except Exception as exc:  # their leases lapse: the sweeper wakes them
                log.warning("release of %s failed: %r", target_id, exc)
            self._rewake.add(target_id)
        if not sent:
            return False
        clean = (
            target is not None and target.breaker == "closed" and not target.consecutive_failures
        )
        healthy = all(s.trips is False for s in sent)
        breaker = None if clean and healthy else self._breaker_update(sent)
        recorded = await self._record_while_leased(
            target_id,
            tenant_id,
            [s.attempt for s in sent],
            breaker,
            failing=None if target is None else target.failing,
        )
        # counted once per outcome and batch: a metric's write takes a lock in every process
        outcomes = Counter(
            s.attempt.status if s.attempt.delivery.id in recorded else "lease-lost" for s in sent
        )
        for outcome, count in outcomes.items():
            DELIVERIES.labels(outcome).inc(count)
        logging_attempts = log.isEnabledFor(logging.INFO)
        for s in sent:
            a = s.attempt
            if a.delivery.id not in recorded:
                continue
            if a.delay_s is not None and a.carried_for_s is not None:
                self.wake_later(target_id, tenant_id, a.delay_s)
            if not logging_attempts:
                continue
            log.info(
                "attempt",
                extra={
                    "delivery_id": a.delivery.id,
                    "event_id": a.delivery.event_id,
                    "target_id": target_id,
                    "tenant_id": tenant_id,
                    "status": a.status_code,
                    "outcome": a.status,
                    "attempt": a.delivery.attempt_count + 1,
                    "duration_ms": a.duration_ms,
                },
            )
        return any(
            s.attempt.delivery.order_key is not None and s.attempt.status in ("succeeded", "dead")
            for s in sent
        )

    def _breaker_update(self, sent: Iterable[_Sent]) -> Callable[[Breaker], Breaker]:
        ends = [(s.trips, s.attempt.error or f"HTTP {s.attempt.status_code}") for s in sent]
        settings = self.settings

        def update(before: Breaker) -> Breaker:
            return next_breaker(
                before,
                ends,
                threshold=settings.breaker_threshold,
                open_s=settings.breaker_open_s,
                max_open_s=settings.breaker_max_open_s,
            )

        return update

    async def _record_while_leased(
        self,
        target_id: str,
        tenant_id: str,
        attempts: list[Attempt],
        breaker: Callable[[Breaker], Breaker] | None,
        *,
        failing: bool | None,
    ) -> set[str]:
        """Record, retrying while the leases still hold; return the ids recorded.

        An attempt whose result cannot be recorded is made again once its lease
        lapses (a duplicate for the receiver), so a Postgres restart is waited
        out for as long as the leases last; past that the record (conditional on
        each lease) keeps only what is still ours. Any other error (a deadlock, a
        statement Postgres refused) is logged and the record made again the same
        way: it never ends the drainer, whose attempts still in flight would be
        cut off and sent again. Past the leases, nothing is recorded here. A
        breaker the record opened or closed is logged once it is committed.
        """
        lease_end = min(a.delivery.locked_until for a in attempts)
        remaining_s = max(1.0, (lease_end - datetime.now(UTC)).total_seconds())

        def failed(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            log.warning(
                "record of %d attempts of %s failed (%s: %s); recording again",
                len(attempts),
                target_id,
                type(exc).__name__,
                str(exc)[:200],
                extra={"target_id": target_id, "attempt": state.attempt_number},
            )

        try:
            async for retry in AsyncRetrying(
                retry=retry_if_exception_type(Exception),
                wait=wait_exponential(multiplier=0.2, max=2),
                stop=stop_after_delay(remaining_s),
                before_sleep=failed,
                reraise=True,
            ):
                with retry:
                    changes: list[BreakerChange] = []
                    async with self._connection(tenant_id) as conn:
                        recorded = await claims.record_batch(
                            conn,
                            target_id,
                            attempts,
                            breaker=breaker,
                            failing=failing,
                            grace_s=self.settings.requeue_after_s,
                            on_breaker=changes.append,
                            recovered_after_s=self.settings.recovered_after_s,
                        )
                    for change in changes:
                        log_breaker_change(change, target_id=target_id, tenant_id=tenant_id)
                    return set(recorded)
        except Exception as exc:
            # the leases have lapsed: these attempts are made again, as after kill -9
            log.error(
                "record of %d attempts of %s failed until their leases lapsed: %r",
                len(attempts),
                target_id,
                exc,
                extra={"target_id": target_id},
            )
            return set()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _release(self, tenant_id: str, rows: list[Claimed], *, delay_s: float) -> None:
        async with self._connection(tenant_id) as conn:
            await claims.release_batch(
                conn, rows, delay_s=delay_s, carried_for_s=self.settings.requeue_after_s
            )

    async def _time_next(
        self, target_id: str, tenant_id: str, looked: claims.LastLook | None = None
    ) -> None:
        """Leave a timer for the target's next waiting delivery, if it falls due soon
        (``looked``: as the drainer's last look saw it, else read now)."""
        if looked is None:
            try:
                async with self._connection(tenant_id) as conn:
                    looked = await claims.last_look(conn, target_id)
            except (*POSTGRES_DOWN, TimeoutError):
                return  # the sweeper wakes it
        due_in, open_until = looked.due_in, looked.open_until
        if open_until is not None:
            due_in = max(due_in or 0.0, (open_until - datetime.now(UTC)).total_seconds())
        if due_in is not None and due_in <= SHORT_WAIT_S:
            self.wake_later(target_id, tenant_id, due_in + 0.05)


def log_breaker_change(change: BreakerChange, *, target_id: str, tenant_id: str) -> None:
    """One line per breaker that opened (WARNING: why, until when) or closed (INFO)."""
    if change.after.open_for_s is not None:
        BREAKER_OPENED.inc()
        log.warning(
            "circuit breaker opened",
            extra={
                "target_id": target_id,
                "tenant_id": tenant_id,
                "reason": change.after.reason,
                "until": None if change.until is None else change.until.isoformat(),
            },
        )
    else:
        log.info(
            "circuit breaker closed",
            extra={
                "target_id": target_id,
                "tenant_id": tenant_id,
                "reason": f"an attempt succeeded after it was {change.before.state}",
            },
        )


def _redact(text: str, values: Iterable[str]) -> str:
    """``text`` with every non-empty value in ``values`` masked."""
    for value in values:
        if value:
            text = text.replace(value, "••••")
    return text
