"""Putting delivery ids on the broker, from the gateway, the sweeper or the worker.

The broker only carries work: Postgres decides what is due. So an enqueue
that fails is logged and forgotten; the sweeper finds the delivery again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

log = logging.getLogger(__name__)

QUEUE = "deliveries"
DELIVER_ACTOR = "deliver"
#: Bulk replays run on their own queue so they never wait behind a delivery backlog.
REPLAY_QUEUE = "replays"
REPLAY_ACTOR = "replay_dead_letters"
#: Added to every broker delay, so a message never arrives before its row is due.
DELAY_MARGIN_S = 0.1


def make_broker(url: str, *, middleware: list[Any] | None = None) -> dramatiq.Broker:
    """The Dramatiq broker for a ``redis://`` or ``amqp://`` URL."""
    if url.startswith(("amqp://", "amqps://")):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=url, middleware=middleware)
    return RedisBroker(url=url, middleware=middleware)  # type: ignore[no-untyped-call]


def deliver_message(delivery_id: str) -> dramatiq.Message[Any]:
    """The message that asks a worker to attempt one delivery."""
    return dramatiq.Message(
        queue_name=QUEUE, actor_name=DELIVER_ACTOR, args=(delivery_id,), kwargs={}, options={}
    )


class Enqueuer:
    """Enqueues from asyncio code; the broker clients are blocking, so a thread does it."""

    def __init__(self, broker: dramatiq.Broker) -> None:
        self._broker = broker
        self._pending: set[asyncio.Future[bool]] = set()

    def _send(self, messages: list[dramatiq.Message[Any]], delay_ms: int | None) -> None:
        declared = self._broker.get_declared_queues()
        for message in messages:
            if message.queue_name not in declared:
                self._broker.declare_queue(message.queue_name)
                declared = self._broker.get_declared_queues()
            self._broker.enqueue(message, delay=delay_ms)

    async def _send_async(
        self, messages: list[dramatiq.Message[Any]], delay_s: float, what: str
    ) -> bool:
        # A small margin so a delayed message never arrives before its row is due.
        delay_ms = int((delay_s + DELAY_MARGIN_S) * 1000) if delay_s > 0 else None
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._send, messages, delay_ms)
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

    async def enqueue_job(self, queue: str, actor: str, kwargs: dict[str, Any]) -> bool:
        """Enqueue one job for ``actor``; False (logged) if the broker is unreachable."""
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue, actor_name=actor, args=(), kwargs=kwargs, options={}
        )
        return await self._send_async([message], 0.0, actor)

    def enqueue_soon(self, delivery_ids: Iterable[str], *, delay_s: float = 0.0) -> None:
        """Enqueue in the background (after the answer is sent)."""
        ids = list(delivery_ids)
        if not ids:
            return
        task = asyncio.ensure_future(self.enqueue(ids, delay_s=delay_s))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        """Let in-flight enqueues finish (briefly), then close the broker."""
        if self._pending:
            await asyncio.wait(self._pending, timeout=5)
        await asyncio.get_running_loop().run_in_executor(None, self._broker.close)
