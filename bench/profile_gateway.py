"""Where the gateway's time goes under durable_ratio.py's ingest load, by py-spy.

    python bench/profile_gateway.py [--seconds 8] [--top 40] [--out DIR]

Starts `relay serve --processes 1` on a fresh database (a token source, 2 matching
targets, no worker: durable_ratio.py's ingest stack), drives it with wrk -t1 -c64 of
single events, and records the serving process with py-spy meanwhile (every thread,
idle ones left out). Prints the rate, then the functions with the largest share of
the samples, inclusive (the function or what it called) and self, and writes the
collapsed stacks and a speedscope file under --out. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

PG = "postgresql://root@127.0.0.1:5432"
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
counter = 0
request = function()
  counter = counter + 1
  local b = string.format('{"uuid":"%d-%d","date":"2026-11-28T12:00:00Z","objectType":"Bill",'
    .. '"action":"paid","objectId":4711,"tenantId":42}', math.random(1,1e9), counter)
  return wrk.format(nil, nil, nil, b)
end
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, limit: float = 30) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"profile: nothing listens on {port}")


def _call(base: str, path: str, token: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request) as answer:
        result: dict[str, object] = json.load(answer)
        return result


def _cpu_seconds(root: int) -> float:
    """User and system CPU seconds of ``root`` and its descendants alive now, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, spent = {}, {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.split("/")[2])
        parent[pid] = int(fields[1])
        spent[pid] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for pid, used in spent.items():
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parent:
            ancestor = parent[ancestor]
        if ancestor == root:
            total += used
    return total


def _commits(database: str) -> int:
    """Transactions committed in ``database`` so far (the statistics lag by up to 0.5 s)."""
    time.sleep(0.6)
    out = subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-U",
            "root",
            "-d",
            database,
            "-Atc",
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip())


def _shares(collapsed: str, top: int) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")") for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    print(f"{total} samples")
    print("inclusive:")
    for frame, count in inclusive.most_common(top):
        print(f"  {100 * count / total:5.1f} %  {frame}")
    print("self:")
    for frame, count in own.most_common(top):
        print(f"  {100 * count / total:5.1f} %  {frame}")


def _spy(pid: int, seconds: int, collapsed: str) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` and its children for ``seconds`` into ``collapsed``."""
    command = "py-spy record --subprocesses -r 250 -f raw".split()
    return subprocess.Popen(
        [*command, "-p", str(pid), "-d", str(seconds), "-o", collapsed],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def ingest_backlog(url: str, events: int) -> None:
    """POST ``events`` events to the source at ``url``, in batches of 100 (durable_ratio's)."""
    for i in range(events // 100):
        batch = [
            {
                "uuid": f"w{i}-{j}",
                "date": "2026-11-28T12:00:00Z",
                "objectType": "Bill",
                "action": "paid",
                "objectId": 4711,
                "tenantId": 42,
            }
            for j in range(100)
        ]
        request = urllib.request.Request(
            url, data=json.dumps(batch).encode(), headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request) as answer:
            assert answer.status == 202, answer.status


def _drain(
    args: argparse.Namespace, env: dict[str, str], ingest: str, database: str
) -> subprocess.Popen[bytes]:
    """Ingest 10,000 events (a delivery per target each), start the worker, profile it."""
    events = 10_000
    ingest_backlog(ingest, events)
    time.sleep(1)
    worker = subprocess.Popen(
        ["relay", "worker", "--processes", "2"],
        env={**env, "RELAY_WORKER_METRICS_PORT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(args.out, "worker.log"), "wb"),
        start_new_session=True,
    )
    started = time.monotonic()
    collapsed = os.path.join(args.out, "worker.collapsed")
    spy = None
    if not args.no_spy:
        spy = _spy(worker.pid, args.seconds, collapsed)
    done = 0
    while time.monotonic() - started < 180:
        done = int(_psql(database, "SELECT count(*) FROM deliveries WHERE status = 'succeeded'"))
        if done >= args.targets * events:
            break
        time.sleep(0.25)
    took = time.monotonic() - started
    cpu = _cpu_seconds(worker.pid)
    print(
        f"{done:,} deliveries succeeded in {took:.1f} s from the worker's start: "
        f"{done / took:,.0f}/s (the start included)"
    )
    print(f"worker CPU: {cpu:.2f} s, {1e6 * cpu / max(done, 1):.0f} us a delivery")
    if spy is not None:
        spy.wait(60)
        with open(collapsed) as f:
            _shares(f.read(), args.top)
        print(f"collapsed stacks: {collapsed}")
    return worker


def _psql(database: str, sql: str) -> str:
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "root", "-d", database, "-Atc", sql],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--no-spy", action="store_true", help="no profile: rate and CPU only")
    parser.add_argument(
        "--delivery",
        action="store_true",
        help="profile `relay worker --processes 2` draining 10,000 events x 2 targets instead",
    )
    parser.add_argument("--targets", type=int, default=2, help="matching targets (default 2)")
    parser.add_argument("--max-in-flight", type=int, default=32, help="each target's (32)")
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="relay-profile-"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    database = f"bench_profile_{os.getpid()}"
    subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "root", database], check=True)
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
    env = {
        **{k: v for k, v in os.environ.items() if k != "BROKER_URL"},
        "DATABASE_URL": f"{PG}/{database}",
        "REDIS_URL": redis_url,
        "RELAY_ADMIN_TOKEN": "profile-admin-token-0123456789abcd",
        "RELAY_ALLOW_PRIVATE_TARGETS": "1",
        "RELAY_SECRET_KEY": base64.b64encode(os.urandom(32)).decode(),
        "RELAY_LOG_LEVEL": "WARNING",
    }
    gateway = None
    others: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(["relay", "migrate"], env=env, check=True, capture_output=True)
        port = _free_port()
        gateway = subprocess.Popen(
            ["relay", "serve", "--processes", "1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_port(port)
        base = f"http://127.0.0.1:{port}"
        key = str(_call(base, "/v1/tenants", env["RELAY_ADMIN_TOKEN"], {"name": "p"})["api_key"])
        source = _call(base, "/v1/sources", key, {"name": "s", "auth": {"type": "token"}})
        sink = 0
        if args.delivery:
            sink = _free_port()
            receiver = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine.py")
            others.append(
                subprocess.Popen(
                    [sys.executable, receiver, "receiver", str(sink), str(_free_port())],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            _wait_port(sink)
        for name in "abcdefghijklmnopqrstuvwxyz"[: args.targets]:
            url = f"http://127.0.0.1:{sink or 9}/{name}"
            target = {"url": url, "max_in_flight": args.max_in_flight}
            _call(base, "/v1/targets", key, target)
        time.sleep(1.5)
        if args.delivery:
            ingest = f"{base}/in/{source['id']}?token={source['secret']}"
            others.append(_drain(args, env, ingest, database))
            return
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(LUA)
        url = f"{base}/in/{source['id']}?token={source['secret']}"
        subprocess.run(["wrk", "-t1", "-c64", "-d2s", "-s", script.name, url], capture_output=True)
        commits_before = _commits(database)
        collapsed = os.path.join(args.out, "gateway.collapsed")
        cpu_before = _cpu_seconds(gateway.pid)
        spy = None if args.no_spy else _spy(gateway.pid, args.seconds, collapsed)
        out = subprocess.run(
            ["wrk", "-t1", "-c64", f"-d{args.seconds}s", "-s", script.name, url],
            capture_output=True,
            text=True,
        ).stdout
        cpu = _cpu_seconds(gateway.pid) - cpu_before
        if spy is not None:
            spy.wait(30)
        os.unlink(script.name)
        commits = _commits(database) - commits_before
        rate = [line for line in out.splitlines() if "Requests/sec" in line or "Non-2xx" in line]
        print("\n".join(line.strip() for line in rate))
        requests = [line for line in out.splitlines() if "requests in" in line]
        if requests:
            served = int(requests[0].split()[0])
            per = served / max(commits, 1)
            print(f"{commits:,} transactions for {served:,} requests: {per:.1f} a commit")
            print(f"gateway CPU: {cpu:.2f} s, {1e6 * cpu / max(served, 1):.0f} us a request")
        if spy is not None:
            with open(collapsed) as f:
                _shares(f.read(), args.top)
            print(f"collapsed stacks: {collapsed}")
    finally:
        for process in [*others, *([gateway] if gateway else [])]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in [*others, *([gateway] if gateway else [])]:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:  # a worker may wait for its attempts
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "root", "--force", database])


if __name__ == "__main__":
    main()
