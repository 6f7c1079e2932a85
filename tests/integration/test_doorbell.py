"""An idle worker hears of a send at once: its consumer waits on the queue's doorbell.

Dramatiq's Redis consumers poll, backing off while nothing comes: an idle one saw
a wake-up only at its next poll (every 50 ms, so ~25 ms of every delivery after a
lull: the quiet tenant's delivery p50 of 26 ms in bench/noisy_neighbour.py). Here
the poll's interval is made 20 s (IDLE_POLL_MS, which also capped Dramatiq's own
back-off before the doorbell), so a consumer left idle for 3 s is asleep: only a
doorbell can wake it within the test.
Real Redis, a real Dramatiq consumer (the worker's class) in a thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from relay.delivery import wakeups
from relay.delivery.wakeups import QUEUE, Enqueuer, doorbell, make_broker

ASLEEP_S = 20.0


@pytest.fixture
def slow_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wakeups, "IDLE_POLL_MS", int(ASLEEP_S * 1000))


class Listening:
    """A consumer of the deliveries queue, taking messages in a thread."""

    def __init__(self, redis_url: str) -> None:
        self.url = redis_url
        self.broker = make_broker(redis_url, middleware=[])
        self.broker.declare_queue(QUEUE)
        self.consumer = self.broker.consume(QUEUE, prefetch=4, timeout=int(ASLEEP_S * 1000))
        self.got: list[tuple[float, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            message = next(self.consumer)
            if message is not None:
                self.got.append((time.monotonic(), message))
                self.consumer.ack(message)

    def close(self) -> None:
        self.stop.set()
        waker = redis.Redis.from_url(self.url)
        waker.lpush(doorbell("dramatiq", QUEUE), 1)  # wake it to stop
        waker.close()
        self.thread.join(5)
        self.consumer.close()
        self.broker.close()


@pytest.fixture
def listening(clean_redis: str, slow_polls: None) -> Iterator[Listening]:
    consumer = Listening(clean_redis)
    yield consumer
    consumer.close()


def until(check: Any, limit_s: float) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.01)
    return False


async def test_an_idle_consumer_takes_a_wake_up_when_it_is_sent_not_at_its_next_poll(
    listening: Listening, clean_redis: str
) -> None:
    time.sleep(3)  # idle long enough for any poll's back-off to have grown
    enqueuer = Enqueuer(make_broker(clean_redis, middleware=[], fail_fast=True))
    try:
        sent = time.monotonic()
        assert await enqueuer.wake([("tgt_doorbell", "ten_doorbell")])
        # the poll would come after ASLEEP_S: within 5 s, the doorbell woke the consumer
        assert until(lambda: listening.got, 5.0), "the consumer slept through the send"
        at, message = listening.got[0]
        assert message.actor_name == wakeups.WAKE_ACTOR
        assert list(message.args) == ["tgt_doorbell", "ten_doorbell"]
        assert at - sent < ASLEEP_S / 4
    finally:
        await enqueuer.close()


async def test_rings_nobody_heard_are_bounded_and_lapse(clean_redis: str) -> None:
    enqueuer = Enqueuer(make_broker(clean_redis, middleware=[], fail_fast=True))
    try:
        for n in range(20):
            assert await enqueuer.wake([(f"tgt_{n}", "ten_doorbell")])
    finally:
        await enqueuer.close()
    client = redis.Redis.from_url(clean_redis)
    key = doorbell("dramatiq", QUEUE)
    assert client.llen(key) == wakeups.DOORBELL_RINGS
    assert 0 < client.pttl(key) <= wakeups.DOORBELL_TTL_MS
    client.close()
