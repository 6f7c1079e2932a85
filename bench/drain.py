"""The delivery half of ``../shared/bench/durable_ratio.py``, alone, repeatable, with CPU times.

    python bench/drain.py [--runs N] [--events 10000] [--cap 32] [--ceiling] [--spy DIR]

Each run: a fresh database, `relay serve --processes 1` with a token source and two
targets (`max_in_flight` --cap, 32 as in durable_ratio) on durable_ratio's counting
sink, a backlog of EVENTS x 2 deliveries ingested while no worker runs, then `relay
worker --processes 2` drains it. Prints the sink's rate (distinct webhook-ids over
first to last receipt, as durable_ratio reads it) and the CPU seconds of the worker
processes and of Postgres (the postmaster's children, reaped ones included) over the
drain. ``--ceiling``: before each run, the same drain by ``limit_durable_worker.py``
as durable_ratio runs it (2 processes, 4 drainers, claims of 256, 32 in flight a
process), with the same CPU figures. ``--spy DIR`` records each worker process with
py-spy (``--idle``, so an idle event loop shows) into DIR. ``DRAIN_SQL``, if set, is
run on the relay's database after its migrations (an experiment's change, A/B).
Uses Redis db 11.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "bench"
sys.path.insert(0, str(SHARED))
_argv, sys.argv = sys.argv, sys.argv[:1]  # it reads its own arguments when imported
import durable_ratio as dr  # type: ignore[import-not-found]  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import busy_since, cpu_of, cpu_sample  # noqa: E402
from profile_gateway import ingest_backlog  # noqa: E402

sys.argv = _argv

PG = "postgresql://root@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379/11"
SPY = ["py-spy", "record", "--idle", "-r", "200", "-f", "raw"]
#: DRAIN_STATS=1: print the calls of each PL/pgSQL function over the run (track_functions)
STATS = bool(os.environ.get("DRAIN_STATS"))
STATS_SQL = (
    "SELECT funcname, calls, round(total_time) AS total_ms, round(self_time) AS self_ms"
    " FROM pg_stat_user_functions ORDER BY self_time DESC LIMIT 12"
)
#: durable_ratio's: 4 drainers a process, claims of 256, 32 requests in flight a process
CEILING_ARGS = ["4", "256", "32"]


def psql(db: str, sql: str) -> str:
    """Run ``sql`` on database ``db`` (it must succeed); what psql printed."""
    return subprocess.run(
        ["psql", "-q", "-h", "127.0.0.1", "-U", "root", "-d", db, "-c", sql],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def postgres_cpu() -> float:
    """The postmaster's live children and its reaped ones, in CPU seconds."""
    out = subprocess.run(["pgrep", "-o", "-x", "postgres"], capture_output=True, text=True)
    master = int(out.stdout.split()[0])
    kids = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True)
    return cpu_of(master, children=True) + sum(cpu_of(int(p)) for p in kids.stdout.split())


class Meter:
    """The CPU Postgres, the sink and the whole machine use from its making to ``line``."""

    def __init__(self, sink_pid: int) -> None:
        self.sink_pid = sink_pid
        self.postgres, self.sink = postgres_cpu(), cpu_of(sink_pid)
        self.machine = cpu_sample()

    def line(self, label: str, rate: float, workers_cpu: list[float]) -> str:
        postgres = postgres_cpu() - self.postgres
        sink = cpu_of(self.sink_pid) - self.sink
        return (
            f"{label}: {rate:,.0f} deliveries/s; workers CPU {workers_cpu} s; "
            f"Postgres CPU {postgres:.2f} s; sink CPU {sink:.2f} s; "
            f"machine {busy_since(self.machine):.0%} busy"
        )


def run(events: int, spy: str | None, n: int, cap: int = 32) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    db = f"bench_drain_{os.getpid()}_{n}"

    def start(*cmd: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            list(cmd),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(p)
        return p

    def stop(p: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    try:
        subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "root", db], check=True)
        subprocess.run(["redis-cli", "-n", "11", "flushdb"], capture_output=True)
        sp = dr.free_port()
        sink_proc = start(sys.executable, str(SHARED / "durable_ratio.py"), "sink", str(sp))
        dr.wait_port(sp)
        sink = f"http://127.0.0.1:{sp}"
        env = {
            **{k: v for k, v in os.environ.items() if k != "BROKER_URL"},
            "DATABASE_URL": f"{PG}/{db}",
            "REDIS_URL": REDIS,
            "RELAY_ADMIN_TOKEN": "drain-admin-token-0123456789abcdef",
            "RELAY_ALLOW_PRIVATE_TARGETS": "1",
            "RELAY_SECRET_KEY": base64.b64encode(os.urandom(32)).decode(),
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_WORKER_METRICS_PORT": "0",
        }
        subprocess.run(["relay", "migrate"], env=env, check=True, capture_output=True)
        if os.environ.get("DRAIN_SQL"):  # an experiment's change, made after the migrations
            psql(db, os.environ["DRAIN_SQL"])
        if STATS:
            psql(db, f"ALTER DATABASE {db} SET track_functions = 'pl'")
        gp = dr.free_port()
        g = start("relay", "serve", "--processes", "1", "--port", str(gp), env=env)
        dr.wait_port(gp)
        base = f"http://127.0.0.1:{gp}"

        def call(path: str, token: str, body: object) -> dict[str, str]:
            req = urllib.request.Request(
                base + path,
                data=json.dumps(body).encode(),
                method="POST",
                headers={"Authorization": f"Bearer {token}", "content-type": "application/json"},
            )
            return json.load(urllib.request.urlopen(req))  # type: ignore[no-any-return]

        key = call("/v1/tenants", env["RELAY_ADMIN_TOKEN"], {"name": "drain"})["api_key"]
        src = call("/v1/sources", key, {"name": "s", "auth": {"type": "token"}})
        for t in ("a", "b"):
            call("/v1/targets", key, {"url": f"{sink}/relay/{t}", "max_in_flight": cap})
        time.sleep(1.5)
        url = f"{base}/in/{src['id']}?token={src['secret']}"
        ingest_backlog(url, events)
        time.sleep(2)
        meter = Meter(sink_proc.pid)
        w = start("relay", "worker", "--processes", "2", env=env)
        spies: list[subprocess.Popen[bytes]] = []
        if spy:
            time.sleep(0.8)
            kids = subprocess.run(["pgrep", "-P", str(w.pid)], capture_output=True, text=True)
            for pid in kids.stdout.split():
                out = Path(spy) / f"worker-{n}-{pid}.txt"
                spies.append(
                    subprocess.Popen(
                        [*SPY, "-o", str(out), "-p", pid],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        rate = asyncio.run(dr.drained(sink, "relay", 2 * events))
        kids = subprocess.run(["pgrep", "-P", str(w.pid)], capture_output=True, text=True)
        figures = meter.line("drain", rate, [round(cpu_of(int(p)), 2) for p in kids.stdout.split()])
        if STATS:
            time.sleep(0.6)  # the backends' statistics are sent at most every 500 ms
            print(psql(db, STATS_SQL), flush=True)
        for s in spies:
            s.send_signal(signal.SIGINT)
            s.wait(30)
        stop(w)
        stop(g)
        print(figures, flush=True)
    finally:
        for p in procs:
            stop(p)
        subprocess.run(
            ["dropdb", "-h", "127.0.0.1", "-U", "root", "--if-exists", db], capture_output=True
        )


def ceiling(events: int, n: int) -> None:
    """The same drain by ``limit_durable_worker.py``, as durable_ratio runs it, with CPU."""
    procs: list[subprocess.Popen[bytes]] = []
    db = f"bench_drainceil_{os.getpid()}_{n}"
    text = (SHARED / "limit_durable_ingest.py").read_text()
    schema = text.split('SCHEMA = """', 1)[1].split('"""', 1)[0]
    body = (
        '{"uuid":"u\' || g || \'","date":"2026-11-28T12:00:00Z","objectType":"Bill",'
        '"action":"paid","objectId":4711,"tenantId":42}'
    )
    fill = f"""
    {schema}
    insert into lim_events (id, source_id, upstream_uuid, payload)
      select 'e' || g, 's', 'u' || g, convert_to('{body}', 'UTF8')
      from generate_series(1, {events}) g;
    insert into lim_deliveries (id, event_id, target_id)
      select e.id || '-' || t, e.id, 'ceiling/' || t
      from lim_events e, (values ('a'), ('b')) v(t);
    create table lim_attempts (delivery_id text, status_code int, duration_ms int,
                               at timestamptz default now());
    analyze lim_events; analyze lim_deliveries;
    """
    try:
        subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "root", db], check=True)
        sp = dr.free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SHARED / "durable_ratio.py"), "sink", str(sp)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        dr.wait_port(sp)
        sink = f"http://127.0.0.1:{sp}"
        psql(db, fill)
        time.sleep(1)
        meter = Meter(procs[0].pid)
        worker = [sys.executable, str(SHARED / "limit_durable_worker.py")]
        workers = [
            subprocess.Popen(
                [*worker, f"{PG}/{db}", sink, *CEILING_ARGS],
                start_new_session=True,
            )
            for _ in range(2)
        ]
        procs.extend(workers)
        rate = asyncio.run(dr.drained(sink, "ceiling", 2 * events))
        workers_cpu = [round(cpu_of(w.pid), 2) for w in workers]
        print(meter.line("ceiling drain", rate, workers_cpu), flush=True)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        subprocess.run(
            ["dropdb", "-h", "127.0.0.1", "-U", "root", "--if-exists", db], capture_output=True
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--cap", type=int, default=32, help="each target's max_in_flight")
    parser.add_argument("--ceiling", action="store_true", help="also the ceiling's drain, first")
    parser.add_argument("--spy", default=None, help="directory for py-spy's raw profiles")
    args = parser.parse_args()
    for n in range(args.runs):
        if args.ceiling:
            ceiling(args.events, n)
        run(args.events, args.spy, n, args.cap)


if __name__ == "__main__":
    main()
