"""The delivery engine's benchmark: four figures, each beside its ceiling or target.

    python bench/engine.py [--quick]

Needs Postgres (DATABASE_URL, default postgresql://root@127.0.0.1:5432/test: each
scenario gets its own database, dropped at the end) and Redis db 12, or
BENCH_REDIS_URL (flushed before each scenario). Every process it starts is in its
own process group and is killed at the end, error or not. Prints the figures and
appends them to bench/RESULTS.md.

1. Ceiling: a bare aiohttp client (this process, 64 requests in flight) POSTing a
   ~200-byte JSON body to the bare receiver (another process, answers 200 at once),
   in requests/s. What one Python process can push to one receiver on this machine:
   the delivery engine does the same work plus Postgres, so it sits below this.
   Measured first, and a warning is printed when the machine is not quiet.
2. Throughput: 5 tenants x 4 targets, all on the bare receiver, 50,000 deliveries
   pending (ingested in batches with no worker running); then `relay worker
   --processes 2` starts and the figure is deliveries/s from its start until
   Postgres counts all of them `succeeded`. Target: >= 0.4 x the ceiling. The
   resident memory (VmRSS) of every process of the worker's group is sampled each
   0.5 s; the figure is the largest, per process. Target: < 200 MiB.
3. Isolation: tenant A has 10 targets that accept a connection and never answer
   (the relay's timeout is 15 s) with 5,000 due deliveries, and a healthy target
   with 5,000. Once the worker is sending A's backlog (hanging connections open and
   A's healthy target receiving), tenant B posts 200 single events at 20/s to its
   healthy target. Figure: p50/p99/max of B's latency, from just before each POST
   to the receiver's receipt (time.time() in both processes, keyed by the event's
   uuid, which the relay forwards byte for byte). Target: p99 < 1 s.
4. Latency: gateway and worker running, one tenant and one healthy target, 500
   single-event POSTs/s for 20 s, open loop (sent on schedule whatever the
   answers). Figures: POST-start-to-receipt p50/p99 (targets < 20 ms / < 100 ms)
   and the gateway's answer time p50/p99.

--quick: 5,000 requests for the ceiling, 5,000 deliveries, 1,000 + 1,000 and 60
events for isolation, 5 s of latency. Figures of a quick run are labelled so.
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
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import redis
from aiohttp import web
from yarl import URL

HERE = Path(__file__).resolve().parent
ADMIN_DSN = os.environ.get("DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
TOKEN = "bench-" + secrets.token_hex(16)
JSON = {"Content-Type": "application/json"}
RELAY_CMD = re.compile(rb"relay\.cli|workers\.broker|bin/relay\x00")
PROCS: list[subprocess.Popen[bytes]] = []  # every process started, killed at exit


def event(kind: str = "Bill") -> tuple[str, str]:
    """A ~200-byte SoftLedger-like event, uuid first (the receiver reads it there)."""
    key = uuid.uuid4().hex
    body = (
        f'{{"uuid":"{key}","date":"2026-11-28T12:00:00.000Z","objectType":"{kind}",'
        f'"action":"paid","objectId":4711,"tenantId":42,"memo":"{"x" * 40}"}}'
    )
    return key, body


# --- the receiver: a separate process (`engine.py receiver PORT HANG_PORT`) ---------


def receiver(port: int, hang_port: int) -> None:
    """Answers any POST 200 at once, noting time.time() by uuid; GET /receipts shows them.

    On ``hang_port`` it accepts connections and never answers.
    """
    first: dict[str, float] = {}
    state = {"count": 0, "hung": 0}

    async def post(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        state["count"] += 1
        if body.startswith(b'{"uuid":"'):
            first.setdefault(body[9:41].decode(), now)
        return web.Response(text="ok")

    async def receipts(request: web.Request) -> web.Response:
        full = request.query.get("full") == "1"
        return web.json_response({**state, **({"at": first} if full else {})})

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state["hung"] += 1
        try:
            while await reader.read(65536):
                pass
        finally:
            state["hung"] -= 1
            writer.close()

    async def start(app: web.Application) -> None:
        app["hang"] = await asyncio.start_server(hang, "127.0.0.1", hang_port)

    app = web.Application()
    app.on_startup.append(start)
    app.router.add_get("/receipts", receipts)
    app.router.add_post("/{tail:.*}", post)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --- processes, databases ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def stop(proc: subprocess.Popen[bytes], grace: float = 5) -> None:
    """SIGTERM to the leader, then SIGKILL to its whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def group_rss(pgid: int) -> dict[int, float]:
    """VmRSS in MiB of each live process of process group ``pgid``."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                status = (stat.parent / "status").read_text()
                found[int(stat.parent.name)] = int(status.split("VmRSS:")[1].split()[0]) / 1024
    return found


def cpu_sample() -> tuple[int, int]:
    """The machine's (total, idle + iowait) CPU ticks since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]
    return sum(values), values[3] + values[4]


def cpu_of(pid: int, *, children: bool = False) -> float:
    """User + system CPU seconds of ``pid`` so far (and of its reaped children); 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def process_cpu() -> dict[int, tuple[str, float]]:
    """Every process's (command line, CPU seconds so far)."""
    got: dict[int, tuple[str, float]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        got[int(proc.name)] = (cmd, cpu_of(int(proc.name)))
    return got


def cpu_by_kind(before: dict[int, tuple[str, float]], seconds: float) -> str:
    """Cores used since ``before``, by kind of process (gateway, worker, Postgres...)."""
    kinds = {
        "gateway": "relay.cli serve",
        "worker": "dramatiq workers.broker",
        "Postgres": "postgres",
        "Redis": "redis-server",
        "receiver": "engine.py receiver",
    }
    used: dict[str, float] = {}
    for pid, (cmd, cpu) in process_cpu().items():
        spent = cpu - before.get(pid, (cmd, 0.0))[1]
        kind = next((k for k, v in kinds.items() if v in cmd), None)
        if kind is None and pid == os.getpid():
            kind = "this bench (the sender)"
        if kind is not None and spent > 0:
            used[kind] = used.get(kind, 0.0) + spent
    return ", ".join(f"{k} {v / seconds:.2f}" for k, v in sorted(used.items(), key=lambda x: -x[1]))


def busy_since(before: tuple[int, int]) -> float:
    """Fraction of the machine's CPU time spent busy since the sample ``before``."""
    total1, idle1 = cpu_sample()
    return 1 - (idle1 - before[1]) / max(1, total1 - before[0])


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of the machine's CPU time spent busy over ``seconds``."""
    before = cpu_sample()
    time.sleep(seconds)
    return busy_since(before)


class Stack:
    """One scenario: its own database and gateway, Redis db 12 flushed, a receiver."""

    def __init__(self, name: str, logdir: Path) -> None:
        self.db = f"bench_engine_{os.getpid()}_{name}"
        parsed = URL(ADMIN_DSN)
        self.dsn = str(parsed.with_path("/" + self.db).with_query(parsed.query))
        self.log = logdir / f"{name}.log"
        self.env = {k: v for k, v in os.environ.items() if k != "BROKER_URL"}
        self.env |= {
            "DATABASE_URL": self.dsn,
            "REDIS_URL": REDIS_URL,
            "RELAY_ADMIN_TOKEN": TOKEN,
            "RELAY_SECRET_KEY": base64.b64encode(os.urandom(32)).decode(),
            "RELAY_ALLOW_PRIVATE_TARGETS": "1",
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_WORKER_METRICS_PORT": "0",
            "PROMETHEUS_MULTIPROC_DIR": str(logdir / f"metrics-{name}"),
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port, self.hang_port, self.gw_port = free_port(), free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.gw_port}"
        self.http: aiohttp.ClientSession
        #: leave the database when done (its name printed), to look into afterwards
        self.keep = False

    async def __aenter__(self) -> Stack:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
        try:
            await sql(ADMIN_DSN, f'CREATE DATABASE "{self.db}"')
            os.makedirs(self.env["PROMETHEUS_MULTIPROC_DIR"])
            redis.Redis.from_url(REDIS_URL).flushdb()
            subprocess.run(relay("migrate"), env=self.env, check=True, capture_output=True)
            await self.start(
                [sys.executable, __file__, "receiver", str(self.port), str(self.hang_port)]
            )
            await wait_port(self.port)
        except BaseException:
            await self.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()
        for proc in self.procs:
            stop(proc)
        if self.keep:
            print(f"database kept: {self.dsn}", flush=True)
        else:
            await sql(ADMIN_DSN, f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        if exc[0] is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            print(f"--- last lines of the relay's output ({self.log}):\n{tail}", file=sys.stderr)

    async def start(self, args: list[str]) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                args, env=self.env, stdout=out, stderr=out, start_new_session=True
            )
        PROCS.append(proc)
        self.procs.append(proc)
        return proc

    async def gateway(self) -> subprocess.Popen[bytes]:
        proc = await self.start(relay("serve", "--port", str(self.gw_port)))
        await wait_port(self.gw_port)
        return proc

    async def worker(self) -> subprocess.Popen[bytes]:
        return await self.start(relay("worker", "--processes", "2"))

    async def api(
        self, path: str, token: str, body: object, method: str = "POST"
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        async with self.http.request(method, self.base + path, json=body, headers=headers) as resp:
            assert resp.status < 300, f"{path}: {resp.status} {await resp.text()}"
            answer: dict[str, Any] = await resp.json()
            return answer

    async def tenant(self, name: str, targets: list[tuple[str, list[str]]]) -> str:
        """A tenant, one token source and ``targets`` (path or URL, objectType filter).

        Answers the source's ingest URL, its secret in the query."""
        key = (await self.api("/v1/tenants", TOKEN, {"name": name}))["api_key"]
        source = await self.api("/v1/sources", key, {"name": "s", "auth": {"type": "token"}})
        for url, kinds in targets:
            url = url if url.startswith("http") else f"http://127.0.0.1:{self.port}{url}"
            await self.api("/v1/targets", key, {"url": url, "filter": {"objectType": kinds}})
        return str(URL(f"{self.base}/in/{source['id']}").with_query(token=source["secret"]))

    async def ingest(self, url: str, bodies: list[str], batch: int = 500) -> None:
        for i in range(0, len(bodies), batch):
            data = "[" + ",".join(bodies[i : i + batch]) + "]"
            async with self.http.post(url, data=data, headers=JSON) as resp:
                assert resp.status == 202, f"ingest: {resp.status} {await resp.text()}"

    async def receipts(self, full: bool = False) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/receipts" + ("?full=1" if full else "")
        async with self.http.get(url) as resp:
            answer: dict[str, Any] = await resp.json()
            return answer

    async def statuses(self) -> dict[str, int]:
        return dict(await sql(self.dsn, "SELECT status, count(*) FROM deliveries GROUP BY 1"))


def relay(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay.cli", *args]


async def sql(dsn: str, statement: str) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(statement))
    finally:
        await conn.close()


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.25)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


# --- the scenarios ---------------------------------------------------------------------


async def ceiling(stack: Stack, total: int, concurrency: int = 64) -> float:
    url = f"http://127.0.0.1:{stack.port}/ceiling"
    body = event()[1].encode()
    left = total

    async def run(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, data=body, headers=JSON) as resp:
                await resp.read()
                assert resp.status == 200

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(run(session) for _ in range(concurrency)))
        return total / (time.perf_counter() - started)


async def throughput(stack: Stack, total: int) -> tuple[float, float, dict[str, float]]:
    """Deliveries/s, seconds from the worker's start to the first receipt, max RSS by pid."""
    gateway = await stack.gateway()
    per_tenant = total // 20  # events per tenant: each reaches its 4 targets
    for t in range(5):
        url = await stack.tenant(f"t{t}", [(f"/t{t}/{i}", []) for i in range(4)])
        await stack.ingest(url, [event()[1] for _ in range(per_tenant)], batch=1000)
    pending = (await stack.statuses()).get("pending", 0)
    assert pending == total, f"{pending} deliveries pending, not {total}"
    stop(gateway)
    rss: dict[str, float] = {}
    began, started = time.time(), time.perf_counter()
    worker = await stack.worker()

    async def sample() -> None:
        while True:
            for pid, mib in group_rss(worker.pid).items():
                name = f"{pid}" + (" (main)" if pid == worker.pid else "")
                rss[name] = max(rss.get(name, 0.0), mib)
            await asyncio.sleep(0.5)

    async def done() -> bool:
        counts = await stack.statuses()
        if counts.get("dead"):
            raise RuntimeError(f"deliveries died: {counts}")
        return counts.get("succeeded", 0) >= total

    sampler = asyncio.create_task(sample())
    try:
        await until(done, max(120, total / 20), f"{total} deliveries to succeed")
        rate = total / (time.perf_counter() - started)
    finally:
        sampler.cancel()
    first = min((await stack.receipts(full=True))["at"].values()) - began
    return rate, first, rss


@dataclass
class Paced:
    """What an open-loop sender saw."""

    sent: dict[str, float] = field(default_factory=dict)  # uuid: time.time() before its POST
    answers: list[float] = field(default_factory=list)  # the gateway's answer times, s
    lag: float = 0.0  # the worst lag of a send behind its schedule, s
    queued: int = 0  # POSTs that waited for a free connection (limit 900)
    rate: float = 0.0  # POSTs answered per second, first send to last answer
    busy: float = 0.0  # the machine's busy share while sending (latency runs)


async def send_paced(
    url: str, count: int, per_second: float, *, until: Callable[[], bool] | None = None
) -> Paced:
    """Open loop: ``count`` single-event POSTs at ``per_second``, whatever the answers
    (fewer if ``until`` turns true first: no POST is sent after it does)."""
    out = Paced()

    async def queued(*_: object) -> None:
        out.queued += 1

    async def post(key: str, body: str) -> None:
        out.sent[key] = time.time()
        began = time.perf_counter()
        async with session.post(url, data=body, headers=JSON) as resp:
            await resp.read()
            assert resp.status == 202, f"ingest: {resp.status}"
        out.answers.append(time.perf_counter() - began)

    trace = aiohttp.TraceConfig()
    trace.on_connection_queued_start.append(queued)
    connector = aiohttp.TCPConnector(limit=900)  # the gateway refuses over 1,000
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        tasks = []
        start = time.perf_counter()
        for i in range(count):
            delay = start + i / per_second - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if until is not None and until():
                break
            out.lag = max(out.lag, -delay)
            tasks.append(asyncio.create_task(post(*event())))
        await asyncio.gather(*tasks)
        out.rate = len(tasks) / (time.perf_counter() - start)
    return out


async def latencies(stack: Stack, sent: dict[str, float], wait: float = 30) -> list[float]:
    """Receipt minus send time of every event of ``sent``, waiting up to ``wait`` s for all."""

    async def arrived() -> bool:
        return bool(sent.keys() <= (await stack.receipts(full=True))["at"].keys())

    with contextlib.suppress(RuntimeError):  # the missing ones are counted by the caller
        await until(arrived, wait, "every event to arrive")
    at = (await stack.receipts(full=True))["at"]
    return [at[key] - began for key, began in sent.items() if key in at]


async def isolation(stack: Stack, backlog: int, events: int) -> tuple[list[float], int, str]:
    """B's latencies, how many of B's events never arrived, and A's state meanwhile."""
    await stack.gateway()
    hang = [(f"http://127.0.0.1:{stack.hang_port}/h{i}", ["Hang"]) for i in range(10)]
    url_a = await stack.tenant("A", [*hang, ("/a", ["Bill"])])
    url_b = await stack.tenant("B", [("/b", [])])
    await stack.ingest(url_a, [event("Hang")[1] for _ in range(backlog // 10)])
    await stack.ingest(url_a, [event()[1] for _ in range(backlog)])
    pending = (await stack.statuses()).get("pending", 0)
    assert pending == 2 * backlog, f"{pending} deliveries pending, not {2 * backlog}"
    await stack.worker()

    async def busy() -> bool:
        state = await stack.receipts()
        return bool(state["hung"] >= 10 and state["count"] > 0)

    await until(busy, 60, "the worker to send A's backlog")
    before = await stack.receipts()
    sent = (await send_paced(url_b, events, 20)).sent
    after = await stack.receipts(full=True)
    got = await latencies(stack, sent)
    healthy = [before["count"], after["count"] - len(sent.keys() & after["at"].keys())]
    state = (
        f"meanwhile {before['hung']}..{after['hung']} hung connections, "
        f"A's healthy target at {healthy[0]:,}..{healthy[1]:,} of {backlog:,}"
    )
    return got, len(sent) - len(got), state


async def latency(stack: Stack, seconds: int, rate: int = 500) -> tuple[Paced, list[float]]:
    await stack.gateway()
    url = await stack.tenant("L", [("/l", [])])
    await stack.worker()
    await latencies(stack, (await send_paced(url, 1, 1)).sent, wait=60)  # the worker is up
    before, procs, started = cpu_sample(), process_cpu(), time.monotonic()
    paced = await send_paced(url, seconds * rate, rate)
    paced.busy = busy_since(before)
    print(f"  cores used while sending: {cpu_by_kind(procs, time.monotonic() - started)}")
    return paced, await latencies(stack, paced.sent)


# --- the run ---------------------------------------------------------------------------


def latency_runs(
    rate: int, runs: int, seconds: int
) -> Callable[[Path], Coroutine[Any, Any, list[tuple[str, str, str]]]]:
    """Figure 4 alone at ``rate`` events/s, ``runs`` times, each on a fresh stack."""

    async def go(logdir: Path) -> list[tuple[str, str, str]]:
        rows = []
        busy = cpu_busy()
        print(f"  before: CPU {busy:.0%} busy")
        for n in range(1, runs + 1):
            async with Stack(f"latency{n}", logdir) as stack:
                paced, got = await latency(stack, seconds, rate)
            ms = [v * 1000 for v in got]
            missing = len(paced.sent) - len(got)
            row = (
                f"4. latency run {n}, {rate:,} events/s for {seconds} s, p50/p99",
                f"{pct(ms, 50):,.1f}/{pct(ms, 99):,.1f} ms",
                f"answered {paced.rate:,.0f}/s, machine {paced.busy:.0%} busy;"
                " targets < 10/50 ms" + (f"; {missing} never arrived" if missing else ""),
            )
            print(f"  {row[0]:<52} {row[1]:>16}   {row[2]}", flush=True)
            rows.append(row)
        return rows

    return go


def machine() -> str:
    git = ["git", "rev-parse", "--short", "HEAD"]
    rev = subprocess.run(git, capture_output=True, text=True, cwd=HERE).stdout.strip()
    cpu = re.search(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text())
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{rev}, {date}, nproc {os.cpu_count()}, {cpu[1] if cpu else '?'}"


async def run(quick: bool, logdir: Path) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []  # figure, value, ceiling or target

    def row(figure: str, value: str, target: str) -> None:
        rows.append((figure, value, target))
        print(f"  {figure:<44} {value:>22}   {target}", flush=True)

    n_ceiling, n_deliveries = (5_000, 5_000) if quick else (20_000, 50_000)
    backlog, b_events, seconds = (1_000, 60, 5) if quick else (5_000, 200, 20)

    busy = cpu_busy()
    others = sum(bool(RELAY_CMD.search(_read(p))) for p in Path("/proc").glob("[0-9]*/cmdline"))
    quiet = f"before: CPU {busy:.0%} busy, {others} relay processes running"
    if busy > 0.1 or others:
        print(f"  warning: machine not quiet ({quiet})")
    async with Stack("ceiling", logdir) as stack:
        top = await ceiling(stack, n_ceiling)
    row("1. ceiling: bare client -> bare receiver", f"{top:,.0f} req/s", quiet)

    async with Stack("throughput", logdir) as stack:
        rate, first, rss = await throughput(stack, n_deliveries)
    first_note = f"worker start to first delivery {first:.1f} s"
    row(f"2. throughput, {n_deliveries:,} deliveries", f"{rate:,.0f} dlv/s", first_note)
    row("   throughput / ceiling", f"{rate / top:.2f}", "target >= 0.4")
    for name, mib in sorted(rss.items()):
        row(f"   max RSS, worker pid {name}", f"{mib:,.0f} MiB", "target < 200 MiB")

    async with Stack("isolation", logdir) as stack:
        got, missing, state = await isolation(stack, backlog, b_events)
    ms = [v * 1000 for v in got]
    value = f"{pct(ms, 50):,.0f}/{pct(ms, 99):,.0f}/{max(ms, default=0):,.0f} ms"
    lost = f"; {missing} never arrived" if missing else ""
    row(f"3. isolation: B's {b_events} events, p50/p99/max", value, "target p99 < 1,000 ms" + lost)
    row("", "", state)

    async with Stack("latency", logdir) as stack:
        paced, got = await latency(stack, seconds)
    ms, answers = [v * 1000 for v in got], [v * 1000 for v in paced.answers]
    lost = f"; {len(paced.sent) - len(got)} never arrived" if len(got) < len(paced.sent) else ""
    value = f"{pct(ms, 50):,.1f}/{pct(ms, 99):,.1f} ms"
    row(f"4. latency, 500 events/s for {seconds} s, p50/p99", value, "targets < 20/100 ms" + lost)
    client = f"{paced.lag * 1000:,.0f} ms, {paced.queued} POSTs waited for a connection"
    note = f"answered {paced.rate:,.0f}/s; client: worst lag {client}"
    row(
        "   gateway answer time p50/p99",
        f"{pct(answers, 50):,.1f}/{pct(answers, 99):,.1f} ms",
        note,
    )
    return rows


def _read(path: Path) -> bytes:
    with contextlib.suppress(OSError):
        return path.read_bytes()
    return b""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, labelled quick")
    parser.add_argument(
        "--latency-only",
        type=int,
        metavar="RATE",
        help="only figure 4, at RATE events/s, --runs times (issue 24: 1,000/s, three runs)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of --latency-only")
    args = parser.parse_args()
    for signum in (signal.SIGINT, signal.SIGTERM):  # clean up (finally) on either
        signal.signal(signum, signal.default_int_handler)
    header = machine() + (" (quick)" if args.quick else "")
    print(f"Relay delivery engine: {header}")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-engine-") as logdir:
            if args.latency_only:
                runs = latency_runs(args.latency_only, args.runs, 5 if args.quick else 20)
                rows = asyncio.run(runs(Path(logdir)))
            else:
                rows = asyncio.run(run(args.quick, Path(logdir)))
    except KeyboardInterrupt:
        sys.exit("interrupted: every process stopped, databases dropped")
    finally:
        for proc in PROCS:
            stop(proc, grace=0)
    results = HERE / "RESULTS.md"
    lines = [] if results.exists() else ["# bench/engine.py results\n"]
    lines += [f"\n## {header}\n", "| figure | value | ceiling / target |", "| --- | --: | --- |"]
    lines += [f"| {figure.strip()} | {value} | {target} |" for figure, value, target in rows]
    with results.open("a") as out:
        out.write("\n".join(lines) + "\n")
    print(f"appended to {results}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["receiver"]:
        receiver(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
