"""Liveness, readiness and the OpenAPI document: no authentication."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from relay.api.routing import Route, respond
from relay.core import errors
from relay.core.metrics import DEPENDENCY_UP
from relay.web.app_keys import OPENAPI, POOL, REDIS, SETTINGS

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


async def _state(probe: Awaitable[object], name: str) -> str:
    """``ok`` when ``probe`` completes within 2 s, ``unreachable`` otherwise (logged)."""
    try:
        async with asyncio.timeout(2):
            await probe
    except Exception as exc:
        log.warning("readiness: %s unreachable: %s", name, type(exc).__name__)
        return "unreachable"
    return "ok"


async def readyz(request: web.Request) -> web.Response:
    """Ready while Postgres answers (503 otherwise); Redis and the broker are reported.

    Ingest commits to Postgres and the sweeper enqueues what the broker missed,
    so a gateway whose broker is down still accepts work: it stays in the load
    balancer, and says what is down in the body and in ``relay_dependency_up``.
    """
    checks = {
        "postgres": await _state(request.app[POOL].fetchval("SELECT 1"), "postgres"),
        "redis": await _state(request.app[REDIS].ping(), "redis"),
    }
    settings = request.app[SETTINGS]
    if settings.broker_url and settings.broker_url != settings.redis_url:
        checks["broker"] = "ok" if await broker_reachable(settings.broker_url) else "unreachable"
    else:
        checks["broker"] = checks["redis"]
    for name, state in checks.items():
        DEPENDENCY_UP.labels(name).set(1 if state == "ok" else 0)
    if checks["postgres"] != "ok":
        raise errors.Unavailable("unreachable: postgres", details={"checks": checks})
    return respond({"status": "ready", "checks": checks})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API."""
    return respond(request.app[OPENAPI])


ROUTES = [
    Route("GET", "/healthz", healthz, "Liveness", "none"),
    Route("GET", "/readyz", readyz, "Readiness: Postgres reachable", "none"),
    Route("GET", "/openapi.json", openapi, "This document", "none"),
    Route("GET", "/metrics", metrics, "Prometheus metrics", "none"),
]
