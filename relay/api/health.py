"""Liveness, readiness and the OpenAPI document: no authentication."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from relay import errors
from relay.api.routing import Route, respond
from relay.keys import POOL, REDIS
from relay.openapi import OPENAPI

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return respond({"status": "ok"})


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
    down = sorted(name for name, state in checks.items() if state != "ok")
    if down:
        raise errors.Unavailable(f"unreachable: {', '.join(down)}", details={"checks": checks})
    return respond({"status": "ready", "checks": checks})


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API."""
    return respond(request.app[OPENAPI])


ROUTES = [
    Route("GET", "/healthz", healthz, "Liveness", "none"),
    Route("GET", "/readyz", readyz, "Readiness: Postgres and the broker reachable", "none"),
    Route("GET", "/openapi.json", openapi, "This document", "none"),
]
