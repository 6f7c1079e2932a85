"""What Postgres spends on a delivery's claim and record, without HTTP or a broker.

    python bench/pg_cycle.py [--deliveries 20000] [--batch 32] [--runs 3] [--sql SQL]

Each run: a fresh database, migrated; one tenant, one source, one target
(``max_in_flight`` = --batch); --deliveries pending deliveries of as many events,
written with SQL. Then one connection claims them as a worker's drainer does
(``claim_share``: its part, leasing --batch ahead) and records each batch as
succeeded (``record_batch``), until none is left. Prints, per delivery, the
wall time of the claims and of the records (each a round trip to Postgres and
the time it spent) and the CPU time of the Postgres backend serving them.

``--sql SQL``: an A/B. Two databases are filled, the second with SQL run after
its migrations (an experiment's change), and drained side by side, one cycle
of each in turn, so that both see the same machine (this VM's speed drifts by
±15 % over minutes, more than most changes). The drain bench
(``bench/drain.py``) measures the same work among the rest, with more noise.
Nothing is appended to RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from relay.core.crypto import new_id
from relay.store import claims
from relay.store.db import Conn, connect
from relay.store.migrations import migrate

PG = os.environ.get("BENCH_PG", "postgresql://root@127.0.0.1:5432")
CLK = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float:
    """CPU seconds of the Postgres backend ``pid`` (same host)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


async def fill(conn: Conn, n: int, batch: int) -> str:
    """A tenant with one target (cap ``batch``) and ``n`` due deliveries to it."""
    tenant, source, target = new_id("ten"), new_id("src"), new_id("tgt")
    await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, 'bench')", tenant)
    await conn.execute(
        "INSERT INTO sources (id, tenant_id, name, auth_type, secret_enc)"
        " VALUES ($1, $2, 's', 'token', '\\x00')",
        source,
        tenant,
    )
    await conn.execute(
        "INSERT INTO targets (id, tenant_id, url, secret_enc, max_in_flight)"
        " VALUES ($1, $2, 'http://127.0.0.1:9/', '\\x00', $3)",
        target,
        tenant,
        batch,
    )
    events = [new_id("evt") for _ in range(n)]
    deliveries = [new_id("dlv") for _ in range(n)]
    await conn.execute(
        """
        INSERT INTO events (id, tenant_id, source_id, object_type, action, object_id, payload)
        SELECT e, $2, $3, 'Bill', 'paid', e,
               convert_to('{"objectType":"Bill","action":"paid","objectId":"' || e || '"}', 'UTF8')
        FROM unnest($1::text[]) AS e
        """,
        events,
        tenant,
        source,
    )
    await conn.execute(
        """
        INSERT INTO deliveries (id, tenant_id, event_id, target_id, status, next_attempt_at,
                                enqueued_until)
        SELECT d, $3, e, $4, 'pending', now(), now() + interval '1 hour'
        FROM unnest($1::text[], $2::text[]) AS x(d, e)
        """,
        deliveries,
        events,
        tenant,
        target,
    )
    await conn.execute("ANALYZE")
    return target


@dataclass
class Drain:
    """One database's drainer, and what its cycles cost."""

    conn: Conn
    target: str
    batch: int
    pid: int = 0
    holder: str = field(default_factory=lambda: new_id("drn"))
    claim_s: float = 0.0
    record_s: float = 0.0
    cpu_s: float = 0.0
    done: int = 0
    #: the share of the claims' updates of deliveries_open that were HOT
    hot: float = 0.0

    async def cycle(self) -> bool:
        """One claim and its record; False once nothing was claimed."""
        cpu0 = backend_cpu(self.pid)
        t0 = time.perf_counter()
        share = await claims.claim_share(
            self.conn,
            self.target,
            want=2 * self.batch,
            lease_s=30,
            holder=self.holder,
            ahead=self.batch,
        )
        t1 = time.perf_counter()
        self.claim_s += t1 - t0
        if share.rows:
            now = datetime.now(UTC)
            attempts = [
                claims.Attempt(c, now, 3, 200, None, None, "succeeded", None, None, None)
                for c in share.rows
            ]
            t2 = time.perf_counter()
            ids = await claims.record_batch(
                self.conn, self.target, attempts, breaker=None, failing=False
            )
            self.record_s += time.perf_counter() - t2
            self.done += len(ids)
        self.cpu_s += backend_cpu(self.pid) - cpu0
        return bool(share.rows)


async def open_drain(
    admin: asyncpg.Connection, name: str, args: argparse.Namespace, sql: str
) -> Drain:
    await admin.execute(f"DROP DATABASE IF EXISTS {name}")
    await admin.execute(f"CREATE DATABASE {name}")
    conn = await connect(f"{PG}/{name}")
    await migrate(conn)
    if sql:
        await conn.execute(sql)
    target = await fill(conn, args.deliveries, args.batch)
    drain = Drain(conn, target, args.batch)
    drain.pid = await conn.fetchval("SELECT pg_backend_pid()")
    return drain


async def run_once(args: argparse.Namespace) -> list[tuple[float, float, float, float]]:
    names = [f"bench_cycle_{os.getpid()}_a"] + (
        [f"bench_cycle_{os.getpid()}_b"] if args.sql else []
    )
    admin = await asyncpg.connect(f"{PG}/postgres")
    drains: list[Drain] = []
    try:
        for name, sql in zip(names, ["", args.sql], strict=False):
            drains.append(await open_drain(admin, name, args, sql))
        print("draining", flush=True)
        live = list(drains)
        while live:
            live = [d for d in live if await d.cycle()]
        for d in drains:
            await d.conn.execute("SELECT pg_stat_force_next_flush()")
        for d in drains:
            d.hot = await d.conn.fetchval(
                "SELECT n_tup_hot_upd::float8 / nullif(n_tup_upd, 0) FROM pg_stat_user_tables"
                " WHERE relname = 'deliveries_open'"
            )
            left = await d.conn.fetchval(
                "SELECT count(*) FROM deliveries WHERE status <> 'succeeded'"
            )
            assert d.done == args.deliveries and left == 0, (d.done, left)
    finally:
        for d in drains:
            await d.conn.close()
        for name in names:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    n = args.deliveries
    return [(d.claim_s / n * 1e6, d.record_s / n * 1e6, d.cpu_s / n * 1e6, d.hot) for d in drains]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--deliveries", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sql", default="", help="run on the second database (an A/B)")
    args = parser.parse_args()
    labels = ["A (as migrated)", "B (with --sql)"] if args.sql else ["as migrated"]
    figures: list[list[tuple[float, float, float, float]]] = []
    for i in range(args.runs):
        figures.append(asyncio.run(run_once(args)))
        for label, (claim_us, record_us, cpu_us, hot) in zip(labels, figures[-1], strict=True):
            print(
                f"run {i + 1} {label}: claim {claim_us:.1f} µs + record {record_us:.1f} µs"
                f" a delivery (wall); Postgres backend CPU {cpu_us:.1f} µs a delivery;"
                f" {hot:.0%} of the claims' updates HOT"
            )
    for k, label in enumerate(labels):
        med = [statistics.median(f[k][j] for f in figures) for j in range(4)]
        print(
            f"median of {args.runs}, {label}: claim {med[0]:.1f} µs, record {med[1]:.1f} µs,"
            f" Postgres CPU {med[2]:.1f} µs a delivery, {med[3]:.0%} HOT"
        )


if __name__ == "__main__":
    main()
