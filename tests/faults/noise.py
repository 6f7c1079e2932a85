"""A noisy tenant, run as a process of its own by tests/faults/test_noisy_neighbour.py.

    python -m tests.faults.noise CONFIG_JSON

For ``seconds`` it does, on several connections at once, everything a tenant
(or a stranger) can do to hog a shared relay: gzip bombs on an unauthenticated
route, ~900 KB events to ten ordered targets, batches of 1,000 events with
distinct ordering keys, and lists of 1 MB events at ``limit=500`` (and of one). It prints
one JSON line of counts when done. Every request is bounded in time, and the
whole run stops by itself. ``kinds`` (default all four: bomb, big, keys, list)
picks which noises are made, so a benchmark can tell them apart. With
``patient``, it waits the Retry-After of a 429 before the next request,
as a well-behaved client does (by default it sends again at once).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import zlib
from collections import Counter
from typing import Any

import aiohttp

#: Every noise this process can make.
KINDS = ("bomb", "big", "keys", "list")


def gzip_bomb(inflated_mib: int) -> bytes:
    """A gzip body that inflates to ``inflated_mib`` MiB of "A"."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"A" * (1 << 20)
    parts = [compressor.compress(chunk) for _ in range(inflated_mib)]
    return b"".join(parts) + compressor.flush()


async def bombs(host: str, port: int, body: bytes, until: float, counts: Counter[str]) -> None:
    """A gzip bomb sent as ``GET /healthz``, again and again, over raw sockets."""
    head = (
        f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nContent-Encoding: gzip\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            writer.write(head + body)
            await asyncio.wait_for(writer.drain(), 10)
            await asyncio.wait_for(reader.read(200), 10)
            counts["bomb"] += 1
            writer.close()
        except (OSError, TimeoutError):
            counts["bomb-error"] += 1
            await asyncio.sleep(0.05)


async def _retry_after(answer: aiohttp.ClientResponse, until: float) -> None:
    """Wait as a 429 says, as a well-behaved client does (not past ``until``)."""
    wait = float(answer.headers.get("Retry-After", "1"))
    await asyncio.sleep(min(wait, max(0.0, until - time.monotonic())))


async def posts(
    http: aiohttp.ClientSession,
    url: str,
    make_body: Any,
    until: float,
    counts: Counter[str],
    name: str,
    patient: bool = False,
) -> None:
    n = 0
    while time.monotonic() < until:
        n += 1
        try:
            async with http.post(
                url, data=make_body(n), headers={"content-type": "application/json"}
            ) as r:
                await r.read()
                counts[f"{name}-{r.status}"] += 1
                if patient and r.status == 429:
                    await _retry_after(r, until)
        except (aiohttp.ClientError, TimeoutError):
            counts[f"{name}-error"] += 1
            await asyncio.sleep(0.05)


async def lists(
    http: aiohttp.ClientSession,
    url: str,
    key: str,
    until: float,
    counts: Counter[str],
    patient: bool = False,
) -> None:
    while time.monotonic() < until:
        try:
            async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as r:
                await r.read()
                counts[f"list-{r.status}"] += 1
                if patient and r.status == 429:
                    await _retry_after(r, until)
        except (aiohttp.ClientError, TimeoutError):
            counts["list-error"] += 1
            await asyncio.sleep(0.05)


async def main(config: dict[str, Any]) -> None:
    until = time.monotonic() + config["seconds"]
    counts: Counter[str] = Counter()
    bomb = gzip_bomb(config.get("bomb_mib", 200))
    ingest = f"{config['base']}/in/{config['source']}?token={config['token']}"
    filler = "x" * 900_000

    def big(n: int) -> bytes:  # ~900 KB, keyed by a pointer the ordered targets read
        return json.dumps(
            {
                "uuid": f"big-{n}-{time.time_ns()}",
                "objectType": "Bill",
                "action": "paid",
                "objectId": n,
                "data": {"invoice": {"id": n % 50}},
                "filler": filler,
            }
        ).encode()

    def many_keys(n: int) -> bytes:  # 1,000 events, each its own key
        return json.dumps(
            [
                {
                    "uuid": f"k-{n}-{i}-{time.time_ns()}",
                    "objectType": "Bill",
                    "action": "paid",
                    "objectId": f"{n}-{i}",
                    "data": {"invoice": {"id": f"{n}-{i}"}},
                }
                for i in range(1000)
            ]
        ).encode()

    kinds = set(config.get("kinds", KINDS))
    patient = bool(config.get("patient", False))
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        tasks = []
        if "bomb" in kinds:
            tasks += [bombs(config["host"], config["port"], bomb, until, counts) for _ in range(4)]
        if "big" in kinds:
            tasks += [posts(http, ingest, big, until, counts, "big", patient) for _ in range(3)]
        if "keys" in kinds:
            tasks += [
                posts(http, ingest, many_keys, until, counts, "keys", patient) for _ in range(2)
            ]
        if "list" in kinds:
            listed = f"{config['base']}/v1/events?limit=500"
            tasks += [lists(http, listed, config["key"], until, counts, patient) for _ in range(2)]
            # and small pages, as fast as they are answered: on a slow host two loops of
            # the big pages alone asked less than the API's rate limit (17 a second)
            small = f"{config['base']}/v1/events?limit=1"
            tasks += [lists(http, small, config["key"], until, counts, patient) for _ in range(2)]
        await asyncio.gather(*tasks)
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
