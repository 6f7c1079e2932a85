"""The gateway's ingest path, each figure beside its ceiling, all measured in one run.

    python bench/ingest.py [--seconds 5] [--results] [--soak 1000000 [--soak-rate 5000]]

Prints figures; asserts nothing. Needs Postgres at postgresql://root@127.0.0.1:5432/test
(a fresh database relay_bench_<hex> is created and dropped at the end, error or not),
Redis db 13 at 127.0.0.1:6379 or BENCH_REDIS_URL (flushed at the start and at the end)
and wrk on the PATH. Every process it starts has its own session and is killed at the end. A default
run takes under a minute on 2 cores.

1. Setup: migrate; a gateway creates tenant A (one token source, no target) and
   tenant B (one token source, 2 targets matching Bill on 127.0.0.1, where nothing
   listens: no worker runs, deliveries stay pending); the gateway is stopped.
2. Ceilings, with no relay process running (before each, the machine's CPU busy %
   over 0.5 s, sampled again for up to 3 s while over 10%, and the count of
   `relay.cli` processes are printed):
   - the bare aiohttp handler (bench/bare.py), wrk -t1 -c64, POSTing the single event;
   - Postgres COPY (asyncpg copy_records_to_table, from this process) into the
     bench database's real tables: 100 events + 200 deliveries (B's source and
     targets) per transaction, 8 connections, in rows/s; then the rows are removed.
3. `relay serve --processes 1` (after 1 s of warm-up), each phase --seconds of
   wrk -t1 --latency: (a) a single event to A (no target), 64 connections;
   (b) a single event to B (2 targets), 64 connections; (c) batches of 100
   events to B, 16 connections, in rows/s = requests/s x 300 (events + deliveries).
   Each phase prints requests/s, p50/p99 latency, non-2xx answers, its ratio to
   the ceiling, the CPU used (the machine's, the gateway's), the max VmRSS of the
   gateway (its process and all descendants, sampled every 0.5 s) and a check of
   "every event committed before its 202": (i) the tenant's events committed
   during the phase, counted right after wrk ends, beside the events wrk got a
   202 for, and its deliveries beside events x targets; (ii) a probe POSTs one
   event every 0.1 s during the phase and looks the answered event ids up in
   Postgres as soon as the 202 arrives (a miss would be a 202 before the commit).
4. `relay serve --processes 2` (when `relay serve --help` offers --processes):
   phase (b) again, beside the 1-process figure.
5. --soak N (not by default): a fresh 1-process gateway gets N events to B in
   batches of 100, open loop at --soak-rate events/s (at most 32 requests in
   flight); the gateway's VmRSS is printed every 100,000 events.

Ends with a table (figure | value | ceiling / target | ratio); --results appends
it to bench/RESULTS.md (the commit is marked -dirty when relay/, workers/ or
migrations/ have uncommitted changes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import redis
from ulid import ULID
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import free_port, stop, wait_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ADMIN_DSN = "postgresql://root@127.0.0.1:5432/test"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
JSON = {"Content-Type": "application/json"}
EVENT = (
    '{"date":"2026-11-28T12:00:00Z","objectType":"Bill","action":"paid",'
    '"objectId":4711,"tenantId":42}'
)
BATCH_SIZE = 100
BATCH = "[" + ",".join([EVENT] * BATCH_SIZE) + "]"
TARGETS = 2  # B's targets: each of B's events makes this many deliveries
CONNECTIONS = 64
BATCH_CONNECTIONS = 16
COPY_CONNECTIONS = 8
RESULTS_HEADING = "# bench/ingest.py results"
PROCS: list[subprocess.Popen[bytes]] = []  # every process started, killed at exit

Row = tuple[str, str, str, str]  # figure, value, ceiling / target, ratio


# --- processes, ports, /proc --------------------------------------------------------------


def listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (several processes with SO_REUSEPORT: several)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=out, start_new_session=True)
    PROCS.append(proc)
    return proc


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it (parents read from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError, IndexError, ValueError):
        status = Path(f"/proc/{pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024
    return None


@dataclass
class Rss:
    """VmRSS of a process tree: the largest sum seen, and the largest per process."""

    root: int
    max_total: float = 0.0
    per_pid: dict[int, float] = field(default_factory=dict)

    def sample(self) -> float:
        total = 0.0
        for pid in descendants(self.root):
            mib = rss_mib(pid)
            if mib is not None:
                self.per_pid[pid] = max(self.per_pid.get(pid, 0.0), mib)
                total += mib
        self.max_total = max(self.max_total, total)
        return total

    async def run(self, every: float = 0.5) -> None:
        while True:
            self.sample()
            await asyncio.sleep(every)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds that ``pids`` have used so far."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_times() -> tuple[int, int]:
    """Total and idle (idle + iowait) jiffies of the machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]
    return sum(values), values[3] + values[4]


def busy_since(before: tuple[int, int]) -> float:
    total, idle = cpu_times()
    return 1 - (idle - before[1]) / max(1, total - before[0])


def process_ticks() -> dict[int, tuple[str, int]]:
    """Every process's name and user + system CPU ticks so far."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            text = stat.read_text()
            fields = text.rsplit(")", 1)[1].split()
            name = text.split("(", 1)[1].rsplit(")", 1)[0]
            found[int(stat.parent.name)] = (name, int(fields[11]) + int(fields[12]))
    return found


async def quiet(tries: int = 6) -> str:
    """The machine's CPU busy over 0.5 s and the relay processes running, as a note.

    Samples again (up to ``tries`` times) while the CPU is over 10% busy, and then
    names the busiest processes.
    """
    for _ in range(tries):
        before, ticks = cpu_times(), process_ticks()
        await asyncio.sleep(0.5)
        busy = busy_since(before)
        if busy <= 0.1:
            break
    found = subprocess.run(["pgrep", "-f", "relay.cli"], capture_output=True, text=True).stdout
    note = f"before: CPU {busy:.0%} busy, {len(found.split())} relay processes running"
    if busy > 0.1 or found:
        used = [
            (after - ticks[pid][1], name)
            for pid, (name, after) in process_ticks().items()
            if pid in ticks and after > ticks[pid][1]
        ]
        hz = os.sysconf("SC_CLK_TCK") * 0.5  # ticks in the 0.5 s of a sample
        busiest = ", ".join(f"{name} {t / hz:.0%}" for t, name in sorted(used, reverse=True)[:3])
        print(f"  warning: machine not quiet ({note}; busiest: {busiest})", flush=True)
    return note


# --- wrk ----------------------------------------------------------------------------------


@dataclass
class Wrk:
    """What wrk measured."""

    requests: int  # completed requests, whatever their status
    rate: float  # requests/s
    non_2xx: int
    socket_errors: str  # "" when none
    p50_ms: float
    p99_ms: float

    @property
    def accepted(self) -> int:
        return self.requests - self.non_2xx


def _ms(out: str, percentile: str) -> float:
    found = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
    if found is None:
        return float("nan")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[found[2]]
    return float(found[1]) * scale


async def wrk(url: str, body: str, seconds: int, connections: int, scripts: Path) -> Wrk:
    """``wrk -t 1 --latency`` POSTing ``body`` (JSON) to ``url``."""
    script = scripts / f"post-{len(body)}.lua"
    lua_body = body.replace("\\", "\\\\").replace('"', '\\"')
    script.write_text(
        f'wrk.method = "POST"\nwrk.body = "{lua_body}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    args = ["-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    args += ["-s", str(script), url]
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec("wrk", *args, stdout=pipe, stderr=pipe)
    stdout, stderr = await proc.communicate()
    out = stdout.decode()
    requests = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if proc.returncode or requests is None or rate is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}{stderr.decode()}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return Wrk(
        requests=int(requests[1]),
        rate=float(rate[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=errors[1].strip() if errors else "",
        p50_ms=_ms(out, "50"),
        p99_ms=_ms(out, "99"),
    )


# --- the database and the relay -----------------------------------------------------------


async def sql(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def checkpoint(dsn: str) -> None:
    """Flush dirty pages now, so that a checkpoint is less likely to land in a phase."""
    with contextlib.suppress(asyncpg.PostgresError):
        await sql(dsn, "CHECKPOINT")


def relay(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay.cli", *args]


def serve_has_processes(env: dict[str, str]) -> bool:
    """Whether ``relay serve`` takes --processes N."""
    help_text = subprocess.run(
        relay("serve", "--help"), env=env, capture_output=True, text=True, cwd=ROOT
    ).stdout
    return "--processes" in help_text


@dataclass
class Tenant:
    id: str
    source_id: str
    secret: str
    target_ids: list[str]

    def ingest_url(self, base: str) -> str:
        return str(URL(f"{base}/in/{self.source_id}").with_query(token=self.secret))


@dataclass
class Bench:
    """The bench database, the relay's environment, where logs and scripts go."""

    dsn: str
    env: dict[str, str]
    logdir: Path
    has_processes: bool = False
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.logdir / "relay.log"

    async def gateway(self, processes: int = 1) -> tuple[subprocess.Popen[bytes], str]:
        """A gateway on a fresh port, once all its processes listen; and its base URL."""
        port = free_port()
        args = relay("serve", "--host", "127.0.0.1", "--port", str(port))
        if self.has_processes:
            args += ["--processes", str(processes)]
        proc = spawn(args, self.env, self.log)
        deadline = time.monotonic() + 60
        while listeners(port) < processes:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway does not listen on {port} ({processes}x)")
            await asyncio.sleep(0.05)
        return proc, f"http://127.0.0.1:{port}"

    async def count(self, tenant_id: str) -> tuple[int, int]:
        """The tenant's events and deliveries in the database (one snapshot)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM events WHERE tenant_id = $1),"
                " (SELECT count(*) FROM deliveries WHERE tenant_id = $1)",
                tenant_id,
            )
            return int(row[0]), int(row[1])
        finally:
            await conn.close()


async def api(base: str, path: str, token: str, body: object) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(base + path, json=body, headers=headers) as resp,
    ):
        if resp.status >= 300:
            raise RuntimeError(f"POST {path}: {resp.status} {await resp.text()}")
        answer: dict[str, Any] = await resp.json()
        return answer


async def tenant(base: str, admin_token: str, name: str, targets: int, sink: int) -> Tenant:
    """A tenant with one token source and ``targets`` targets matching Bill."""
    created = await api(base, "/v1/tenants", admin_token, {"name": name})
    key = str(created["api_key"])
    source = await api(base, "/v1/sources", key, {"name": "s", "auth": {"type": "token"}})
    target_ids = []
    for i in range(targets):
        body = {"url": f"http://127.0.0.1:{sink}/{name}{i}", "filter": {"objectType": ["Bill"]}}
        target_ids.append(str((await api(base, "/v1/targets", key, body))["id"]))
    return Tenant(str(created["id"]), str(source["id"]), str(source["secret"]), target_ids)


# --- ceilings -----------------------------------------------------------------------------


async def bare_ceiling(bench: Bench, seconds: int) -> Wrk:
    port = free_port()
    proc = spawn([sys.executable, str(HERE / "bare.py"), "serve", str(port)], bench.env, bench.log)
    try:
        await wait_port(port)
        return await wrk(f"http://127.0.0.1:{port}/", EVENT, seconds, CONNECTIONS, bench.logdir)
    finally:
        stop(proc, grace=15)


EVENT_COLUMNS = (
    "id",
    "tenant_id",
    "source_id",
    "upstream_uuid",
    "upstream_date",
    "object_type",
    "action",
    "object_id",
    "upstream_tenant_id",
    "payload",
)
DELIVERY_COLUMNS = ("id", "tenant_id", "event_id", "target_id", "next_attempt_at", "enqueued_until")


async def copy_ceiling(dsn: str, b: Tenant, seconds: int) -> float:
    """Rows/s (events + deliveries) that COPY writes: 100 + 200 rows a transaction."""
    # upstream_date, object_type, action, object_id, upstream_tenant_id, payload
    parsed = ("2026-11-28T12:00:00Z", "Bill", "paid", "4711", "42", EVENT.encode())
    stamp = str(ULID())[:16]  # ids as long and as ordered as the relay's ULIDs
    deadline = time.perf_counter() + seconds

    async def run(worker: int) -> int:
        conn = await asyncpg.connect(dsn)
        rows, n = 0, 0
        try:
            while time.perf_counter() < deadline:
                now = datetime.now(UTC)
                later = now + timedelta(seconds=60)
                events, deliveries = [], []
                for _ in range(BATCH_SIZE):
                    n += 1
                    event_id = f"evt_{stamp}{worker:02d}{n:08d}"
                    events.append((event_id, b.id, b.source_id, None, *parsed))
                    for k, target_id in enumerate(b.target_ids):
                        delivery_id = f"dlv_{stamp}{worker:02d}{n:07d}{k}"
                        deliveries.append((delivery_id, b.id, event_id, target_id, now, later))
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        "events", records=events, columns=EVENT_COLUMNS
                    )
                    await conn.copy_records_to_table(
                        "deliveries", records=deliveries, columns=DELIVERY_COLUMNS
                    )
                rows += len(events) + len(deliveries)
        finally:
            await conn.close()
        return rows

    started = time.perf_counter()
    rows = await asyncio.gather(*(run(w) for w in range(COPY_CONNECTIONS)))
    rate = sum(rows) / (time.perf_counter() - started)
    await sql(dsn, "TRUNCATE events, deliveries, attempts")
    return rate


# --- the relay's phases -------------------------------------------------------------------


@dataclass
class Probe:
    """Single events POSTed beside wrk, each looked up in Postgres once its 202 arrived."""

    visible: int = 0  # 202s whose events Postgres had committed when the answer came
    missing: int = 0  # 202s whose events Postgres did not have: a 202 before its commit
    other: int = 0  # answers other than 202

    @property
    def accepted(self) -> int:
        return self.visible + self.missing

    async def run(self, url: str, dsn: str, every: float = 0.1) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with aiohttp.ClientSession() as session:
                while True:
                    async with session.post(url, data=EVENT, headers=JSON) as resp:
                        answer = await resp.json() if resp.status == 202 else None
                    if answer is None:
                        self.other += 1
                    else:
                        ids = answer["event_ids"]
                        found = await conn.fetchval(
                            "SELECT count(*) FROM events WHERE id = any($1::text[])", ids
                        )
                        if found == len(ids):
                            self.visible += 1
                        else:
                            self.missing += 1
                    await asyncio.sleep(every)
        finally:
            await conn.close()


@dataclass(frozen=True)
class Load:
    """What a phase sends: to whom, which body, over how many connections."""

    name: str
    owner: Tenant
    body: str
    events: int  # per request
    connections: int
    ceiling: float  # what its figure is compared with
    rows: bool = False  # its figure in rows/s (events + their deliveries), not events/s


@dataclass
class Phase:
    """One wrk run against the gateway, and what the database says of it."""

    load: Load
    wrk: Wrk
    committed: int  # the owner's events committed from the phase's start to wrk's end
    deliveries: int  # the owner's deliveries committed meanwhile
    probe: Probe
    rss: Rss
    busy: float  # the machine's CPU busy during the phase
    gateway_cpu: float  # the gateway's CPU seconds per second (1.0: one core)

    @property
    def events_rate(self) -> float:
        return self.wrk.rate * self.load.events

    @property
    def figure(self) -> float:
        """Events/s, or rows/s (events and deliveries) for a ``rows`` load."""
        return self.events_rate * (1 + len(self.load.owner.target_ids) * self.load.rows)

    @property
    def unit(self) -> str:
        return "rows/s" if self.load.rows else "events/s"

    @property
    def accepted(self) -> int:
        """Events that got a 202: wrk's and the probe's."""
        return self.wrk.accepted * self.load.events + self.probe.accepted

    @property
    def commit_ok(self) -> bool:
        return self.committed >= self.accepted and not self.probe.missing

    @property
    def fan_out(self) -> str:
        """Deliveries beside events x targets (counted in the same snapshot)."""
        targets = len(self.load.owner.target_ids)
        sign = "=" if self.deliveries == targets * self.committed else "!="
        return f"deliveries {self.deliveries:,} {sign} {targets} x {self.committed:,}"

    def report(self, prefix: str = "") -> None:
        """Print the phase, its figure beside its ceiling."""
        errors = f", socket errors: {self.wrk.socket_errors}" if self.wrk.socket_errors else ""
        count = len(self.rss.per_pid)
        processes = f" (the sum of its {count} processes)" if count > 1 else ""
        print(
            f"  {prefix}{self.load.name}, -c{self.load.connections}: {self.figure:,.0f}"
            f" {self.unit} ({self.wrk.rate:,.0f} req/s) = {self.figure / self.load.ceiling:.2f}"
            " of the ceiling;"
            f" p50/p99 {self.wrk.p50_ms:.1f}/{self.wrk.p99_ms:.1f} ms;"
            f" non-2xx {self.wrk.non_2xx}{errors}",
            flush=True,
        )
        print(
            f"      CPU {self.busy:.0%} busy, the gateway {self.gateway_cpu:.0%} of a core;"
            f" gateway RSS max {self.rss.max_total:.0f} MiB{processes}",
            flush=True,
        )
        flag = "" if self.commit_ok else "  <-- NOT every event was committed before its 202"
        print(
            f"      committed {self.committed:,} events, 202'd {self.accepted:,}"
            f" (wrk {self.wrk.accepted:,} x {self.load.events} + probe {self.probe.accepted});"
            f" probe: {self.probe.visible} of {self.probe.accepted} visible at once;"
            f" {self.fan_out}{flag}",
            flush=True,
        )

    def rows(self, label: str) -> list[Row]:
        """Its latency and its commit check, as rows of the table."""
        p99 = self.wrk.p99_ms
        return [
            (
                f"   latency p50/p99, {label}",
                f"{self.wrk.p50_ms:.1f}/{p99:.1f} ms",
                "target p99 < 50 ms" if self.load.events == 1 else "",
                f"{p99 / 50:.2f}" if self.load.events == 1 else "",
            ),
            (
                f"   every event committed before its 202, {label}",
                f"{self.committed:,} committed, {self.accepted:,} 202'd",
                f"probe: {self.probe.visible}/{self.probe.accepted} visible at once;"
                f" non-2xx {self.wrk.non_2xx}; {self.fan_out}",
                "ok" if self.commit_ok else "VIOLATED",
            ),
        ]


async def measure(
    bench: Bench, gateway: subprocess.Popen[bytes], base: str, load: Load, seconds: int
) -> Phase:
    url = load.owner.ingest_url(base)
    await asyncio.sleep(0.5)  # what the last wrk left in flight commits, and is not counted
    events0, deliveries0 = await bench.count(load.owner.id)
    rss, probe = Rss(gateway.pid), Probe()
    rss.sample()
    pids = descendants(gateway.pid)
    cpu0, gateway0, started = cpu_times(), cpu_seconds(pids), time.perf_counter()
    background = [asyncio.create_task(rss.run()), asyncio.create_task(probe.run(url, bench.dsn))]
    try:
        result = await wrk(url, load.body, seconds, load.connections, bench.logdir)
    finally:
        for task in background:  # first: a 202 the probe got after the count would be amiss
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    events1, deliveries1 = await bench.count(load.owner.id)  # at once: each 202 is committed
    busy = busy_since(cpu0)
    gateway_cpu = (cpu_seconds(pids) - gateway0) / (time.perf_counter() - started)
    rss.sample()
    committed, deliveries = events1 - events0, deliveries1 - deliveries0
    return Phase(load, result, committed, deliveries, probe, rss, busy, gateway_cpu)


async def phases(bench: Bench, processes: int, loads: list[Load], seconds: int) -> list[Phase]:
    """A gateway of ``processes`` processes, a second of warm-up per tenant, then ``loads``."""
    gateway, base = await bench.gateway(processes)
    done = []
    try:
        for owner in {load.owner.id: load.owner for load in loads}.values():
            await wrk(owner.ingest_url(base), EVENT, 1, CONNECTIONS, bench.logdir)
        for load in loads:
            done.append(await measure(bench, gateway, base, load, seconds))
            done[-1].report(f"--processes {processes}: " if processes > 1 else "")
        return done
    finally:
        stop(gateway, grace=15)


async def soak(bench: Bench, b: Tenant, total: int, rate: float) -> list[Row]:
    """``total`` events to B in batches of 100, open loop at ``rate`` events/s."""
    requests, every = total // BATCH_SIZE, BATCH_SIZE / rate
    sent = answered = accepted = 0
    lag = 0.0
    gateway, base = await bench.gateway(1)
    try:
        url = b.ingest_url(base)
        await wrk(url, EVENT, 1, CONNECTIONS, bench.logdir)  # warm-up
        await asyncio.sleep(0.5)  # what it left in flight commits, and is not counted
        events0, _ = await bench.count(b.id)
        rss = Rss(gateway.pid)
        marks = [(0, rss.sample())]
        print(f"  soak: {requests * BATCH_SIZE:,} events to B, batches of 100, {rate:,.0f}/s")
        print(f"    {0:>10,} events: gateway RSS {marks[0][1]:.0f} MiB", flush=True)
        started = time.perf_counter()

        async def sender(session: aiohttp.ClientSession) -> None:
            nonlocal sent, answered, accepted, lag
            while sent < requests:
                delay = started + sent * every - time.perf_counter()
                sent += 1
                if delay > 0:
                    await asyncio.sleep(delay)
                lag = max(lag, -delay)
                with contextlib.suppress(aiohttp.ClientError):  # counted as not 202
                    async with session.post(url, data=BATCH, headers=JSON) as resp:
                        await resp.read()
                        accepted += resp.status == 202
                answered += 1
                if answered * BATCH_SIZE % 100_000 == 0 or answered == requests:
                    marks.append((answered * BATCH_SIZE, rss.sample()))
                    so_far = answered * BATCH_SIZE / (time.perf_counter() - started)
                    print(
                        f"    {marks[-1][0]:>10,} events: gateway RSS {marks[-1][1]:.0f} MiB"
                        f" ({so_far:,.0f} events/s so far)",
                        flush=True,
                    )

        sampler = asyncio.create_task(rss.run())
        try:
            connector = aiohttp.TCPConnector(limit=32)
            async with aiohttp.ClientSession(connector=connector) as session:
                await asyncio.gather(*(sender(session) for _ in range(32)))
        finally:
            sampler.cancel()
        elapsed = time.perf_counter() - started
        committed = (await bench.count(b.id))[0] - events0
    finally:
        stop(gateway, grace=15)
    print(
        f"    committed {committed:,} events, 202'd {accepted * BATCH_SIZE:,};"
        f" {requests - accepted} requests not 202; worst send lag {lag * 1000:,.0f} ms;"
        f" {requests * BATCH_SIZE / elapsed:,.0f} events/s",
        flush=True,
    )
    (_, start), (first_at, first), (last_at, last) = marks[0], marks[1], marks[-1]
    return [
        (
            f"soak: gateway RSS over {last_at:,} events (batches of 100, {rate:,.0f}/s)",
            f"{start:.0f} MiB at 0, {first:.0f} at {first_at:,}, {last:.0f} at {last_at:,}"
            f" (max {rss.max_total:.0f})",
            "target < 200 MiB, flat",
            f"{last / first:.2f} last/first",
        ),
        (
            "   soak: every event committed",
            f"{committed:,} committed, {accepted * BATCH_SIZE:,} 202'd",
            f"{requests - accepted} requests not 202",
            "ok" if committed >= accepted * BATCH_SIZE else "VIOLATED",
        ),
    ]


# --- the run ------------------------------------------------------------------------------


async def setup(bench: Bench) -> tuple[Tenant, Tenant]:
    """Migrate; tenant A (no target) and B (2 targets) made through a gateway, stopped."""
    subprocess.run(relay("migrate"), env=bench.env, check=True, capture_output=True, cwd=ROOT)
    gateway, base = await bench.gateway(1)
    try:
        token, sink = bench.env["RELAY_ADMIN_TOKEN"], free_port()  # no worker: nothing listens
        return (
            await tenant(base, token, "A", 0, sink),
            await tenant(base, token, "B", TARGETS, sink),
        )
    finally:
        stop(gateway, grace=15)


async def run(args: argparse.Namespace, bench: Bench) -> list[Row]:
    seconds = args.seconds
    a, b = await setup(bench)

    # ceilings, nothing of the relay running
    await checkpoint(bench.dsn)
    note = await quiet()
    bare = await bare_ceiling(bench, seconds)
    print(
        f"  ceiling, bare aiohttp handler, -c{CONNECTIONS}: {bare.rate:,.0f} req/s;"
        f" p50/p99 {bare.p50_ms:.1f}/{bare.p99_ms:.1f} ms ({note})",
        flush=True,
    )
    rows: list[Row] = [
        (
            f"ceiling: bare aiohttp handler, wrk -t1 -c{CONNECTIONS}",
            f"{bare.rate:,.0f} req/s (p99 {bare.p99_ms:.1f} ms)",
            note,
            "",
        )
    ]
    note = await quiet()
    copy = await copy_ceiling(bench.dsn, b, seconds)
    print(
        f"  ceiling, Postgres COPY, 100 events + 200 deliveries a transaction,"
        f" {COPY_CONNECTIONS} connections: {copy:,.0f} rows/s ({note})",
        flush=True,
    )
    rows.append(
        (
            f"ceiling: Postgres COPY, 100 events + 200 deliveries a tx, {COPY_CONNECTIONS} conns",
            f"{copy:,.0f} rows/s",
            note,
            "",
        )
    )
    await checkpoint(bench.dsn)

    # one gateway process
    batches = f"batches of 100, {TARGETS} targets"
    loads = [
        Load("1 event, no target", a, EVENT, 1, CONNECTIONS, bare.rate),
        Load(f"1 event, {TARGETS} targets", b, EVENT, 1, CONNECTIONS, bare.rate),
        Load(batches, b, BATCH, BATCH_SIZE, BATCH_CONNECTIONS, copy, rows=True),
    ]
    single_a, single_b, batch_b = await phases(bench, 1, loads, seconds)
    for p, target in ((single_a, 0.6), (single_b, 0.5)):
        rows.append(
            (
                f"{p.load.name}, -c{CONNECTIONS}",
                f"{p.events_rate:,.0f} events/s",
                f">= {target} x bare {bare.rate:,.0f} req/s",
                f"{p.events_rate / bare.rate:.2f}",
            )
        )
        rows += p.rows(p.load.name)
    rows.append(
        (
            f"{batch_b.load.name}, -c{BATCH_CONNECTIONS}",
            f"{batch_b.figure:,.0f} rows/s ({batch_b.events_rate:,.0f} events/s)",
            f">= 0.3 x COPY {copy:,.0f} rows/s",
            f"{batch_b.figure / copy:.2f}",
        )
    )
    rows += batch_b.rows("batches of 100")
    rss = max(p.rss.max_total for p in (single_a, single_b, batch_b))
    rows.append(("gateway max RSS, 1 process", f"{rss:.0f} MiB", "< 200 MiB", f"{rss / 200:.2f}"))

    # two gateway processes
    if bench.has_processes:
        (double,) = await phases(bench, 2, [single_b.load], seconds)
        print(f"      1 process: {single_b.events_rate:,.0f} events/s", flush=True)
        pids = ", ".join(
            f"{pid}{' (supervisor)' if pid == double.rss.root else ''} {mib:.0f}"
            for pid, mib in sorted(double.rss.per_pid.items())
        )
        rows.append(
            (
                f"--processes 2: {double.load.name}, -c{CONNECTIONS}",
                f"{double.events_rate:,.0f} events/s",
                f"1 process: {single_b.events_rate:,.0f} events/s",
                f"{double.events_rate / single_b.events_rate:.2f}",
            )
        )
        rows += double.rows("--processes 2")
        rows.append(
            (
                "gateway max RSS, --processes 2, all processes",
                f"{double.rss.max_total:.0f} MiB",
                f"max by pid, MiB: {pids}",
                "",
            )
        )
    else:
        note = "relay serve has no --processes: the 2-process phase is skipped"
        print(f"  {note}", flush=True)
        rows.append(("--processes 2", "skipped", note, ""))

    if args.soak:
        rows += await soak(bench, b, args.soak, args.soak_rate)
    return rows


def machine() -> str:
    git = ["git", "rev-parse", "--short", "HEAD"]
    rev = subprocess.run(git, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    changes = ["git", "status", "--porcelain", "--", "relay", "migrations", "workers"]
    if subprocess.run(changes, capture_output=True, text=True, cwd=ROOT).stdout.strip():
        rev += "-dirty"
    cpu = re.search(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text())
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{rev}, {date}, nproc {os.cpu_count()}, {cpu[1] if cpu else '?'}"


def table(rows: list[Row]) -> list[str]:
    lines = ["| figure | value | ceiling / target | ratio |", "| --- | --: | --- | --: |"]
    return lines + [f"| {' | '.join(cell.strip() for cell in row)} |" for row in rows]


def append_results(path: Path, header: str, rows: list[Row]) -> None:
    """Add a section at the end of ``path``, under the ingest heading (added once)."""
    text = path.read_text() if path.exists() else ""
    lines = [] if not text or text.endswith("\n") else [""]
    if RESULTS_HEADING not in text.splitlines():
        lines += ["", RESULTS_HEADING] if text else [RESULTS_HEADING]
    lines += ["", f"## bench/ingest.py, {header}", "", *table(rows)]
    with path.open("a") as out:
        out.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="per phase (default 5)")
    parser.add_argument("--results", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="N",
        help="at the end, N events to B in batches of 100, RSS every 100,000 (default: none)",
    )
    parser.add_argument(
        "--soak-rate", type=float, default=5000, metavar="R", help="soak events/s (default 5000)"
    )
    args = parser.parse_args()
    if 0 < args.soak < BATCH_SIZE:
        parser.error(f"--soak takes at least {BATCH_SIZE} events")
    for signum in (signal.SIGINT, signal.SIGTERM):  # clean up (finally) on either
        signal.signal(signum, signal.default_int_handler)
    header = machine()
    print(f"Relay ingest: {header}; {args.seconds} s a phase, wrk -t1", flush=True)
    db = f"relay_bench_{uuid.uuid4().hex[:12]}"
    dsn = str(URL(ADMIN_DSN).with_path("/" + db))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAY_") and k not in ("DATABASE_URL", "REDIS_URL", "BROKER_URL")
    }
    env |= {
        "DATABASE_URL": dsn,
        "REDIS_URL": REDIS_URL,
        "RELAY_ADMIN_TOKEN": "bench-" + secrets.token_hex(16),
        "RELAY_SECRET_KEY": base64.b64encode(os.urandom(32)).decode(),
        "RELAY_ALLOW_PRIVATE_TARGETS": "1",
        "RELAY_LOG_LEVEL": "WARNING",
    }
    started = time.monotonic()
    failed = True
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as logdir:
        bench = Bench(dsn, env, Path(logdir), serve_has_processes(env))
        try:
            redis.Redis.from_url(REDIS_URL).flushdb()
            asyncio.run(sql(ADMIN_DSN, f'CREATE DATABASE "{db}"'))
            rows = asyncio.run(run(args, bench))
            failed = False
        except KeyboardInterrupt:
            sys.exit("interrupted: every process stopped, the database dropped")
        finally:
            for proc in PROCS:
                stop(proc, grace=5)
            asyncio.run(sql(ADMIN_DSN, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
            redis.Redis.from_url(REDIS_URL).flushdb()
            if failed and bench.log.exists():
                tail = bench.log.read_text(errors="replace")[-3000:]
                print(f"--- the last of the relay's output:\n{tail}", file=sys.stderr)
    print(f"\nbench/ingest.py, {header} ({time.monotonic() - started:.0f} s)\n")
    print("\n".join(table(rows)))
    if args.results:
        append_results(HERE / "RESULTS.md", header, rows)
        print(f"\nappended to {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
