"""Ordered delivery per object (issue 14): the figures it promises, each beside its target.

    python bench/ordering.py [--quick] [--results]

Prints figures; asserts nothing. Needs Postgres (DATABASE_URL, default
postgresql://root@127.0.0.1:5432/test: each run gets a fresh database
relay_bench_ord_<hex>, dropped at the end, error or not) and Redis db 11 (or BENCH_REDIS_URL) at
127.0.0.1:6379 (flushed before and after each run). Reuses bench/engine.py (its
Stack, processes, SQL and percentile helpers). Every process it starts has its own
session and is killed at the end; the relay's output is kept in a temporary
directory and its tail printed when a run fails. A full run takes about 3 minutes.

1. Throughput: one tenant, one target on the bare receiver (answers 200 at once,
   max_in_flight left at its default), 20,000 deliveries pending over 1,000 keys
   (objectType "Bill", objectId k0..k999, 20 events each, in a seeded random
   interleaving, so a batch holds many keys and now and then two events of one),
   ingested in batches of 100 by `relay serve --processes 1` with no worker
   running; then `relay worker --processes 2` starts and the figure is deliveries/s
   from its start until Postgres counts all of them `succeeded`. Run once with the
   target's `ordering: "none"` and once with `"object"`, each on a fresh database.
   Target: ordered >= 0.8 x unordered. Each event carries its key's "seq"; the
   receiver counts first arrivals behind a later event of their key (out of order)
   and arrivals before the key's previous event got its 200 (early: two of a key in
   flight or retrying). Both must be 0 for the ordered target (printed for the
   unordered one too, for reference: there nothing is promised).
2. Latency under a failing key: gateway and worker running, one ordered target,
   RELAY_RETRY_SCHEDULE="0,1,1,1,5" (so a retried event recovers within the run). 200
   single-event POSTs/s for 20 s, open loop: one a second for key Bill/stuck, the
   others round-robin over k0..k998 (a key's next POST waits for its previous one's
   202: the order promised is the order the relay received). Once as a baseline (the
   receiver answers 200 to everything), once with the receiver failing (HTTP 500) the
   first 3 attempts of every Bill/stuck event; same load, fresh database each. Figure:
   p50 and p99 of the other keys' latency, from just before the POST to the receiver's
   receipt (time.time() in both processes, keyed by the event's uuid). Target: the p99
   with the failing key within +10 % of the baseline's.

A throughput run that makes no progress for 30 s, or lasts over 60 s (100 s for the
full backlog), is cut short: its figure is then the rate so far, and the state of
the deliveries (succeeded, parked, active, due, leased; keys with parked deliveries
and no head, keys with several active) and the statements Postgres has been running
for over 2 s are printed.

--quick: 4 events per key (4,000 deliveries) and 4 s of load. --results appends the
table to bench/RESULTS.md. --analyze runs ANALYZE deliveries after scenario 1's
ingest and every 2 s during scenario 2's load (as an eager autovacuum would; the
first row says whether the server's autovacuum is on): the relay's statements'
plans depend on Postgres's statistics. Before each run the machine's CPU busy % and
the count of other relay / dramatiq processes (not this benchmark's) are noted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
from aiohttp import web
from yarl import URL

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import engine  # noqa: E402  (bench/engine.py: importable, no side effects)

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
RETRY_SCHEDULE = "0,1,1,1,5"
STUCK = "stuck"  # objectId of the key whose receiver fails its first attempts
FAILS = 3  # attempts of each of its events answered 500
STALL_S = 30  # scenario 1: a run that has made no progress for this long is cut
LIMIT_S = 60  # ... and one that lasts longer than this (or 200 deliveries/s)
ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|Traceback)\b")


def event(key: str, seq: int) -> tuple[str, str]:
    """A ~230-byte SoftLedger-like event of Bill ``key``, its ``seq`` in its key; uuid first."""
    uid = uuid.uuid4().hex
    body = (
        f'{{"uuid":"{uid}","date":"2026-11-28T12:00:00.000Z","objectType":"Bill",'
        f'"action":"paid","objectId":"{key}","tenantId":42,"seq":{seq},"memo":"{"x" * 40}"}}'
    )
    return uid, body


# --- the receiver: a separate process (`ordering.py receiver PORT FAIL_KEY`) ------------


def receiver(port: int, fail_key: str) -> None:
    """Answers POSTs 200 at once (500 to the first FAILS attempts of ``fail_key``'s events).

    Notes time.time() of each uuid's first arrival and checks each key's order by
    the events' "seq". GET /receipts shows the counts; ?full=1 adds the arrival times.
    """
    first: dict[str, float] = {}  # uuid: first arrival
    attempts: dict[str, int] = defaultdict(int)  # uuid: arrivals
    acked: dict[str, set[int]] = defaultdict(set)  # key: seqs answered 200
    acked_ids: set[str] = set()
    highest: dict[str, int] = {}  # key: highest seq arrived so far
    state: dict[str, int] = defaultdict(int)
    examples: list[str] = []

    def violation(kind: str, text: str) -> None:
        state[kind] += 1
        if len(examples) < 10:
            examples.append(f"{kind}: {text}")

    async def post(request: web.Request) -> web.Response:
        raw = await request.read()
        now = time.time()
        state["count"] += 1
        try:
            data = json.loads(raw)
            uid, seq = str(data["uuid"]), int(data["seq"])
            key = f"{data['objectType']}/{data['objectId']}"
        except (ValueError, KeyError, TypeError):
            state["unparsed"] += 1
            return web.Response(text="ok")
        attempts[uid] += 1
        if uid in acked_ids:
            state["duplicates"] += 1  # at least once: not a violation
        if seq > 0 and seq - 1 not in acked[key]:
            text = f"{key} seq {seq} (attempt {attempts[uid]}) before seq {seq - 1}'s 200"
            violation("early", text)
        if uid not in first:
            first[uid] = now
            if seq < highest.get(key, -1):
                violation("out_of_order", f"{key} seq {seq} after seq {highest[key]}")
            highest[key] = max(seq, highest.get(key, -1))
        if key == fail_key and attempts[uid] <= FAILS:
            state["failed"] += 1
            return web.Response(status=500, text="failing on purpose")
        acked[key].add(seq)
        acked_ids.add(uid)
        return web.Response(text="ok")

    async def receipts(request: web.Request) -> web.Response:
        answer: dict[str, Any] = {
            "count": state["count"],
            "failed": state["failed"],
            "duplicates": state["duplicates"],
            "unparsed": state["unparsed"],
            "early": state["early"],
            "out_of_order": state["out_of_order"],
            "examples": examples,
            "fail_key_acked": len(acked[fail_key]),
        }
        if request.query.get("full") == "1":
            answer["at"] = first
        return web.json_response(answer)

    app = web.Application()
    app.router.add_get("/receipts", receipts)
    app.router.add_post("/{tail:.*}", post)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --- one run: a database, Redis db 11, a receiver, the relay's processes ------------------


class Stack(engine.Stack):
    """engine.Stack with a database relay_bench_ord_<hex>, Redis db 11 and our receiver."""

    def __init__(self, name: str, logdir: Path, fail_key: str = "-") -> None:
        super().__init__(name, logdir)
        self.db = f"relay_bench_ord_{secrets.token_hex(6)}"
        parsed = URL(engine.ADMIN_DSN)
        self.dsn = str(parsed.with_path("/" + self.db).with_query(parsed.query))
        keep = {k: v for k, v in self.env.items() if not k.startswith("RELAY_")}
        self.env = keep | {
            "DATABASE_URL": self.dsn,
            "REDIS_URL": REDIS_URL,
            "RELAY_ADMIN_TOKEN": engine.TOKEN,
            "RELAY_SECRET_KEY": self.env["RELAY_SECRET_KEY"],
            "RELAY_ALLOW_PRIVATE_TARGETS": "1",
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_WORKER_METRICS_PORT": "0",
            "RELAY_RETRY_SCHEDULE": RETRY_SCHEDULE,
        }
        self.fail_key = fail_key
        self.errors: list[str] = []  # error lines of the relay's output, read at the end

    async def __aenter__(self) -> Stack:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
        self.log.touch()  # engine.Stack.__aexit__ reads it on an error
        try:
            await engine.sql(engine.ADMIN_DSN, f'CREATE DATABASE "{self.db}"')
            os.makedirs(self.env["PROMETHEUS_MULTIPROC_DIR"])
            redis.Redis.from_url(REDIS_URL).flushdb()
            with self.log.open("ab") as out:
                migrate = engine.relay("migrate")
                subprocess.run(migrate, env=self.env, check=True, stdout=out, stderr=out)
            await self.start([sys.executable, __file__, "receiver", str(self.port), self.fail_key])
            await engine.wait_port(self.port)
        except BaseException:
            await self.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await super().__aexit__(*exc)
        finally:
            redis.Redis.from_url(REDIS_URL).flushdb()
            if self.log.exists():
                text = self.log.read_text(errors="replace").splitlines()
                self.errors = [line for line in text if ERROR_LINE.search(line)]

    async def gateway(self) -> subprocess.Popen[bytes]:
        args = engine.relay("serve", "--port", str(self.gw_port), "--processes", "1")
        proc = await self.start(args)
        await engine.wait_port(self.gw_port)
        return proc

    async def setup(self, ordering: str) -> str:
        """A tenant, a token source and one target on the receiver; the ingest URL."""
        key = (await self.api("/v1/tenants", engine.TOKEN, {"name": "ord"}))["api_key"]
        source = await self.api("/v1/sources", key, {"name": "s", "auth": {"type": "token"}})
        target = {"url": f"http://127.0.0.1:{self.port}/r", "ordering": ordering}
        await self.api("/v1/targets", key, target)
        return str(URL(f"{self.base}/in/{source['id']}").with_query(token=source["secret"]))


def others_running() -> int:
    """relay.cli / dramatiq processes that are not this benchmark's."""
    found = subprocess.run(
        ["pgrep", "-f", r"relay\.cli|dramatiq"], capture_output=True, text=True
    ).stdout.split()
    mine = {proc.pid for proc in engine.PROCS} | {os.getpid()}
    count = 0
    for pid in map(int, found):
        with contextlib.suppress(ProcessLookupError):
            if pid not in mine and os.getpgid(pid) not in mine:
                count += 1
    return count


def quiet() -> tuple[str, bool]:
    busy, others = engine.cpu_busy(), others_running()
    return (
        f"before: CPU {busy:.0%} busy, {others} other relay processes",
        busy <= 0.1 and not others,
    )


# --- 1. throughput, ordered and not --------------------------------------------------------


@dataclass
class Drained:
    rate: float  # deliveries/s from the worker's start: to all succeeded, or to the cut
    first: float  # worker start to first receipt, s
    spread: float  # first to last receipt, s
    receipts: dict[str, Any]
    cut: str = ""  # how far a run cut short got, and why
    state: str = ""  # what the deliveries and Postgres were doing then


QUEUES = """
SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status = 'dead') AS dead,
       count(*) FILTER (WHERE status = 'pending' AND next_attempt_at IS NULL) AS parked,
       count(*) FILTER (WHERE status IN ('pending', 'retrying')
                        AND next_attempt_at IS NOT NULL) AS active,
       count(*) FILTER (WHERE next_attempt_at <= now()
                        AND (locked_until IS NULL OR locked_until < now())) AS due_now,
       count(*) FILTER (WHERE locked_until > now()) AS leased
FROM deliveries
"""
KEYS = """
SELECT count(*) FILTER (WHERE active = 0 AND parked > 0) AS parked_without_head,
       count(*) FILTER (WHERE active > 1) AS several_active,
       min(parked_key) FILTER (WHERE active = 0 AND parked > 0) AS example
FROM (SELECT order_key AS parked_key,
             count(*) FILTER (WHERE status IN ('pending', 'retrying')
                              AND next_attempt_at IS NOT NULL) AS active,
             count(*) FILTER (WHERE status = 'pending' AND next_attempt_at IS NULL) AS parked
      FROM deliveries WHERE order_key IS NOT NULL GROUP BY order_key) AS k
"""


async def queues(stack: Stack) -> str:
    """The deliveries' state and Postgres's long statements, for a run that stops moving."""
    (row,) = await engine.sql(stack.dsn, QUEUES)
    (keys,) = await engine.sql(stack.dsn, KEYS)
    long = await engine.sql(
        engine.ADMIN_DSN,
        f"""
        SELECT extract(epoch FROM now() - query_start)::int AS s, query FROM pg_stat_activity
        WHERE datname = '{stack.db}' AND state = 'active' AND now() - query_start > '2 s'
        ORDER BY query_start
        """,
    )
    running = "; ".join(f"{r['s']} s: {' '.join(r['query'].split())[:90]}" for r in long)
    got = await stack.receipts()
    return (
        f"deliveries {dict(row)}; ordered keys {dict(keys)}; "
        f"receiver: {got['count']:,} arrivals; "
        f"statements running > 2 s: {running or 'none'}"
    )


def interleaved(keys: int, per_key: int, seed: int = 14) -> list[str]:
    """``keys`` x ``per_key`` events in a seeded random order, each key's seqs rising."""
    order = [k for k in range(keys) for _ in range(per_key)]
    random.Random(seed).shuffle(order)
    seqs = [0] * keys
    bodies = []
    for k in order:
        bodies.append(event(f"k{k}", seqs[k])[1])
        seqs[k] += 1
    return bodies


async def throughput(
    stack: Stack, ordering: str, keys: int, per_key: int, analyze: bool
) -> Drained:
    """Deliveries/s of a backlog; cut after STALL_S without progress or at LIMIT_S."""
    total = keys * per_key
    gateway = await stack.gateway()
    url = await stack.setup(ordering)
    await stack.ingest(url, interleaved(keys, per_key), batch=100)
    pending = (await stack.statuses()).get("pending", 0)
    assert pending == total, f"{pending} deliveries pending, not {total}"
    engine.stop(gateway)
    if analyze:
        await engine.sql(stack.dsn, "ANALYZE deliveries")
    began, started = time.time(), time.perf_counter()
    await stack.worker()
    limit = max(LIMIT_S, total / 200)
    cut, state, succeeded, moved = "", "", 0, time.perf_counter()
    while succeeded < total and not cut:
        await asyncio.sleep(0.25)
        counts = await stack.statuses()
        if counts.get("dead"):
            raise RuntimeError(f"deliveries died: {counts}")
        now = time.perf_counter()
        if counts.get("succeeded", 0) > succeeded:
            succeeded, moved = counts["succeeded"], now
        why = (
            f"none in the last {STALL_S:.0f} s"
            if now - moved > STALL_S
            else f"the limit of {limit:.0f} s"
            if now - started > limit
            else ""
        )
        if succeeded < total and why:
            cut = f"{succeeded:,} of {total:,} succeeded after {now - started:.0f} s ({why})"
            state = await queues(stack)
    rate = succeeded / (time.perf_counter() - started)
    receipts = await stack.receipts(full=True)
    at = receipts.pop("at").values() or [began]
    return Drained(rate, min(at) - began, max(at) - min(at), receipts, cut, state)


# --- 2. latency with a key behind retries ---------------------------------------------------


@dataclass
class Load:
    paced: engine.Paced
    others: list[float] = field(default_factory=list)  # the other keys' latencies, s
    missing: int = 0  # the other keys' events that never arrived
    stuck_sent: int = 0
    receipts: dict[str, Any] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)


async def send_paced(url: str, plan: list[tuple[str, str]], per_second: float) -> engine.Paced:
    """Open loop: POST each (uuid, body) of ``plan`` at ``per_second``, whatever the answers.

    Except within a key: an event is posted once its key's previous one was answered
    202. The relay orders a key's events as it received them; two of a key in flight
    at once (an overloaded gateway answering later than the next send) have no order
    to check.
    """
    out = engine.Paced()
    previous: dict[str, asyncio.Task[None]] = {}  # object key: its last POST

    async def queued(*_: object) -> None:
        out.queued += 1

    async def post(key: str, body: str, after: asyncio.Task[None] | None) -> None:
        if after is not None:
            await asyncio.shield(after)
        out.sent[key] = time.time()
        began = time.perf_counter()
        async with session.post(url, data=body, headers=engine.JSON) as resp:
            await resp.read()
            assert resp.status == 202, f"ingest: {resp.status}"
        out.answers.append(time.perf_counter() - began)

    trace = aiohttp.TraceConfig()
    trace.on_connection_queued_start.append(queued)
    connector = aiohttp.TCPConnector(limit=900)  # the gateway refuses over 1,000
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        tasks = []
        start = time.perf_counter()
        for i, (key, body) in enumerate(plan):
            delay = start + i / per_second - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            out.lag = max(out.lag, -delay)
            data = json.loads(body)
            obj = f"{data['objectType']}/{data['objectId']}"
            task = asyncio.create_task(post(key, body, previous.get(obj)))
            previous[obj] = task
            tasks.append(task)
        await asyncio.gather(*tasks)
        out.rate = len(plan) / (time.perf_counter() - start)
    return out


async def latency(stack: Stack, keys: int, rate: int, seconds: int, analyze: bool) -> Load:
    """``rate`` events/s for ``seconds``: one a second for STUCK, the rest over ``keys - 1``.

    ``analyze``: ANALYZE deliveries every 2 s meanwhile (as an eager autovacuum would).
    """
    await stack.gateway()
    url = await stack.setup("object")
    await stack.worker()
    warm = await send_paced(url, [event("warm-up", 0)], 1)
    await engine.latencies(stack, warm.sent, wait=60)  # the worker is up
    plan: list[tuple[str, str]] = []
    stuck: set[str] = set()
    seqs = [0] * (keys - 1)
    for i in range(rate * seconds):
        if i % rate == rate // 2:
            uid, body = event(STUCK, len(stuck))
            stuck.add(uid)
        else:
            k = (i - len(stuck)) % (keys - 1)
            uid, body = event(f"k{k}", seqs[k])
            seqs[k] += 1
        plan.append((uid, body))

    async def analyzer() -> None:
        while True:
            await asyncio.sleep(2)
            await engine.sql(stack.dsn, "ANALYZE deliveries")

    task = asyncio.create_task(analyzer()) if analyze else None
    try:
        paced = await send_paced(url, plan, rate)
        others = {uid: at for uid, at in paced.sent.items() if uid not in stuck}
        got = await engine.latencies(stack, others)
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def recovered() -> bool:  # the stuck key's first event, after its failures
        return bool((await stack.receipts())["fail_key_acked"] or stack.fail_key == "-")

    with contextlib.suppress(RuntimeError):  # reported as delivered "0 of N"
        await engine.until(recovered, 15, "Bill/stuck's first event")
    receipts = await stack.receipts()
    return Load(paced, got, len(others) - len(got), len(stuck), receipts, await stack.statuses())


# --- the run ---------------------------------------------------------------------------------


def header() -> str:
    """engine.machine(), the commit marked -dirty when relay/, workers/ or migrations/ differ."""
    rev, rest = engine.machine().split(", ", 1)
    paths = ["relay", "workers", "migrations"]
    diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=HERE).returncode
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "--", *paths],
        capture_output=True,
        text=True,
        cwd=HERE.parent,
    ).stdout.strip()
    return f"{rev}{'-dirty' if diff or untracked else ''}, {rest}"


async def run(quick: bool, analyze: bool, logdir: Path) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []  # figure, value, target

    def row(figure: str, value: str, target: str) -> None:
        rows.append((figure, value, target))
        print(f"  {figure:<46} {value:>20}   {target}", flush=True)

    def log_errors(stack: Stack) -> None:
        if stack.errors:
            print(f"  ! {len(stack.errors)} error lines in the relay's output ({stack.log.name}):")
            for line in stack.errors[:8]:
                print(f"    {line[:200]}")
            row(f"   relay error lines ({stack.log.stem})", f"{len(stack.errors)}", "expected 0")

    (autovacuum,) = await engine.sql(engine.ADMIN_DSN, "SHOW autovacuum")
    row(
        "Postgres autovacuum",
        autovacuum[0],
        "ANALYZE by this benchmark (--analyze)" if analyze else "no ANALYZE by this benchmark",
    )
    keys, per_key = 1_000, (4 if quick else 20)
    rate, seconds = 200, (4 if quick else 20)
    total = keys * per_key

    drained: dict[str, Drained] = {}
    for ordering in ("none", "object"):
        note, calm = quiet()
        if not calm:
            print(f"  warning: machine not quiet ({note})")
        async with Stack(f"throughput-{ordering}", logdir) as stack:
            drained[ordering] = d = await throughput(stack, ordering, keys, per_key, analyze)
        log_errors(stack)
        spread = f"first after {d.first:.1f} s, receipts spread over {d.spread:.1f} s"
        row(
            f"1. throughput, ordering {ordering!r}",
            f"{d.rate:,.0f} dlv/s" + (", cut" if d.cut else ""),
            f"{total:,} deliveries, {keys:,} keys; {spread}; {note}",
        )
        if d.cut:
            row("   cut short", d.cut, "expected: all succeed")
            print(f"  ! then: {d.state}")
    ratio = drained["object"].rate / drained["none"].rate
    cut = ", cut" if drained["object"].cut or drained["none"].cut else ""
    row("   ordered / unordered", f"{ratio:.2f}{cut}", "target >= 0.8")
    for ordering, label, target in (
        ("object", "ordered", "must be 0"),
        ("none", "unordered, for reference", "nothing promised (a key's events lie far apart)"),
    ):
        got = drained[ordering].receipts
        row(
            f"   out of order / early arrivals, {label}",
            f"{got['out_of_order']} / {got['early']}",
            f"{target}; {got['count']:,} arrivals, {got['duplicates']} repeated",
        )
        if ordering == "object" and (got["out_of_order"] or got["early"]):
            print("  ! ordering violated; first cases:")
            for text in got["examples"]:
                print(f"    {text}")

    print(f"  (scenario 2: RELAY_RETRY_SCHEDULE={RETRY_SCHEDULE!r} in both runs)")
    loads: dict[str, Load] = {}
    for name, fail_key in (("baseline", "-"), ("stuck", f"Bill/{STUCK}")):
        note, calm = quiet()
        if not calm:
            print(f"  warning: machine not quiet ({note})")
        async with Stack(f"latency-{name}", logdir, fail_key=fail_key) as stack:
            loads[name] = load = await latency(stack, keys, rate, seconds, analyze)
        log_errors(stack)
        ms = [v * 1000 for v in load.others]
        lost = f"; {load.missing} never arrived" if load.missing else ""
        what = "Bill/stuck fails 3 attempts" if name == "stuck" else "nothing fails"
        client = (
            f"answered {load.paced.rate:,.0f}/s, worst send lag {load.paced.lag * 1000:,.0f} ms"
        )
        row(
            f"2. latency, {name}, p50/p99",
            f"{engine.pct(ms, 50):,.1f}/{engine.pct(ms, 99):,.1f} ms",
            f"{what}; {len(ms):,} events of {keys - 1} keys; {client}{lost}; {note}",
        )
    p99 = {name: engine.pct(load.others, 99) for name, load in loads.items()}
    change = p99["stuck"] / p99["baseline"] - 1
    row("   p99 change with the failing key", f"{change:+.1%}", "target <= +10 %")
    got = loads["stuck"].receipts
    row(
        "   early / out-of-order arrivals, failing run",
        f"{got['early']} / {got['out_of_order']}",
        "must be 0",
    )
    if got["early"] or got["out_of_order"]:
        print("  ! ordering violated; first cases:")
        for text in got["examples"]:
            print(f"    {text}")
    stuck = loads["stuck"]
    row(
        "   Bill/stuck events delivered by the end",
        f"{got['fail_key_acked']} of {stuck.stuck_sent}",
        f"{got['failed']} answered 500; deliveries by status {stuck.statuses}",
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 5x smaller, labelled quick")
    parser.add_argument("--results", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="ANALYZE deliveries after scenario 1's ingest and every 2 s of scenario 2",
    )
    args = parser.parse_args()
    for signum in (signal.SIGINT, signal.SIGTERM):  # clean up (finally) on either
        signal.signal(signum, signal.default_int_handler)
    title = header() + (" (quick)" if args.quick else "") + (" (--analyze)" if args.analyze else "")
    print(f"Relay ordered delivery: {title}")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ordering-") as logdir:
            rows = asyncio.run(run(args.quick, args.analyze, Path(logdir)))
    except KeyboardInterrupt:
        sys.exit("interrupted: every process stopped, databases dropped")
    finally:
        for proc in engine.PROCS:
            engine.stop(proc, grace=0)
    table = ["| figure | value | target |", "| --- | --: | --- |"]
    table += [f"| {figure.strip()} | {value} | {target} |" for figure, value, target in rows]
    print("\n" + "\n".join(table))
    if args.results:
        append_results(HERE / "RESULTS.md", title, table)


def append_results(results: Path, title: str, table: list[str]) -> None:
    """Append a section with ``table``; the file's heading first when it has none."""
    heading = "# bench/ordering.py results"
    existing = results.read_text().splitlines() if results.exists() else []
    lines = [] if heading in existing else ["\n" + heading]
    lines += [f"\n## bench/ordering.py, {title}\n", *table]
    with results.open("a") as out:
        out.write("\n".join(lines) + "\n")
    print(f"appended to {results}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["receiver"]:
        receiver(int(sys.argv[2]), sys.argv[3])
    else:
        main()
