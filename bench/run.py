"""Benchmarks: Relay next to the ceilings of DESIGN.md, measured side by side in one run.

Prints figures; asserts nothing. Needs Postgres and Redis (DATABASE_URL and
REDIS_URL, defaulting to this machine's) and `wrk` on the PATH. Each phase is
bounded (a few seconds); the database it makes is dropped at the end.

    python bench/run.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import asyncpg
from yarl import URL

HERE = Path(__file__).resolve().parent
EVENT = (
    '{"date":"2026-11-28T12:00:00Z","objectType":"Bill","action":"paid",'
    '"objectId":4711,"tenantId":42}'
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextmanager
def process(args: list[str], env: dict[str, str], port: int | None = None) -> Iterator[None]:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if port:
            wait_port(port)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def wrk(url: str, body: str, seconds: int, connections: int = 32) -> float:
    """Requests/s that wrk measured, POSTing ``body`` to ``url``."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        body_lua = body.replace("\\", "\\\\").replace('"', '\\"')
        script.write(
            f'wrk.method = "POST"\nwrk.body = "{body_lua}"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "-s", script.name, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script.name)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        raise RuntimeError(f"{non_2xx.group(1)} failed requests against {url}:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


async def commits_per_second(dsn: str, seconds: float, concurrency: int = 32) -> float:
    """Single-row transactions/s through one asyncpg pool."""
    pool = await asyncpg.create_pool(dsn, min_size=10, max_size=20)
    await pool.execute("CREATE TABLE IF NOT EXISTS bench_rows (id text PRIMARY KEY, body bytea)")
    done = 0
    deadline = time.perf_counter() + seconds

    async def run() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO bench_rows VALUES ($1, $2)", uuid.uuid4().hex, b"{}"
                )
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(run() for _ in range(concurrency)))
    rate = done / (time.perf_counter() - started)
    await pool.execute("DROP TABLE bench_rows")
    await pool.close()
    return rate


async def api(
    base: str, method: str, path: str, token: str, body: object = None
) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, base + path, json=body, headers={"Authorization": f"Bearer {token}"}
        ) as resp,
    ):
        assert resp.status < 300, await resp.text()
        result: dict[str, object] = await resp.json()
        return result


async def wait_delivered(dsn: str, total: int, timeout: float) -> float:
    conn = await asyncpg.connect(dsn)
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < timeout:
            n = await conn.fetchval("SELECT count(*) FROM deliveries WHERE status = 'succeeded'")
            if n >= total:
                return total / (time.perf_counter() - started)
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    raise RuntimeError("deliveries did not finish in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--deliveries", type=int, default=5000)
    args = parser.parse_args()
    admin_url = os.environ.get("DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
    db = f"relay_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{db}"'))
    parsed = URL(admin_url)
    dsn = str(parsed.with_path("/" + db).with_query(parsed.query))
    token = "bench-" + secrets.token_hex(16)
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "REDIS_URL": redis_url,
        "RELAY_ADMIN_TOKEN": token,
        "RELAY_SECRET_KEY": base64.b64encode(os.urandom(32)).decode(),
        "RELAY_ALLOW_PRIVATE_TARGETS": "1",
        "RELAY_LOG_LEVEL": "WARNING",
        "RELAY_WORKER_METRICS_PORT": "0",
    }
    relay = [sys.executable, "-m", "relay.cli"]
    results: list[tuple[str, float, str]] = []
    try:
        subprocess.run([*relay, "migrate"], env=env, check=True, capture_output=True)
        subprocess.run(["redis-cli", "-u", redis_url, "flushdb"], check=True, capture_output=True)
        bare_port, relay_port, sink_port = free_port(), free_port(), free_port()
        py = [sys.executable, str(HERE / "bare.py")]
        with process([*py, "serve", str(bare_port)], env, bare_port):
            results.append(
                (
                    "bare aiohttp handler (ceiling)",
                    wrk(f"http://127.0.0.1:{bare_port}/", EVENT, args.seconds),
                    "POST/s",
                )
            )
        results.append(
            (
                "asyncpg single-row commits (ceiling)",
                asyncio.run(commits_per_second(dsn, args.seconds)),
                "tx/s",
            )
        )
        with (
            process([*relay, "serve", "--port", str(relay_port)], env, relay_port),
            process([*py, "serve", str(sink_port)], env, sink_port),
        ):
            base = f"http://127.0.0.1:{relay_port}"
            tenant = asyncio.run(api(base, "POST", "/v1/tenants", token, {"name": "bench"}))
            key = str(tenant["api_key"])
            source = asyncio.run(
                api(base, "POST", "/v1/sources", key, {"name": "s", "auth": {"type": "token"}})
            )
            ingest = f"{base}/in/{source['id']}?token={source['secret']}"
            results.append(
                ("relay ingest, 1 event, no target", wrk(ingest, EVENT, args.seconds), "events/s")
            )
            for path in ("/a", "/b"):
                asyncio.run(
                    api(
                        base,
                        "POST",
                        "/v1/targets",
                        key,
                        {
                            "url": f"http://127.0.0.1:{sink_port}{path}",
                            "filter": {"objectType": ["Bill"]},
                        },
                    )
                )
            results.append(
                ("relay ingest, 1 event, 2 targets", wrk(ingest, EVENT, args.seconds), "events/s")
            )
            batch = "[" + ",".join([EVENT] * 100) + "]"
            rate = wrk(ingest, batch, args.seconds, connections=8) * 100
            results.append(("relay ingest, batches of 100, 2 targets", rate, "events/s"))
            results.append(
                (
                    "bare aiohttp client -> bare receiver (ceiling)",
                    float(
                        subprocess.run(
                            [*py, "client", f"http://127.0.0.1:{sink_port}/", "20000", "64"],
                            capture_output=True,
                            text=True,
                            check=True,
                            env=env,
                        ).stdout
                    ),
                    "POST/s",
                )
            )
        # Delivery: a fresh gateway queues a backlog; once all of it is in Redis
        # (the gateway enqueues after answering), the workers are timed on it.
        asyncio.run(_admin(dsn, "DELETE FROM deliveries", "DELETE FROM events"))
        subprocess.run(["redis-cli", "-u", redis_url, "flushdb"], check=True, capture_output=True)
        events = args.deliveries // 2
        with process([*relay, "serve", "--port", str(relay_port)], env, relay_port):
            started = time.perf_counter()
            for _ in range(events // 100):
                asyncio.run(_post(ingest, batch))
            queued = _wait_queued(redis_url, events * 2)
            enqueue_rate = queued / (time.perf_counter() - started)
        results.append(
            (
                "relay gateway: ingest + enqueue of a backlog (2 targets)",
                enqueue_rate,
                "deliveries queued/s",
            )
        )
        with (
            process([*py, "serve", str(sink_port)], env, sink_port),
            process([*relay, "worker", "--processes", "2", "--threads", "32"], env),
        ):
            rate = asyncio.run(wait_delivered(dsn, events * 2, timeout=600))
        results.append(
            (
                f"relay worker, {events * 2} deliveries (2 processes x 32 threads)",
                rate,
                "deliveries/s",
            )
        )
    finally:
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    print(f"\nRelay benchmarks ({os.cpu_count()} cores, {args.seconds}s per phase, wrk -c32)")
    for name, value, unit in results:
        print(f"  {name:<58} {value:>10,.0f} {unit}")


def _wait_queued(redis_url: str, expected: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["redis-cli", "-u", redis_url, "llen", "dramatiq:deliveries"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if int(out.strip() or 0) >= expected:
            return expected
        time.sleep(0.05)
    raise RuntimeError("the gateway did not enqueue the backlog in time")


async def _admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _post(url: str, body: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp,
    ):
        assert resp.status == 202, await resp.text()


if __name__ == "__main__":
    main()
