"""Putting delivery ids on the broker, from the gateway, the sweeper or the worker.

The broker only carries work: Postgres decides what is due. So an enqueue
that fails is logged and forgotten; the sweeper finds the delivery again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dramatiq
import redis.exceptions
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.errors import ConnectionClosed
from redis.backoff import NoBackoff
from redis.retry import Retry
from yarl import URL

log = logging.getLogger(__name__)

QUEUE = "deliveries"
#: One message means "this target has due work": the worker drains it from Postgres.
WAKE_ACTOR = "wake_target"
#: One message per delivery: what workers before the engine enqueued (still honoured).
DELIVER_ACTOR = "deliver"
#: Bulk replays run on their own queue so they never wait behind a delivery backlog.
REPLAY_QUEUE = "replays"
REPLAY_ACTOR = "replay_dead_letters"
#: Added to every broker delay, so a message never arrives before its row is due.
DELAY_MARGIN_S = 0.1
#: A broker call that takes longer has failed (the sweeper resends what it carried).
BROKER_SOCKET_TIMEOUT_S = 5.0
#: Threads of an Enqueuer's own executor: a hung broker blocks these, never the
#: default executor that DNS resolution (aiohttp's resolver) and others use.
ENQUEUE_THREADS = 4
#: After a send of wake-ups, the next waits this long, gathering what is asked
#: meanwhile: a busy gateway sends each target at most one wake-up per window.
WAKE_WINDOW_S = 0.002
#: Background enqueues one Enqueuer keeps at once; past that they are dropped
#: (logged) and left to the sweeper, so a stalled broker cannot grow memory.
MAX_PENDING = 1000
#: A drainer busy with a target (claiming batch after batch) keeps this long a key in
#: Redis that says so, renewed while it drains (workers/engine.py).
DRAINING_TTL_MS = 5000
#: The longest the gateway waits for the draining keys before it wakes them all.
DRAINING_READ_S = 0.25
#: A wake-up sent and not yet taken by a worker keeps a key this long: no other is
#: sent for its target meanwhile (by any gateway process), so that workers that are
#: down, or behind, find one wake-up a target on the broker, not one per commit.
WOKEN_TTL_MS = 5000
#: A send of wake-ups that set woken keys and failed is tried once more after this.
RESEND_AFTER_S = 0.5


def draining_key(target_id: str) -> str:
    """The Redis key a busy drainer of ``target_id`` keeps.

    The gateway sends no immediate wake-up for a target that has it: the drainer
    claims again anyway. A drainer deletes the key, then claims once more before
    it ends, so an event whose wake-up was skipped (committed before the gateway
    read the key, hence before the delete) is claimed by that last claim. At
    1,000 events/s to one target, the wake-ups were ~600 broker messages a second,
    each handled by a worker thread (and one more drainer in the other process).
    """
    return f"relay:draining:{target_id}"


#: The Redis sorted set where a drainer with a backlog that its process alone sends asks
#: other worker processes to share its target's cap (workers/engine.py): members are
#: "<target id> <tenant id>", scores the time (ms) each ask lapses.
HELP_KEY = "relay:help"


def help_member(target_id: str, tenant_id: str) -> str:
    """The member of HELP_KEY that asks for help with ``target_id``."""
    return f"{target_id} {tenant_id}"


def help_asked(member: bytes) -> tuple[str, str]:
    """The target and tenant a member of HELP_KEY asks help with."""
    target_id, tenant_id = member.decode().split(" ", 1)
    return target_id, tenant_id


def woken_key(target_id: str) -> str:
    """The Redis key that says a wake-up of ``target_id`` waits on the broker.

    The gateway sets it when it sends the wake-up and sends no other while it is
    there; the worker deletes it when it takes the wake-up, *before* it claims, so
    an event whose wake-up was skipped (committed before the gateway found the key,
    hence before the delete) is found by that claim. Before, a gateway whose
    workers were down sent each busy target a wake-up every 2 ms (WAKE_WINDOW_S),
    all left on the broker for the workers to take one by one when back.
    """
    return f"relay:woken:{target_id}"


# KEYS: each target's draining key then its woken key. ARGV[1]: WOKEN_TTL_MS.
# Returns the (1-based) positions of the targets to wake: neither key was there, and
# the woken key is now set (NX: of two gateway processes, one sends).
_TO_WAKE = """
local out = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0
      and redis.call('SET', KEYS[i + 1], '1', 'PX', ARGV[1], 'NX') then
    out[#out + 1] = (i + 1) / 2
  end
end
return out
"""


#: What a lost or stalled Redis raises; Dramatiq's consumer expects ConnectionClosed.
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class _Consumer(_RedisConsumer):
    """Dramatiq's Redis consumer, raising ConnectionClosed for every Redis outage.

    Dramatiq restarts a consumer on ConnectionClosed, but its Redis consumer lets
    the outage through as a redis error from ``requeue`` (and a timeout from every
    call), which ends the consumer thread for good: no delayed message (a short
    retry) would be moved to its queue again until the worker restarts.
    """

    def ack(self, message: Any) -> None:
        try:
            super().ack(message)  # type: ignore[no-untyped-call]
        except _REDIS_DOWN as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def nack(self, message: Any) -> None:
        try:
            super().nack(message)  # type: ignore[no-untyped-call]
        except _REDIS_DOWN as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def requeue(self, messages: Any) -> None:
        try:
            super().requeue(messages)  # type: ignore[no-untyped-call]
        except _REDIS_DOWN as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def __next__(self) -> Any:
        try:
            message = super().__next__()  # type: ignore[no-untyped-call]
            if message is None and self.outstanding_message_count < self.prefetch:
                # idle: wait for a sender's doorbell (or poll again after IDLE_POLL_MS)
                self.broker.client.blpop(
                    [doorbell(self.broker.namespace, self.queue_name)], IDLE_POLL_MS / 1000
                )
            return message
        except _REDIS_DOWN as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]


#: An idle Redis consumer waits this long on its queue's doorbell, then polls again
#: (Dramatiq alone backs off up to the worker timeout, a second, which would be the
#: latency of a wake-up after a lull).
IDLE_POLL_MS = 50
#: Dramatiq's back-off after a fetch that found nothing, before the doorbell's wait.
MISS_BACKOFF_MS = 2
#: Rings kept for consumers that were not waiting (each costs one fetch that finds
#: nothing); the key lapses when no consumer takes them.
DOORBELL_RINGS = 8
DOORBELL_TTL_MS = 60_000


def doorbell(namespace: str, queue_name: str) -> str:
    """The Redis list a sender pushes to after enqueueing on ``queue_name``.

    Dramatiq's Redis consumers poll; an idle one would see a message only at its
    next poll, up to IDLE_POLL_MS later (the e2e latency of a lull: p50 ~25 ms).
    Relay's consumers wait on this list between polls (BLPOP), so a send wakes one
    of them at once.
    """
    return f"{namespace}:{queue_name}.doorbell"


class _RelayRedisBroker(RedisBroker):
    """Dramatiq's Redis broker with a consumer that survives Redis outages."""

    @property
    def consumer_class(self) -> type[_Consumer]:
        return _Consumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        """A consumer that backs off MISS_BACKOFF_MS, then waits on its doorbell."""
        return super().consume(queue_name, prefetch, min(timeout, MISS_BACKOFF_MS))

    def ring(self, queue_names: Iterable[str]) -> None:
        """Wake a consumer of each queue waiting on its doorbell (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for queue_name in queue_names:
            key = doorbell(self.namespace, queue_name)
            pipe.lpush(key, 1)
            pipe.ltrim(key, 0, DOORBELL_RINGS - 1)
            pipe.pexpire(key, DOORBELL_TTL_MS)
        pipe.execute()


def make_broker(
    url: str, *, middleware: list[Any] | None = None, fail_fast: bool = False
) -> dramatiq.Broker:
    """The Dramatiq broker for a ``redis://`` or ``amqp://`` URL.

    ``fail_fast``: no retry of a Redis call that timed out (for senders that the
    sweeper backs up, so a hung broker holds a thread for one timeout, not four).
    """
    if url.startswith(("amqp://", "amqps://")):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        # pika takes its timeouts from the URL's query (unless the operator set them).
        timeouts = {
            "socket_timeout": str(BROKER_SOCKET_TIMEOUT_S),
            "blocked_connection_timeout": str(BROKER_SOCKET_TIMEOUT_S),
        }
        parsed = URL(url)
        url = str(parsed.update_query({**timeouts, **parsed.query}))
        return RabbitmqBroker(url=url, middleware=middleware)
    retry = {"retry": Retry(NoBackoff(), 0)} if fail_fast else {}
    return _RelayRedisBroker(  # type: ignore[no-untyped-call]
        url=url,
        middleware=middleware,
        socket_timeout=BROKER_SOCKET_TIMEOUT_S,
        socket_connect_timeout=BROKER_SOCKET_TIMEOUT_S,
        **retry,
    )


def deliver_message(delivery_id: str) -> dramatiq.Message[Any]:
    """The message that asks a worker to attempt one delivery."""
    return dramatiq.Message(
        queue_name=QUEUE, actor_name=DELIVER_ACTOR, args=(delivery_id,), kwargs={}, options={}
    )


def wake_message(target_id: str, tenant_id: str) -> dramatiq.Message[Any]:
    """The message that tells a worker a target has due work."""
    return dramatiq.Message(
        queue_name=QUEUE,
        actor_name=WAKE_ACTOR,
        args=(target_id, tenant_id),
        kwargs={},
        options={},
    )


class Enqueuer:
    """Enqueues from asyncio code; the broker clients are blocking, so its own threads do it."""

    def __init__(
        self, broker: dramatiq.Broker, *, max_pending: int = MAX_PENDING, draining: Any = None
    ) -> None:
        self._broker = broker
        #: the Redis (asyncio) where busy drainers and sent wake-ups keep their keys;
        #: None: wake them all
        self._draining = draining
        self._to_wake = draining.register_script(_TO_WAKE) if draining is not None else None
        self._pending: set[asyncio.Future[bool]] = set()
        self._max_pending = max_pending
        self._executor = ThreadPoolExecutor(ENQUEUE_THREADS, thread_name_prefix="relay-enqueue")
        #: (target, tenant) to wake, by delay, not yet taken by the waker
        self._waking: dict[float, dict[tuple[str, str], None]] = {}
        self._waker: asyncio.Future[None] | None = None

    @property
    def in_flight(self) -> int:
        """Background enqueues not finished yet (the wake-ups' sender counts as one)."""
        return len(self._pending) + (self._waker is not None)

    def _send(self, messages: list[dramatiq.Message[Any]], delay_ms: int | None) -> None:
        declared = self._broker.get_declared_queues()
        for message in messages:
            if message.queue_name not in declared:
                self._broker.declare_queue(message.queue_name)
                declared = self._broker.get_declared_queues()
            self._broker.enqueue(message, delay=delay_ms)
        if delay_ms is None and isinstance(self._broker, _RelayRedisBroker):
            try:
                self._broker.ring(dict.fromkeys(m.queue_name for m in messages))
            except _REDIS_DOWN as exc:  # sent: a consumer's next poll finds them
                log.debug("doorbell not rung: %s", type(exc).__name__)

    async def _send_async(
        self, messages: list[dramatiq.Message[Any]], delay_s: float, what: str
    ) -> bool:
        # A small margin so a delayed message never arrives before its row is due.
        delay_ms = int((delay_s + DELAY_MARGIN_S) * 1000) if delay_s > 0 else None
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._send, messages, delay_ms)
            return True
        except Exception as exc:
            log.warning("enqueue of %s failed: %s", what, type(exc).__name__)
            return False

    async def enqueue(self, delivery_ids: Iterable[str], *, delay_s: float = 0.0) -> bool:
        """Enqueue deliveries and wait; False (logged) if the broker is unreachable.

        What fails is not lost: the sweeper resends due deliveries.
        """
        messages = [deliver_message(i) for i in delivery_ids]
        if not messages:
            return True
        return await self._send_async(messages, delay_s, f"{len(messages)} deliveries")

    async def wake(self, targets: Iterable[tuple[str, str]], *, delay_s: float = 0.0) -> bool:
        """Tell workers that these (target, tenant) have due work; False if the broker is away."""
        messages = [wake_message(t, tenant) for t, tenant in dict.fromkeys(targets)]
        if not messages:
            return True
        return await self._send_async(messages, delay_s, f"{len(messages)} wake-ups")

    def wake_soon(self, targets: Iterable[tuple[str, str]], *, delay_s: float = 0.0) -> None:
        """``wake`` in the background (after the answer is sent), coalesced.

        Wake-ups asked for while a send is on its way wait for it to end, then
        go in one send, each target once: broker traffic follows the number of
        busy targets, not of requests. A wake-up asked for after a send was
        taken is sent again, so it always follows the commit that asked for it.
        """
        waiting = self._waking.setdefault(delay_s, {})
        for target in targets:
            if len(waiting) >= self._max_pending and target not in waiting:
                log.warning("broker backlog: wake-ups left to the sweeper")
                break
            waiting[target] = None
        if waiting and self._waker is None:
            self._waker = asyncio.ensure_future(self._send_wakes())

    async def _send_wakes(self) -> None:
        try:
            while self._waking:
                delay_s, waiting = self._waking.popitem()
                woken = list(waiting)
                marked = woken and delay_s <= 0 and self._to_wake is not None
                if marked:
                    woken = await self._unwoken(woken)
                if woken:
                    sent = await self.wake(woken, delay_s=delay_s)
                    if marked and not sent:
                        # other gateways skip these targets while the keys are there:
                        # send again once; then the keys go (the sweeper backs them up)
                        await asyncio.sleep(RESEND_AFTER_S)
                        if not await self.wake(woken, delay_s=delay_s):
                            await self._forget_woken(woken)
                    # what is asked meanwhile goes in the next send, each target once
                    await asyncio.sleep(WAKE_WINDOW_S)
        finally:
            self._waker = None

    async def _unwoken(self, targets: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The targets that no busy drainer keeps and no wake-up waits for, now marked
        as woken (all of them if Redis cannot say)."""
        assert self._to_wake is not None
        keys = [key for t, _ in targets for key in (draining_key(t), woken_key(t))]
        try:
            async with asyncio.timeout(DRAINING_READ_S):
                positions = await self._to_wake(keys=keys, args=[WOKEN_TTL_MS])
        except Exception as exc:  # woken all: a wake-up too many costs a claim
            log.debug("draining and woken keys not read: %s", type(exc).__name__)
            return targets
        return [targets[int(i) - 1] for i in positions]

    async def _forget_woken(self, targets: list[tuple[str, str]]) -> None:
        """A send that failed leaves no key: the next commit tries again."""
        assert self._draining is not None
        try:
            async with asyncio.timeout(DRAINING_READ_S):
                await self._draining.delete(*(woken_key(t) for t, _ in targets))
        except Exception as exc:  # they lapse (WOKEN_TTL_MS); the sweeper backs them up
            log.debug("woken keys not deleted: %s", type(exc).__name__)

    def _in_background(self, send: Coroutine[Any, Any, bool], what: str) -> None:
        """Run ``send`` as a task, unless MAX_PENDING are pending: then the sweeper's."""
        if len(self._pending) >= self._max_pending:
            send.close()
            log.warning("broker backlog: %s left to the sweeper", what)
            return
        task = asyncio.ensure_future(send)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def enqueue_job(self, queue: str, actor: str, kwargs: dict[str, Any]) -> bool:
        """Enqueue one job for ``actor``; False (logged) if the broker is unreachable."""
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue, actor_name=actor, args=(), kwargs=kwargs, options={}
        )
        return await self._send_async([message], 0.0, actor)

    def enqueue_soon(self, delivery_ids: Iterable[str], *, delay_s: float = 0.0) -> None:
        """Enqueue in the background (after the answer is sent)."""
        ids = list(delivery_ids)
        if ids:
            self._in_background(self.enqueue(ids, delay_s=delay_s), f"{len(ids)} deliveries")

    async def close(self) -> None:
        """Let in-flight enqueues finish (briefly), then close the broker."""
        background: set[asyncio.Future[Any]] = set(self._pending)
        if self._waker is not None:
            background.add(self._waker)
        if background:
            await asyncio.wait(background, timeout=5)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._broker.close)
        self._executor.shutdown(wait=False, cancel_futures=True)
