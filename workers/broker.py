"""The worker's wiring, in one place: broker, AsyncIO, and per-process resources.

``relay worker`` runs ``dramatiq workers.broker:setup workers.deliver …``:
Dramatiq calls ``setup`` in every worker process before it imports the actors,
and ``setup`` reads the settings and installs the broker. Importing this module
reads nothing. When the worker boots, ``WorkerResources`` opens, on the AsyncIO
middleware's event loop, one asyncpg pool, one guarded HTTP client, one Redis
client and the delivery engine: one ``Worker`` object, which the actors take
from ``current_worker()``. It closes them when the worker shuts down.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import dramatiq
import redis.asyncio as aioredis
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.common import q_name
from dramatiq.middleware import Middleware
from dramatiq.middleware.asyncio import AsyncIO

from relay.core import loops
from relay.core.config import REQUIRED_FOR_WORKER, Settings
from relay.core.crypto import SecretBox
from relay.core.logs import setup_logging
from relay.core.ratelimit import RateLimiter
from relay.delivery.egress import EgressClient
from relay.delivery.wakeups import Enqueuer, make_broker
from relay.store.db import create_pool
from relay.store.migrations import require_schema
from relay.web.openapi import relay_version
from workers.engine import POOL_SIZE, Engine, WorkerContext

log = logging.getLogger("relay.worker")

#: The exit code of a worker process that could not open its resources at boot (it
#: waits RELAY_WORKER_BOOT_WAIT_S for Postgres first); `relay worker` exits with it.
BOOT_FAILED = 3


@dataclass(frozen=True)
class Worker:
    """A worker process's one context: its resources and its delivery engine."""

    context: WorkerContext
    engine: Engine


#: The running process's worker, while its resources are open (one per process).
_running: Worker | None = None


def current_worker() -> Worker:
    """The running process's worker (raises if the worker has not booted or has closed)."""
    if _running is None:
        raise RuntimeError("the worker's resources are not open")
    return _running


async def open_context(settings: Settings, broker: dramatiq.Broker) -> WorkerContext:
    """A worker process's resources: pool, guarded HTTP client, Redis, enqueuer, secrets."""
    pool = await create_pool(
        settings.database_url,
        min_size=1,
        max_size=POOL_SIZE,
        wait_s=settings.worker_boot_wait_s,
    )
    await require_schema(pool)  # SchemaBehind: the worker process does not boot
    client = aioredis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    return WorkerContext(
        settings=settings,
        pool=pool,
        egress=EgressClient(
            timeout_s=settings.delivery_timeout_s,
            allow_private=settings.allow_private_targets,
            user_agent=f"Relay/{relay_version()} (+webhook relay)",
            dns_timeout_s=settings.dns_timeout_s,
        ),
        redis=client,
        limiter=RateLimiter(client),
        enqueuer=Enqueuer(broker),
        secrets=SecretBox(settings.secret_key),
    )


async def close_context(context: WorkerContext) -> None:
    """Close what ``open_context`` opened (the engine closed first)."""
    await context.egress.close()
    await context.pool.close()
    await context.redis.aclose()


class WorkerResources(AsyncIO):
    """Dramatiq's AsyncIO middleware, plus the per-process resources on its event loop.

    One middleware orders both: the loop starts, then the resources open,
    before the worker consumes; after every in-flight message has finished
    (``after_worker_shutdown``), the resources close, then the loop stops.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.worker: Worker | None = None

    async def _open(self, broker: dramatiq.Broker) -> None:
        global _running
        context = await open_context(self.settings, broker)
        engine = Engine(context)
        engine.start()
        self.worker = _running = Worker(context, engine)
        loops.settle_heap()

    async def _close(self) -> None:
        global _running
        worker, self.worker = self.worker, None
        if worker is None:
            return
        _running = None
        # attempts in flight end (at most one delivery timeout) and are recorded
        await worker.engine.close(timeout_s=self.settings.delivery_timeout_s + 5)
        await close_context(worker.context)

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Start the event loop (uvloop's), then open the resources on it."""
        loops.use_for_new_loops()
        super().before_worker_boot(broker, worker)  # type: ignore[no-untyped-call]
        try:
            get_event_loop_thread().run_coroutine(self._open(broker))  # type: ignore[union-attr]
        except Exception as exc:
            # Dramatiq logs a middleware's failure at boot and goes on: the process
            # would take wake-ups with no engine, and never deliver. It exits instead;
            # Dramatiq's main process then stops the others and `relay worker` exits.
            log.critical(
                "the worker process could not open its resources and exits: %s: %s",
                type(exc).__name__,
                exc,
            )
            logging.shutdown()
            os._exit(BOOT_FAILED)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Close the resources once no message runs, then stop the loop."""
        thread = get_event_loop_thread()
        if thread is not None:
            thread.run_coroutine(self._close())
        super().after_worker_shutdown(broker, worker)  # type: ignore[no-untyped-call]


class ConsumerWatchdog(Middleware):
    """Restarts a consumer thread that died while the worker runs.

    Dramatiq restarts a consumer after a broker error it recognises, but a thread
    that an unexpected error ends stays dead, and with it the queue it fed (for a
    delay queue: every short retry waits for the sweeper's grace). If a restart
    fails, the process exits non-zero so that ``relay worker`` (and Kubernetes)
    restarts it.
    """

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.stopping = threading.Event()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Start watching ``worker``'s consumer threads."""
        threading.Thread(
            target=self._watch, args=(worker,), name="consumer-watchdog", daemon=True
        ).start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Stop watching: consumers stop on purpose now."""
        self.stopping.set()

    def _watch(self, worker: Any) -> None:
        while not self.stopping.wait(self.every_s):
            for name, thread in list(worker.consumers.items()):
                if thread.is_alive() or not thread.running or self.stopping.is_set():
                    continue
                log.error("consumer of %s died; restarting it", name)
                try:
                    del worker.consumers[name]
                    # a delay queue's name is its queue's plus a suffix (".DQ")
                    worker._add_consumer(name, delay=q_name(name) != name)
                except Exception:
                    log.critical("could not restart the consumer of %s; exiting", name)
                    os._exit(3)


def build_broker(settings: Settings) -> dramatiq.Broker:
    """The worker's broker: Dramatiq's middleware, AsyncIO with the resources, a watchdog."""
    broker = make_broker(settings.broker_url)
    broker.add_middleware(WorkerResources(settings))
    broker.add_middleware(ConsumerWatchdog())
    return broker


def setup() -> None:
    """Dramatiq's entry (``workers.broker:setup``): read the settings, install the broker."""
    settings = Settings.from_env(os.environ, required=REQUIRED_FOR_WORKER)
    setup_logging(settings.log_level)
    dramatiq.set_broker(build_broker(settings))
