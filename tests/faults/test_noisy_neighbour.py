"""A noisy tenant does not starve a quiet one (issue 21's scenario), on the real stack.

A gateway (`relay serve`) and a worker (`relay worker`) run as processes. The
operator has given the noisy tenant a budget (PATCH /v1/tenants/{id} limits:
500,000 ingest bytes, 1,000 deliveries created and 20 API requests per second,
as bench/noisy_neighbour.py does). Its process (tests/faults/noise.py) sends, for
20 s on many connections: gzip bombs to an unauthenticated route, ~900 KB events to
ten ordered targets, batches of 1,000 events with distinct ordering keys, and
lists of those 1 MB events at limit=500. Meanwhile a quiet tenant posts one small event every
100 ms to its one target. None of the quiet tenant's requests is refused (its
light requests commit in their own lane, never behind the noisy tenant's key
locks: before, the quiet tenant got 503 after the 5 s statement timeout), every
one of its events arrives within seconds, nothing is a 500, and the gateway's
memory stays bounded (RSS under 300 MiB). The quiet tenant's ingest and
delivery latencies are printed, not asserted: speed is measured by
bench/noisy_neighbour.py (the same scenario, each tenant's targets on a receiver
process of its own, beside a no-noise baseline); on a 2-core machine that also
runs Postgres, the worker and the noise they are above the 100 ms p99 the
issue asks for without a budget (262.7 ms ingest p99, 429.3 ms delivery), and
under it with one (46.2 ms, 65.3 ms; with slow DNS 61.4 ms, 77.6 ms).

Slow DNS too, where the test runs as root (CI does): the worker runs in a mount
namespace whose resolv.conf names a name server on 127.0.0.53
(tests/faults/slow_dns.py); three more of the noisy tenant's targets are names in a
zone it answers after 6 s, the quiet tenant's target a name in a zone it answers
at once. Elsewhere the scenario runs without it and says so; the worker's bounded
lookups are also tested with a stubbed resolver in tests/integration/test_delivery_dns.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ADMIN_TOKEN, stack_env
from tests.faults.slow_dns import FAST_ZONE, SLOW_ZONE, SlowDns, slow_dns
from tests.services import GatewayProcess
from tests.stack import Receiver, WorkerProcess, eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
NOISE_S = 20
QUIET_EVENTS = 120
QUIET_EVERY_S = 0.1


def group_rss_mib(leader: int) -> float:
    """The largest resident set of a process in ``leader``'s process group, in MiB."""
    largest = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != leader:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                largest = max(largest, int(line.split()[1]) / 1024)
    return largest


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def test_a_noisy_tenant_does_not_starve_a_quiet_one(
    database_url: str, clean_redis: str, tmp_path: Path
) -> None:
    with slow_dns(tmp_path) as dns:
        await _scenario(database_url, clean_redis, tmp_path, dns)


async def _scenario(
    database_url: str, clean_redis: str, tmp_path: Path, dns: SlowDns | None
) -> None:
    receiver = await Receiver().start()
    assert receiver.server is not None
    port = receiver.server.port
    env = stack_env(
        database_url,
        clean_redis,
        RELAY_ALLOW_PRIVATE_TARGETS="1",
        RELAY_LOG_LEVEL="WARNING",
        # (a batch of 1,000 keys to the 13 targets the noisy tenant has with slow DNS
        # stays within the quota, and meets its budget instead)
        RELAY_MAX_DELIVERIES_PER_REQUEST="13000",
    )
    gateway = GatewayProcess(env, tmp_path / "gateway.log", processes=1).start()
    # the worker resolves names through the slow name server where there is one
    worker = WorkerProcess(env, tmp_path / "worker.log", prefix=dns.prefix if dns else []).start()
    base = gateway.url
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    noise: subprocess.Popen[bytes] | None = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

            async def call(method: str, path: str, key: str | None, body: Any = None) -> Any:
                headers = admin if key is None else {"Authorization": f"Bearer {key}"}
                async with http.request(method, base + path, json=body, headers=headers) as r:
                    assert r.status in (200, 201), (path, r.status, await r.text())
                    return await r.json()

            # Given a quiet tenant with one target, and a noisy one with ten ordered targets
            quiet = (await call("POST", "/v1/tenants", None, {"name": "Quiet"}))["api_key"]
            noisy_tenant = await call("POST", "/v1/tenants", None, {"name": "Noisy"})
            noisy = noisy_tenant["api_key"]
            # and the operator holds the noisy one to a budget
            limits = {
                "ingest_bytes_per_s": 500_000,
                "deliveries_per_s": 1000,
                "api_requests_per_s": 20,
            }
            await call("PATCH", f"/v1/tenants/{noisy_tenant['id']}", None, {"limits": limits})
            quiet_source = await call(
                "POST", "/v1/sources", quiet, {"name": "q", "auth": {"type": "token"}}
            )
            quiet_url = f"http://quiet.{FAST_ZONE}:{port}/quiet" if dns else receiver.url("/quiet")
            await call("POST", "/v1/targets", quiet, {"url": quiet_url})
            noisy_source = await call(
                "POST", "/v1/sources", noisy, {"name": "n", "auth": {"type": "token"}}
            )
            for i in range(10):
                await call(
                    "POST",
                    "/v1/targets",
                    noisy,
                    {
                        "url": receiver.url(f"/noisy/{i}"),
                        "ordering": "object",
                        "ordering_key": "/data/invoice/id",
                        "max_in_flight": 50,
                    },
                )
            if dns is not None:  # and three more in a zone whose server is slow
                for i in range(3):
                    url = f"http://n{i}.{SLOW_ZONE}:{port}/slow/{i}"
                    await call("POST", "/v1/targets", noisy, {"url": url})
            # and one event of the noisy tenant's, within its budget: its targets (the
            # slow zone's among them) have deliveries whatever the budget lets in of the
            # noise's own 900 KB events (one, or none when another noise's bytes came first)
            first = {"uuid": "noisy-first", "objectType": "Bill", "action": "paid"}
            first["data"] = {"invoice": {"id": 1}}
            noisy_url = f"{base}/in/{noisy_source['id']}?token={noisy_source['secret']}"
            async with http.post(noisy_url, json=first) as r:
                assert r.status == 202, await r.text()
            # When the noisy tenant's process makes all its noise for NOISE_S seconds
            config = {
                "base": base,
                "host": "127.0.0.1",
                "port": gateway.port,
                "source": noisy_source["id"],
                "token": noisy_source["secret"],
                "key": noisy,
                "seconds": NOISE_S,
            }
            noise = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.noise", json.dumps(config)],
                cwd=ROOT,
                env={**os.environ},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            await asyncio.sleep(3)  # the noise is up to speed

            # and the quiet tenant posts one event every 100 ms, watching its memory too
            ingest_ms: list[float] = []
            posted: dict[str, float] = {}
            rss: list[float] = []
            url = f"{base}/in/{quiet_source['id']}?token={quiet_source['secret']}"
            for n in range(QUIET_EVENTS):
                started = time.monotonic()
                async with http.post(
                    url, json={"uuid": f"quiet-{n}", "objectType": "Bill", "action": "paid"}
                ) as r:
                    answer = await r.json()
                    assert r.status == 202, answer
                ingest_ms.append((time.monotonic() - started) * 1000)
                posted[answer["event_ids"][0]] = started
                if n % 5 == 0:
                    assert gateway.proc is not None
                    rss.append(await asyncio.to_thread(group_rss_mib, gateway.proc.pid))
                await asyncio.sleep(max(0.0, QUIET_EVERY_S - (time.monotonic() - started)))

            # Then every quiet event arrives, and fast
            # (at least once: an attempt whose record waited past its lease is made
            # again, so an event may arrive twice; its latency is its first arrival's)
            def first_arrivals() -> dict[str, float]:
                first: dict[str, float] = {}
                for r in receiver.at("/quiet"):
                    event_id = r.headers["webhook-id"]
                    if event_id in posted and event_id not in first:
                        first[event_id] = (r.at - posted[event_id]) * 1000
                return first

            async def arrived() -> bool:
                return len(first_arrivals()) >= QUIET_EVENTS

            await eventually(arrived, timeout=60)
            delivery_ms = list(first_arrivals().values())
        out, _ = await asyncio.to_thread(noise.communicate, timeout=NOISE_S + 60)
        noise_counts = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        if noise is not None and noise.poll() is None:
            noise.kill()
        # stopped off the loop, so the receiver answers what the worker still sends
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(gateway.stop)
        await receiver.close()
    figures = {
        "quiet ingest p50/p99 ms": (sorted(ingest_ms)[len(ingest_ms) // 2], p99(ingest_ms)),
        "quiet delivery p50/p99 ms": (
            sorted(delivery_ms)[len(delivery_ms) // 2],
            p99(delivery_ms),
        ),
        "gateway max RSS MiB": max(rss),
        "noise": noise_counts,
        "noisy deliveries received": sum(len(receiver.at(f"/noisy/{i}")) for i in range(10)),
        "slow DNS": (
            {"slow zone queries": dns.zones.slow_queries, "fast": dns.zones.fast_queries}
            if dns
            else "not made: needs root for a mount namespace and port 53"
        ),
    }
    print(json.dumps(figures, indent=1))
    # the noise really was made (the stack was loaded), and nothing of it was a 500;
    # its ingest was let in as far as its budget goes, and refused beyond (batches of
    # 10,000 deliveries never fit 1,000 per second)
    assert noise_counts.get("bomb", 0) > 0 and noise_counts.get("list-200", 0) > 0
    assert noise_counts.get("big-429", 0) > 0 and noise_counts.get("keys-429", 0) > 0
    assert noise_counts.get("list-429", 0) > 0
    if dns is not None:  # the slow zone was asked, and the quiet target's name resolved
        assert dns.zones.slow_queries > 0 and dns.zones.fast_queries > 0, figures
    # (unbounded, 24-28 of its 900 KB events went in: 22-25 MB in 20 s)
    let_in = noise_counts.get("big-202", 0) * 900_000
    assert let_in <= limits["ingest_bytes_per_s"] * (NOISE_S + 3) + 1_048_576, noise_counts
    assert not any(k.endswith("-500") for k in noise_counts), noise_counts
    assert len(delivery_ms) == QUIET_EVENTS
    assert max(delivery_ms) < 10_000, figures
    assert max(rss) < 300, figures
