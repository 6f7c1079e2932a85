"""The sweeper: Postgres decides, the broker only carries work.

Every second the leader (one at a time across all workers, by a Postgres
advisory lock) enqueues every due delivery that no lease holds and no live
message carries, so a delivery whose message was lost (Redis flushed, an
enqueue that failed after commit, a worker killed mid-attempt) is always sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from relay.config import REQUIRED_FOR_WORKER, Settings
from relay.enqueue import Enqueuer, make_broker
from relay.logs import setup_logging
from relay.metrics import DEAD_LETTERS, DUE_UNSENT, SWEEPER_RUNS, SWEPT, worker_registry
from relay.store import deliveries as store
from relay.store.db import TRANSIENT, Conn, connect

log = logging.getLogger("relay.sweeper")

SWEEPER_LOCK_KEY = 0x7377656570  # "sweep"
BATCH = 1000
#: A sweep pass stops after this many batches to let the next tick come round.
MAX_BATCHES = 50
#: Auto-disable and retention run every this many sweeps.
HOUSEKEEPING_EVERY = 5


class Sweeper:
    """One sweeper process: waits for leadership, then sweeps every ``interval_s``."""

    def __init__(self, settings: Settings, enqueuer: Enqueuer, interval_s: float = 1.0) -> None:
        self.settings = settings
        self.enqueuer = enqueuer
        self.interval_s = interval_s
        self.stopping = asyncio.Event()

    async def sweep_once(self, conn: Conn) -> int:
        """Enqueue what is due; return how many."""
        total = 0
        for _ in range(MAX_BATCHES):
            ids = await store.sweep_due(conn, batch=BATCH, grace_s=self.settings.requeue_after_s)
            if ids:
                await self.enqueuer.enqueue(ids)
                total += len(ids)
            if len(ids) < BATCH:
                break
        SWEEPER_RUNS.inc()
        SWEPT.inc(total)
        if total:
            log.info("swept %d due deliveries", total)
        return total

    async def housekeeping(self, conn: Conn) -> None:
        """Auto-disable failing targets and purge what is past retention, in small batches."""
        for target_id in await store.disable_failing_targets(conn, self.settings.disable_after_s):
            log.warning(
                "disabled target %s: every attempt failed",
                target_id,
                extra={"target_id": target_id},
            )
        due, dead = await store.backlog(conn)
        DUE_UNSENT.set(due)
        DEAD_LETTERS.set(dead)
        purged = 0
        for _ in range(10):
            batch = await store.purge_old_events(conn, self.settings.retention_days)
            purged += batch
            if batch < 1000:
                break
        if purged:
            log.info("purged %d events past retention", purged)

    async def _lead(self, conn: Conn) -> None:
        while not self.stopping.is_set():
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", SWEEPER_LOCK_KEY):
                break
            await self._pause()
        log.info("sweeper is the leader")
        ticks = 0
        while not self.stopping.is_set():
            if ticks % HOUSEKEEPING_EVERY == 0:
                await self.housekeeping(conn)
            await self.sweep_once(conn)
            ticks += 1
            await self._pause()

    async def _pause(self) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), self.interval_s)
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Sweep until stopped; reconnect (and re-contend for leadership) on connection loss."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT),
            wait=wait_exponential(multiplier=0.5, max=5),
        ):
            with attempt:
                conn = await connect(self.settings.database_url)
                try:
                    await self._lead(conn)
                finally:
                    await conn.close()


def _serve_metrics(host: str, port: int) -> None:
    """Every worker process's metrics, aggregated, on ``host:port`` (multiprocess mode only)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR") or port == 0:
        return
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host, registry=worker_registry())
        log.info("worker metrics on %s:%d/metrics", host, port)
    except OSError as exc:
        log.warning("worker metrics on %s:%d unavailable: %s", host, port, exc)


async def _main(settings: Settings) -> None:
    _serve_metrics(settings.worker_metrics_host, settings.worker_metrics_port)
    broker = make_broker(settings.broker_url, middleware=[])
    sweeper = Sweeper(settings, Enqueuer(broker))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sweeper.stopping.set)
    try:
        await sweeper.run()
    finally:
        await sweeper.enqueuer.close()
    log.info("sweeper stopped")


def main() -> int:
    """Entry point (a Dramatiq fork function of ``relay worker``)."""
    settings = Settings.from_env(os.environ, required=REQUIRED_FOR_WORKER)
    setup_logging(settings.log_level)
    asyncio.run(_main(settings))
    return 0
