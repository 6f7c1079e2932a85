"""A quiet tenant beside a noisy one (issue 21): its latencies with and without the noise.

    python bench/noisy_neighbour.py [--events 120] [--seconds 20] [--kinds bomb,big,keys,list]
                                    [--budget 500000,1000,20 | --budget none] [--patient]
                                    [--dns] [--results]

Prints figures; asserts nothing. Needs Postgres (DATABASE_URL, default
postgresql://root@127.0.0.1:5432/test: a database of its own, dropped at the end)
and Redis db 11 (BENCH_REDIS_URL to change it; flushed at the start). Every process
it starts has its own session and is killed at the end, error or not. A run takes
about a minute.

The stack is tests/faults/test_noisy_neighbour.py's: `relay serve --processes 1`,
`relay worker --processes 1 --threads 8`; a quiet tenant with one target, a noisy
tenant with ten ordered targets (`/data/invoice/id`, 50 in flight). Each tenant's
targets are on a receiver process of their own (bench/engine.py's, which notes
time.time() at each first receipt), as two tenants' endpoints are two machines.

1. Baseline: the quiet tenant alone POSTs one ~200-byte event every 100 ms
   (--events of them, the next when the last was answered, as the test does).
2. Noise: tests/faults/noise.py runs as a process for --seconds (gzip bombs on
   an unauthenticated route, ~900 KB events to the ordered targets, batches of
   1,000 events with distinct keys, lists of those events at limit=500; --kinds
   picks some); 3 s after it started, the quiet tenant does the same as in 1.

The noisy tenant has the budget an operator gives a tenant that hogs the relay
(``PATCH /v1/tenants/{id}`` ``limits``): by default 500,000 ingest bytes, 1,000
deliveries created and 20 API requests per second; ``--budget none`` leaves it unbounded, as every
tenant was before budgets. The noise sends again at once after a 429, as an
abusive client would; with ``--patient`` it waits the Retry-After, as a
well-behaved one does, and so uses its whole budget. With ``--dns`` (root only),
slow DNS too: tests/faults/slow_dns.py's name server, the worker in a mount
namespace resolving through it, three more noisy targets in its slow zone, and
the quiet target a name in its fast one.

Figures, for both phases: the quiet tenant's ingest latency (POST to 202, in
this process) and delivery latency (just before the POST to the receiver's
receipt) p50/p99/max, and the gateway's largest VmRSS (sampled every 0.5 s).
Targets (issue 21): p99 < 100 ms for both, RSS < 300 MiB. Also printed: the
machine's load average and CPU busy before the run, the noise's counts, and for
each phase where the CPU went: per group of processes (the gateway, the worker,
this database's Postgres backends, and the load: noise, receivers and this
process), the CPU seconds its threads ran and the seconds they were runnable
but waited for a CPU (/proc/<pid>/task/*/schedstat), per second of the phase.
A group that waits about as long as it runs is short of CPU, not of anything
the relay holds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import engine
from engine import JSON, PROCS, Stack, cpu_busy, event, free_port, pct, stop, wait_port

from tests.faults.slow_dns import FAST_ZONE, SLOW_ZONE, SlowDns, slow_dns

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
engine.REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
KINDS = ("bomb", "big", "keys", "list")
EVERY_S = 0.1
NOISE_WARMUP_S = 3


@dataclass
class Quiet:
    """What the quiet tenant saw in one phase."""

    ingest_ms: list[float] = field(default_factory=list)
    delivery_ms: list[float] = field(default_factory=list)
    missing: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    reasons: set[str] = field(default_factory=set)
    rss_mib: float = 0.0
    #: group -> (CPU seconds run, seconds runnable but waiting), per second of the phase
    cpu: dict[str, tuple[float, float]] = field(default_factory=dict)


async def sample_rss(pid: int, into: Quiet) -> None:
    while True:  # /proc is read in a thread: it takes this process ~30 ms
        for mib in (await asyncio.to_thread(engine.group_rss, pid)).values():
            into.rss_mib = max(into.rss_mib, mib)
        await asyncio.sleep(0.5)


async def receipts(port: int) -> dict[str, float]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/receipts?full=1") as resp,
    ):
        answer: dict[str, float] = (await resp.json())["at"]
        return answer


#: Which group a process belongs to: (name, test on its process group id and command line).
Groups = list[tuple[str, Callable[[int, str], bool]]]


def schedstat(groups: Groups) -> dict[str, tuple[int, int]]:
    """Per group: nanoseconds its processes' threads ran, and waited to run, so far."""
    found: dict[str, tuple[int, int]] = {name: (0, 0) for name, _ in groups}
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            pgid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            name = next((n for n, test in groups if test(pgid, cmdline)), None)
            if name is None:
                continue
            ran, waited = found[name]
            for task in (proc / "task").iterdir():
                fields = (task / "schedstat").read_text().split()
                ran, waited = ran + int(fields[0]), waited + int(fields[1])
            found[name] = (ran, waited)
    return found


async def quiet_phase(
    url: str, count: int, receiver_port: int, gateway_pid: int, groups: Groups
) -> Quiet:
    """``count`` single events, one every 100 ms (closed loop), and their arrival."""
    out = Quiet()
    sent: dict[str, float] = {}
    sampler = asyncio.create_task(sample_rss(gateway_pid, out))
    cpu_before, began_at = await asyncio.to_thread(schedstat, groups), time.perf_counter()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            for _ in range(count):
                key, body = event()
                began, started = time.time(), time.perf_counter()
                async with http.post(url, data=body, headers=JSON) as resp:
                    answer = await resp.read()
                    status = resp.status
                if status == 202:
                    out.ingest_ms.append((time.perf_counter() - started) * 1000)
                    sent[key] = began
                else:
                    out.refused[status] = out.refused.get(status, 0) + 1
                    out.reasons.add(answer.decode(errors="replace")[:200])
                await asyncio.sleep(max(0.0, EVERY_S - (time.perf_counter() - started)))
        seconds = time.perf_counter() - began_at
        cpu_after = await asyncio.to_thread(schedstat, groups)
        out.cpu = {
            name: (
                (cpu_after[name][0] - cpu_before[name][0]) / 1e9 / seconds,
                (cpu_after[name][1] - cpu_before[name][1]) / 1e9 / seconds,
            )
            for name in cpu_after
        }
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            at = await receipts(receiver_port)
            if sent.keys() <= at.keys():
                break
            await asyncio.sleep(0.25)
    finally:
        sampler.cancel()
    out.delivery_ms = [(at[k] - began) * 1000 for k, began in sent.items() if k in at]
    out.missing = len(sent) - len(out.delivery_ms)
    return out


async def run(
    args: argparse.Namespace, logdir: Path, dns: SlowDns | None
) -> tuple[Quiet, Quiet, dict[str, int]]:
    async with Stack("noisy", logdir) as stack:
        if dns is not None:  # 1,000 keys to 13 targets stay within the quota
            stack.env["RELAY_MAX_DELIVERIES_PER_REQUEST"] = "13000"
        quiet_port = free_port()
        await stack.start(
            [sys.executable, str(HERE / "engine.py"), "receiver", str(quiet_port), str(free_port())]
        )
        await wait_port(quiet_port)
        gateway = await stack.start(
            engine.relay("serve", "--port", str(stack.gw_port), "--processes", "1")
        )
        await wait_port(stack.gw_port)
        worker = await stack.start(
            [
                *(dns.prefix if dns else []),
                *engine.relay("worker", "--processes", "1", "--threads", "8"),
            ]
        )
        load_groups = {os.getpgrp(), *(p.pid for p in stack.procs if p not in (gateway, worker))}
        groups: Groups = [
            ("gateway", lambda pgid, _: pgid == gateway.pid),
            ("worker", lambda pgid, _: pgid == worker.pid),
            ("postgres", lambda _, cmd: cmd.startswith("postgres: ") and f" {stack.db} " in cmd),
            # (the noise's process joins its group when it starts: see below)
            ("load", lambda pgid, cmd: pgid in load_groups and "py-spy" not in cmd),
        ]

        quiet_host = f"quiet.{FAST_ZONE}" if dns else "127.0.0.1"
        quiet_url = await stack.tenant("Quiet", [(f"http://{quiet_host}:{quiet_port}/quiet", [])])
        noisy_tenant = await stack.api("/v1/tenants", engine.TOKEN, {"name": "Noisy"})
        noisy_key = noisy_tenant["api_key"]
        if args.budget is not None:
            names = ("ingest_bytes_per_s", "deliveries_per_s", "api_requests_per_s")
            limits = dict(zip(names, args.budget, strict=True))
            path = f"/v1/tenants/{noisy_tenant['id']}"
            await stack.api(path, engine.TOKEN, {"limits": limits}, method="PATCH")
        source = await stack.api("/v1/sources", noisy_key, {"name": "n", "auth": {"type": "token"}})
        for i in range(10):
            target = {
                "url": f"http://127.0.0.1:{stack.port}/noisy/{i}",
                "ordering": "object",
                "ordering_key": "/data/invoice/id",
                "max_in_flight": 50,
            }
            await stack.api("/v1/targets", noisy_key, target)
        for i in range(3 if dns else 0):  # names in the zone whose server is slow
            slow = {"url": f"http://n{i}.{SLOW_ZONE}:{stack.port}/slow/{i}"}
            await stack.api("/v1/targets", noisy_key, slow)
        await quiet_phase(quiet_url, 10, quiet_port, gateway.pid, groups)  # the worker is up, warm
        baseline = await quiet_phase(quiet_url, args.events, quiet_port, gateway.pid, groups)

        config = {
            "base": stack.base,
            "host": "127.0.0.1",
            "port": stack.gw_port,
            "source": source["id"],
            "token": source["secret"],
            "key": noisy_key,
            "seconds": args.seconds,
            "kinds": args.kinds,
            "patient": args.patient,
        }
        noise_out = logdir / "noise.out"
        with noise_out.open("wb") as out:
            noise = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.noise", json.dumps(config)],
                env=stack.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        PROCS.append(noise)
        load_groups.add(noise.pid)
        await asyncio.sleep(NOISE_WARMUP_S)
        noisy = await quiet_phase(quiet_url, args.events, quiet_port, gateway.pid, groups)
        await asyncio.to_thread(noise.wait, args.seconds + 60)
        lines = noise_out.read_text(errors="replace").splitlines()
        counts: dict[str, int] = {}
        with contextlib.suppress(ValueError, IndexError):
            counts = json.loads(lines[-1])
        return baseline, noisy, counts


def figures(name: str, q: Quiet) -> list[tuple[str, str]]:
    def three(values: list[float]) -> str:
        return f"{pct(values, 50):,.1f}/{pct(values, 99):,.1f}/{max(values, default=0):,.1f} ms"

    rows = [
        (f"{name}: quiet ingest p50/p99/max", three(q.ingest_ms)),
        (f"{name}: quiet delivery p50/p99/max", three(q.delivery_ms)),
        (f"{name}: gateway max RSS", f"{q.rss_mib:,.0f} MiB"),
        (
            f"{name}: CPU s/s ran (waited for a CPU)",
            ", ".join(f"{group} {ran:.2f} ({wait:.2f})" for group, (ran, wait) in q.cpu.items()),
        ),
    ]
    if q.missing or q.refused:
        rows.append((f"{name}: quiet events refused / never arrived", f"{q.refused}/{q.missing}"))
        rows += [(f"{name}: refused with", reason) for reason in sorted(q.reasons)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=120, help="quiet events per phase")
    parser.add_argument("--seconds", type=int, default=20, help="how long the noise lasts")
    parser.add_argument("--kinds", default=",".join(KINDS), help="noises to make (comma list)")
    parser.add_argument(
        "--budget",
        default="500000,1000,20",
        help="the noisy tenant's ingest bytes/s,deliveries/s,API requests/s, or none",
    )
    parser.add_argument(
        "--patient", action="store_true", help="the noise waits a 429's Retry-After"
    )
    parser.add_argument(
        "--dns", action="store_true", help="slow DNS too (root: tests/faults/slow_dns.py)"
    )
    parser.add_argument("--results", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this folder")
    args = parser.parse_args()
    args.kinds = [k for k in args.kinds.split(",") if k]
    if args.budget == "none":
        args.budget = None
    else:
        try:
            args.budget = [int(v) for v in args.budget.split(",")]
        except ValueError:
            parser.error("--budget is BYTES_PER_S,DELIVERIES_PER_S,API_REQUESTS_PER_S or none")
        if len(args.budget) != 3 or min(args.budget) < 1:
            parser.error("--budget is BYTES_PER_S,DELIVERIES_PER_S,API_REQUESTS_PER_S or none")
    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    os.chdir(ROOT)  # `python -m tests.faults.noise`
    header = engine.machine()
    load = os.getloadavg()
    before = f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, CPU {cpu_busy():.0%} busy"
    budget = (
        "none"
        if args.budget is None
        else "{:,} bytes/s, {:,} deliveries/s, {:,} API requests/s".format(*args.budget)
    )
    print(f"Relay noisy neighbour: {header}; before: {before}; noisy budget: {budget}", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-noisy-") as scratch:
            logdir = args.logs or Path(scratch)
            logdir.mkdir(parents=True, exist_ok=True)
            with slow_dns(logdir) if args.dns else contextlib.nullcontext() as dns:
                if args.dns and dns is None:
                    sys.exit("--dns needs root (a mount namespace, and port 53 on 127.0.0.53)")
                baseline, noisy, counts = asyncio.run(run(args, logdir, dns))
                if dns is not None:
                    counts["dns-slow-queries"] = dns.zones.slow_queries
                    counts["dns-fast-queries"] = dns.zones.fast_queries
    except KeyboardInterrupt:
        sys.exit("interrupted: every process stopped, the database dropped")
    finally:
        for proc in PROCS:
            stop(proc, grace=0)
    target = {"ingest": "target p99 < 100 ms", "delivery": "target p99 < 100 ms"}
    rows: list[tuple[str, str, str]] = []
    for name, q in (("no noise", baseline), (f"noise ({','.join(args.kinds)})", noisy)):
        for figure, value in figures(name, q):
            kind = next((k for k in target if k in figure), None)
            aim = target[kind] if kind else ("target < 300 MiB" if "RSS" in figure else "")
            rows.append((figure, value, aim))
    rows.append(("noise made (counts by answer)", json.dumps(counts, sort_keys=True), before))
    for figure, value, aim in rows:
        print(f"  {figure:<48} {value:>26}   {aim}")
    if args.results:
        lines = [
            f"\n## bench/noisy_neighbour.py: {header}, noisy budget {budget}\n",
            "| figure | value | target |",
        ]
        lines += ["| --- | --: | --- |", *(f"| {f} | {v} | {a} |" for f, v, a in rows)]
        with (HERE / "RESULTS.md").open("a") as out:
            out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
