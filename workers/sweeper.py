"""The sweeper: Postgres decides, the broker only carries work.

Every second the leader (one at a time across all workers, by a Postgres
advisory lock) wakes every target that has a due delivery nobody carries (no
lease, no broker message, no worker's timer: past its ``enqueued_until``), so a
delivery whose wake-up was lost (Redis flushed, an enqueue that failed after
commit, a worker killed mid-attempt) is always sent. It wakes targets, not
deliveries: one message per target, at most once per ``RELAY_REQUEUE_AFTER_S``,
however deep the target's backlog; the worker drains it from Postgres. It also
makes dead, each second, the deliveries a target's open breaker holds past their
retry window (the breaker saves attempts, never lengthens the window).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from relay.core import loops
from relay.core.config import REQUIRED_FOR_WORKER, Settings
from relay.core.logs import setup_logging
from relay.core.metrics import (
    BREAKERS_OPEN,
    DEAD_LETTERS,
    DELIVERIES,
    DUE_UNSENT,
    STRANDED_KEYS_REPAIRED,
    SWEEPER_LAST_SWEEP,
    SWEEPER_LEADER,
    SWEEPER_RESTARTS,
    SWEEPER_RUNS,
    SWEPT,
    worker_registry,
)
from relay.delivery.wakeups import Enqueuer, make_broker
from relay.store import claims, housekeeping, key_queues
from relay.store.db import Conn, connect

log = logging.getLogger("relay.sweeper")

SWEEPER_LOCK_KEY = 0x7377656570  # "sweep"
#: Targets woken per statement; a pass makes as many statements as it needs.
BATCH = 500
MAX_BATCHES = 20
#: Auto-disable, retention and the check of ordered keys run every this many sweeps.
HOUSEKEEPING_EVERY = 5
#: Ordered keys checked per housekeeping; a cursor goes through all of them in turn.
KEYS_PER_CHECK = 1000
#: The name the sweeper's connection shows in pg_stat_activity.
APPLICATION_NAME = "relay-sweeper"
#: A statement that takes longer than this means Postgres is stalled: reconnect.
COMMAND_TIMEOUT_S = 60.0


class Sweeper:
    """One sweeper process: waits for leadership, then sweeps every ``interval_s``."""

    def __init__(self, settings: Settings, enqueuer: Enqueuer, interval_s: float = 1.0) -> None:
        self.settings = settings
        self.enqueuer = enqueuer
        self.interval_s = interval_s
        self.stopping = asyncio.Event()
        #: where the next check of ordered keys goes on (None: from the first)
        self._keys_after: key_queues.Key | None = None

    async def sweep_once(self, conn: Conn) -> int:
        """Wake the targets with due work that nobody carries; return how many."""
        total = 0
        grace_s = self.settings.requeue_after_s
        for _ in range(MAX_BATCHES):
            wakes = await claims.targets_to_wake(conn, grace_s=grace_s, limit=BATCH)
            if wakes:
                await self.enqueuer.wake(wakes)
                total += len(wakes)
            if len(wakes) < BATCH:
                break
        SWEEPER_RUNS.inc()
        SWEPT.inc(total)
        if total:
            log.info("woke %d targets with due deliveries nobody carried", total)
        return total

    async def end_past_window(self, conn: Conn) -> int:
        """Make dead the deliveries an open breaker holds past their retry window; how many.

        The breaker saves attempts but never lengthens a delivery's retry window
        (the schedule's total): run each second, so such a delivery is dead within
        about a second of its window's end, however long the breaker stays open.
        """
        window_s = sum(self.settings.retry_schedule)
        grace_s = self.settings.requeue_after_s
        total = 0
        for _ in range(MAX_BATCHES):
            ended, promoted = await claims.end_past_window(
                conn, window_s=window_s, limit=BATCH, grace_s=grace_s
            )
            for e in ended:
                log.info(
                    "dead: the retry window ended while the circuit was open",
                    extra={
                        "delivery_id": e.id,
                        "target_id": e.target_id,
                        "tenant_id": e.tenant_id,
                        "outcome": "dead",
                    },
                )
            DELIVERIES.labels("dead").inc(len(ended))
            total += len(ended)
            if promoted:
                await self.enqueuer.wake({r.wake for r in promoted})
            if len(ended) < BATCH:
                break
        return total

    async def housekeeping(self, conn: Conn) -> None:
        """Auto-disable failing targets, purge what is past retention, repair stranded keys."""
        for target_id in await housekeeping.disable_failing_targets(
            conn, self.settings.disable_after_s
        ):
            log.warning(
                "disabled target %s: every attempt failed",
                target_id,
                extra={"target_id": target_id},
            )
        due, dead, open_breakers = await housekeeping.backlog(conn)
        DUE_UNSENT.set(due)
        DEAD_LETTERS.set(dead)
        BREAKERS_OPEN.set(open_breakers)
        purged = 0
        for _ in range(10):
            batch, promoted = await housekeeping.purge_old_events(
                conn, self.settings.retention_days, grace_s=self.settings.requeue_after_s
            )
            purged += batch
            if promoted:
                # keys that waited behind a dead letter past retention go on
                await self.enqueuer.wake({r.wake for r in promoted})
            if batch < 1000:
                break
        if purged:
            log.info("purged %d events past retention", purged)
        await housekeeping.purge_old_rollups(conn, self.settings.retention_days)
        await housekeeping.vacuum_rollup_deltas(conn)
        await housekeeping.vacuum_churned(conn)
        await housekeeping.purge_lapsed_leases(conn)
        await self.repair_stranded_keys(conn)

    async def repair_stranded_keys(self, conn: Conn) -> int:
        """Promote the head of each ordered key that waits behind nothing; return how many.

        A key whose deliveries are all parked, none active, is seen by no claim
        and no sweep: nothing else would ever send it. Relay's own writers never
        leave one (each ends a key's active delivery and promotes the next in
        one transaction); this check finds what a bug or a hand-made change did,
        a bounded number of keys at a time, and counts each repair.
        """
        stranded, self._keys_after = await key_queues.stranded_keys(
            conn, after=self._keys_after, limit=KEYS_PER_CHECK
        )
        if not stranded:
            return 0
        promoted = await key_queues.repair_keys(
            conn, stranded, grace_s=self.settings.requeue_after_s
        )
        for r in promoted:
            log.warning(
                "promoted the next delivery of a stranded ordered key",
                extra={"delivery_id": r.id, "target_id": r.target_id, "tenant_id": r.tenant_id},
            )
        STRANDED_KEYS_REPAIRED.inc(len(promoted))
        if promoted:
            await self.enqueuer.wake({r.wake for r in promoted})
        return len(promoted)

    async def _lead(self, conn: Conn) -> None:
        while not self.stopping.is_set():
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", SWEEPER_LOCK_KEY):
                break
            await self._pause()
        if self.stopping.is_set():
            return
        log.info("sweeper is the leader")
        SWEEPER_LEADER.set(1)
        ticks = 0
        while not self.stopping.is_set():
            if ticks % HOUSEKEEPING_EVERY == 0:
                await self.housekeeping(conn)
            await self.end_past_window(conn)
            await self.sweep_once(conn)
            # the figures' deltas of this tick, so what the console reads stays small
            await housekeeping.fold_rollups(conn)
            if await housekeeping.refresh_open_statistics(conn):
                log.info("open deliveries analyzed: they outgrew their statistics")
            SWEEPER_LAST_SWEEP.set(time.time())
            ticks += 1
            await self._pause()

    async def _pause(self, seconds: float | None = None) -> None:
        """Wait ``seconds`` (default: one tick), or less if the sweeper is stopping."""
        try:
            await asyncio.wait_for(
                self.stopping.wait(), self.interval_s if seconds is None else seconds
            )
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Sweep until stopped; on any failure, reconnect and re-contend for leadership.

        Not only the faults of connecting: a backend terminated by a Postgres
        restart or failover (``InterfaceError``), a stalled statement, a broker
        error or a bug in one pass all end in the same place, a new connection
        after a backoff, so the one process that resends lost messages and long
        waits never stops while the worker runs.
        """
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential(multiplier=0.5, max=5),
            sleep=self._pause,
            before_sleep=self._lost,
        )
        async for attempt in retrying:
            with attempt:
                await self._connect_and_lead()

    async def _connect_and_lead(self) -> None:
        if self.stopping.is_set():
            return
        conn = await connect(
            self.settings.database_url,
            command_timeout=COMMAND_TIMEOUT_S,
            application_name=APPLICATION_NAME,
        )
        try:
            await self._lead(conn)
        finally:
            SWEEPER_LEADER.set(0)
            try:
                await asyncio.wait_for(conn.close(), timeout=5)
            except Exception:
                conn.terminate()

    def _lost(self, state: RetryCallState) -> None:
        SWEEPER_RESTARTS.inc()
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "sweeper failed (%s: %s); reconnecting",
            type(exc).__name__,
            str(exc)[:200],
            extra={"attempt": state.attempt_number},
        )


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
    broker = make_broker(settings.broker_url, middleware=[], fail_fast=True)
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
    loops.run(_main(settings))
    return 0
