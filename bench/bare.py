"""Ceilings for the benchmarks: a bare aiohttp POST handler, and a bare client."""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
from aiohttp import web


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"ok": True}, status=202)


def serve(port: int) -> None:
    """A bare handler: what aiohttp alone answers on this machine."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", accept)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def client(url: str, total: int, concurrency: int) -> float:
    """POSTs/s of one aiohttp session to ``url``."""
    body = b'{"uuid":"x","objectType":"Bill","action":"paid"}'
    left = total

    async def run(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, data=body) as resp:
                await resp.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(run(session) for _ in range(concurrency)))
        return total / (time.perf_counter() - started)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        print(asyncio.run(client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
