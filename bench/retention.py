"""Retention's benchmark: drop the oldest days of a large history, time it, check what stays.

    python bench/retention.py [--days 40] [--events 2000000] [--retention-days 30]

Needs Postgres (DATABASE_URL, default postgresql://root@127.0.0.1:5432/test); it
makes its own database (dropped at the end, unless --keep) and migrates it.

1. Fill: ``--days`` of history, set-based SQL, ``--events`` events spread evenly
   over the days (ids made at their time, so each lands in its day's partition),
   two deliveries per event (one per target), one attempt per delivery: 98.5 %
   succeeded, 1.5 % dead; and ``--pending`` retrying deliveries per day in the days
   past the retention (a target that kept failing), due tomorrow, with their
   events and attempts: what retention must keep.
2. Retention: the product's entry point, the one the sweeper calls
   (``relay.store.housekeeping.purge_old_events``), with RELAY_RETENTION_DAYS =
   ``--retention-days``, while a probe stores one event (with its two
   deliveries) every 10 ms, as the ingest does: 100 events/s. Figures: the wall
   time of the retention; rows dropped per table; that every pending delivery
   past the retention survived with its event and attempts; and the probe's
   store time p50/p99/max in the 10 s before and during the retention.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from yarl import URL

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from relay.ingest.parse import ParsedEvent  # noqa: E402
from relay.ingest.routes import TargetRoute  # noqa: E402
from relay.store import housekeeping  # noqa: E402
from relay.store.events import record_events  # noqa: E402
from relay.store.migrations import migrate  # noqa: E402

ADMIN_DSN = os.environ.get("DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")

_SETUP = """
INSERT INTO tenants (id, name) VALUES ('ten_bench', 'Bench');
INSERT INTO sources (id, tenant_id, name, auth_type, secret_enc)
    VALUES ('src_bench', 'ten_bench', 'bench', 'token', '\\x00');
INSERT INTO targets (id, tenant_id, url, secret_enc) VALUES
    ('tgt_bench_a', 'ten_bench', 'https://a.example/', '\\x00'),
    ('tgt_bench_b', 'ten_bench', 'https://b.example/', '\\x00');
"""

# Row n of the history ($3..$4) was made at $1 + n * $2 seconds; its id is that
# time's ULID prefix and n (hex: valid Crockford characters) as the random part.
_EVENTS = """
INSERT INTO events (id, tenant_id, source_id, upstream_uuid, object_type, action, object_id,
                    payload, received_at)
SELECT left(relay_ulid_floor('evt', at), 14) || upper(lpad(to_hex(n), 16, '0')),
       'ten_bench', 'src_bench', 'u-' || n, 'Bill', 'paid', (n % 5000)::text,
       convert_to('{"uuid":"u-' || n || '","objectType":"Bill","action":"paid","objectId":'
                  || (n % 5000) || ',"memo":"' || repeat('x', 120) || '"}', 'UTF8'),
       at
FROM (SELECT n, $1::timestamptz + make_interval(secs => n * $2::float8) AS at
      FROM generate_series($3::bigint, $4::bigint) AS n) s
"""

_DELIVERIES = """
INSERT INTO deliveries (id, tenant_id, event_id, target_id, status, attempt_count,
                        last_status_code, created_at, updated_at)
SELECT left(relay_ulid_floor('dlv', e.received_at), 14) || k.tag || substr(e.id, 16),
       'ten_bench', e.id, k.target,
       CASE WHEN hashtext(e.id || k.tag) % 1000 BETWEEN -7 AND 7 THEN 'dead' ELSE 'succeeded' END,
       1, 200, e.received_at, e.received_at
FROM events e
CROSS JOIN (VALUES ('A', 'tgt_bench_a'), ('B', 'tgt_bench_b')) AS k(tag, target)
WHERE e.id >= $1 AND e.id < $2
"""

_ATTEMPTS = """
INSERT INTO attempts (id, tenant_id, delivery_id, started_at, duration_ms, status_code)
SELECT 'att_' || substr(d.id, 5), 'ten_bench', d.id, d.created_at, 12, 200
FROM deliveries d WHERE d.id >= $1 AND d.id < $2
ON CONFLICT (id) DO NOTHING
"""

# $1 retrying deliveries per day, each the first of its day's events to target a,
# due tomorrow (a failing target): what retention must keep.
_PENDING = """
UPDATE deliveries d SET status = 'retrying', next_attempt_at = now() + interval '1 day',
       enqueued_until = now() + interval '1 day', last_status_code = 500
FROM (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY created_at::date ORDER BY id) AS nth
        FROM deliveries WHERE target_id = 'tgt_bench_a' AND status = 'succeeded'
          AND id < relay_ulid_floor('dlv', now() - make_interval(days => $2))
    ) x WHERE nth <= $1
) p
WHERE d.id = p.id AND d.status = 'succeeded'
RETURNING d.id, d.event_id
"""


def _db(name: str) -> str:
    return str(URL(ADMIN_DSN).with_path("/" + name))


async def fill(conn: asyncpg.Connection, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    await conn.execute(_SETUP)
    begin = await conn.fetchval(
        "SELECT now() - make_interval(days => $1) + interval '1 minute'", args.days
    )
    for day in range(args.days + 1):
        for parent, prefix in housekeeping.HISTORY:
            await conn.execute(
                "SELECT relay_ensure_partition($1, $2, (($3::timestamptz"
                " + make_interval(days => $4)) AT TIME ZONE 'UTC')::date)",
                parent,
                prefix,
                begin,
                day,
            )
    step = args.days * 86400 / args.events
    chunk = 100_000
    for first in range(1, args.events + 1, chunk):
        last = min(first + chunk - 1, args.events)
        await conn.execute(_EVENTS, begin, step, first, last)
        lo, hi = await conn.fetchrow(
            "SELECT min(id), max(id) || 'z' FROM events "
            "WHERE source_id = 'src_bench' AND upstream_uuid = ANY($1)",
            [f"u-{first}", f"u-{last}"],
        )
        await conn.execute(_DELIVERIES, lo, hi)
        dlo, dhi = "dlv_" + lo[4:14], "dlv_" + hi[4:14] + "zzzz"
        await conn.execute(_ATTEMPTS, dlo, dhi)
        print(f"  filled {last:,} events ({time.perf_counter() - start:.0f} s)", flush=True)
    kept = await conn.fetch(_PENDING, args.pending, args.retention_days)
    await conn.execute("UPDATE targets SET enabled = false")  # nothing sends them
    for table in ("events", "deliveries", "attempts"):
        await conn.execute(f"VACUUM ANALYZE {table}")
    print(
        f"filled {args.days} days in {time.perf_counter() - start:.0f} s; "
        f"{len(kept)} retrying deliveries past retention",
        flush=True,
    )


async def counts(conn: asyncpg.Connection) -> dict[str, int]:
    row = await conn.fetchrow(
        """
        SELECT (SELECT count(*) FROM events) AS events,
               (SELECT count(*) FROM deliveries) AS deliveries,
               (SELECT count(*) FROM attempts) AS attempts
        """
    )
    assert row is not None
    return dict(row)


async def unsent(conn: asyncpg.Connection, retention_days: int) -> tuple[int, int, int]:
    """Retrying deliveries of events past retention, their events, their attempts."""
    row = await conn.fetchrow(
        """
        WITH d AS (
            SELECT id, event_id FROM deliveries
            WHERE status = 'retrying'
              AND event_id < relay_ulid_floor('evt', now() - make_interval(days => $1))
        )
        SELECT (SELECT count(*) FROM d) AS deliveries,
               (SELECT count(*) FROM events e WHERE e.id IN (SELECT event_id FROM d)) AS events,
               (SELECT count(*) FROM attempts a WHERE a.delivery_id IN (SELECT id FROM d))
                   AS attempts
        """,
        retention_days,
    )
    assert row is not None
    return row["deliveries"], row["events"], row["attempts"]


class Probe:
    """Stores one event with two deliveries every 10 ms; records each store's time."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.times: list[tuple[float, float]] = []  # (started, seconds)
        self.stop = asyncio.Event()
        self.routes = [
            TargetRoute("tgt_bench_a", frozenset(), frozenset(), None),
            TargetRoute("tgt_bench_b", frozenset(), frozenset(), None),
        ]

    async def run(self) -> None:
        tick = time.perf_counter()
        while not self.stop.is_set():
            started = time.perf_counter()
            event = ParsedEvent(b'{"probe":1}', uuid.uuid4().hex, None, "Bill", "paid", "1", None)
            await record_events(
                self.conn, "ten_bench", "src_bench", [event], self.routes, enqueue_grace_s=30
            )
            self.times.append((started, time.perf_counter() - started))
            tick += 0.01
            await asyncio.sleep(max(0.0, tick - time.perf_counter()))

    def window(self, start: float, end: float) -> str:
        xs = sorted(s for t, s in self.times if start <= t < end)
        if not xs:
            return "no samples"
        p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
        return (
            f"{len(xs)} stores: p50 {statistics.median(xs) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, max {xs[-1] * 1000:.1f} ms"
        )


async def main(args: argparse.Namespace) -> None:
    name = f"relay_bench_ret_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(_db(name))
        probe_conn = await asyncpg.connect(_db(name))
        try:
            await migrate(conn)
            await fill(conn, args)
            await conn.execute("UPDATE targets SET enabled = true")
            before, kept_before = await counts(conn), await unsent(conn, args.retention_days)
            probe = Probe(probe_conn)
            task = asyncio.create_task(probe.run())
            await asyncio.sleep(10)
            started = time.perf_counter()
            removed, _ = await housekeeping.purge_old_events(conn, args.retention_days, grace_s=30)
            wall = time.perf_counter() - started
            ended = time.perf_counter()
            await asyncio.sleep(1)
            probe.stop.set()
            await task
            after, kept_after = await counts(conn), await unsent(conn, args.retention_days)
        finally:
            await conn.close()
            await probe_conn.close()
        stored = len(probe.times)
        added = {"events": stored, "deliveries": 2 * stored, "attempts": 0}  # by the probe
        dropped = {t: before[t] + added[t] - after[t] for t in before}
        print(f"retention of the days past {args.retention_days} of {args.days}: {wall:.2f} s wall")
        print(f"  events removed (entry point's count): {removed:,}")
        print("  rows dropped: " + ", ".join(f"{t} {n:,}" for t, n in dropped.items()))
        print(
            "  unsent past retention (deliveries, events, attempts): "
            f"before {kept_before}, after {kept_after}"
            + (" - all kept" if kept_before == kept_after else " - LOST SOME")
        )
        print(f"  probe before: {probe.window(started - 10, started)}")
        print(f"  probe during: {probe.window(started, ended)}")
        with (HERE / "RESULTS.md").open("a") as out:
            out.write(
                f"\n## retention.py {datetime.now(UTC):%Y-%m-%d %H:%M} UTC "
                f"({args.events:,} events over {args.days} days, retention {args.retention_days})"
                f"\n\n- wall time {wall:.2f} s; rows dropped "
                + ", ".join(f"{t} {n:,}" for t, n in dropped.items())
                + f"\n- unsent past retention before {kept_before}, after {kept_after}"
                + f"\n- probe (100 stores/s) before: {probe.window(started - 10, started)}"
                + f"\n- probe during: {probe.window(started, ended)}\n"
            )
    finally:
        if not args.keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            print(f"kept database {name}")
        await admin.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=40)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--retention-days", type=int, default=30)
    parser.add_argument("--pending", type=int, default=10, help="retrying deliveries per old day")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    asyncio.run(main(parser.parse_args()))
