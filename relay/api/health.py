"""Liveness, readiness and the OpenAPI document: no authentication."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from relay import errors
from relay.api.routing import Route, respond
from relay.keys import POOL, REDIS, SETTINGS
from relay.openapi import OPENAPI

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return respond({"status": "ok"})


async def broker_reachable(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the broker at ``url`` accepts a connection (Redis answers PING)."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        client = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(await client.ping())
        except Exception:
            return False
        finally:
            await client.aclose()
    parsed = URL(url)
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(parsed.host, parsed.port or 5672)
        writer.close()
        return True
    except (OSError, TimeoutError):
        return False


async def readyz(request: web.Request) -> web.Response:
    """Postgres and the broker answer; 503 otherwise."""
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            await request.app[POOL].fetchval("SELECT 1")
        checks["postgres"] = "ok"
    except Exception as exc:
        log.warning("readiness: postgres unreachable: %s", type(exc).__name__)
        checks["postgres"] = "unreachable"
    try:
        async with asyncio.timeout(2):
            await request.app[REDIS].ping()
        checks["redis"] = "ok"
    except Exception as exc:
        log.warning("readiness: redis unreachable: %s", type(exc).__name__)
        checks["redis"] = "unreachable"
    settings = request.app[SETTINGS]
    if settings.broker_url and settings.broker_url != settings.redis_url:
        checks["broker"] = "ok" if await broker_reachable(settings.broker_url) else "unreachable"
    down = sorted(name for name, state in checks.items() if state != "ok")
    if down:
        raise errors.Unavailable(f"unreachable: {', '.join(down)}", details={"checks": checks})
    return respond({"status": "ready", "checks": checks})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API."""
    return respond(request.app[OPENAPI])


ROUTES = [
    Route("GET", "/healthz", healthz, "Liveness", "none"),
    Route("GET", "/readyz", readyz, "Readiness: Postgres and the broker reachable", "none"),
    Route("GET", "/openapi.json", openapi, "This document", "none"),
    Route("GET", "/metrics", metrics, "Prometheus metrics", "none"),
]
