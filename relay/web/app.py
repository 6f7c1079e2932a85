"""The gateway application: routes, middlewares, and the resources opened with it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
from aiohttp import StreamReader, web

from relay.api import (
    admin,
    deliveries,
    events,
    health,
    ingest,
    operational,
    portal,
    sources,
    targets,
    tenants,
)
from relay.api.routing import DEPENDENCY_ERRORS, Route, add_routes, caller_gone, respond
from relay.console import setup as setup_console
from relay.core import errors
from relay.core.auth_throttle import AuthThrottle
from relay.core.config import Settings
from relay.core.crypto import SecretBox, new_id
from relay.core.ratelimit import RateLimiter
from relay.delivery.wakeups import Enqueuer, make_broker
from relay.ingest.group_commit import GroupCommit
from relay.ingest.routes import RoutingCache
from relay.store.db import create_pool
from relay.store.migrations import require_schema
from relay.web.app_keys import (
    CACHE,
    ENQUEUER,
    GROUP_COMMIT,
    LIMITER,
    OPENAPI,
    POOL,
    REDIS,
    SECRETS,
    SETTINGS,
    THROTTLE,
)
from relay.web.edge import edge_middleware
from relay.web.openapi import build_openapi
from relay.web.server import BodyTimeout, RequestTimeout

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_HTTP_ERRORS: dict[int, type[errors.RelayError]] = {
    400: errors.InvalidRequest,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
    415: errors.UnsupportedMediaType,
}


def all_routes() -> list[Route]:
    """Every route of the gateway, in one table."""
    return [
        *health.ROUTES,
        *tenants.ROUTES,
        *admin.ROUTES,
        *sources.ROUTES,
        *targets.ROUTES,
        *events.ROUTES,
        *operational.ROUTES,
        *deliveries.ROUTES,
        *portal.ROUTES,
        *ingest.ROUTES,
    ]


def error_response(exc: errors.RelayError) -> web.Response:
    """API.md's error shape for ``exc``."""
    return respond(exc.body(), status=exc.status, headers=exc.headers)


def closing(response: web.Response) -> web.Response:
    """``response``, after which the connection is closed (its body stream is broken)."""
    response.force_close()
    return response


def _expire(body: StreamReader) -> None:
    if not body.is_eof():
        body.set_exception(BodyTimeout())  # the handler's next (or pending) read raises it


@web.middleware
async def body_deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The body must arrive within RELAY_BODY_TIMEOUT_S of the head, else reading it fails."""
    body = request.content
    if body.is_eof():
        return await handler(request)
    deadline = request.app[SETTINGS].body_timeout_s
    timer = asyncio.get_running_loop().call_later(deadline, _expire, body)
    try:
        return await handler(request)
    finally:
        timer.cancel()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into API.md's error shape; never a traceback to the caller."""
    try:
        return await handler(request)
    except errors.RelayError as exc:
        return error_response(exc)
    except web.RequestPayloadError:
        # aiohttp could not decode the body (e.g. Content-Encoding: gzip that is not gzip)
        message = "the body could not be read: it is truncated or not in its Content-Encoding"
        return closing(error_response(errors.InvalidRequest(message)))
    except BodyTimeout:
        seconds = request.app[SETTINGS].body_timeout_s
        return closing(error_response(RequestTimeout(f"the body took longer than {seconds:g} s")))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _HTTP_ERRORS.get(exc.status)
        if kind is None:
            error = errors.RelayError(exc.reason)
            error.status, error.code = exc.status, exc.reason.lower().replace(" ", "_")
        else:
            error = kind()
        if exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            error.headers["Allow"] = allowed
        return error_response(error)
    except asyncio.CancelledError:
        raise
    except DEPENDENCY_ERRORS as exc:
        if caller_gone(request, exc):
            # the caller hung up (aiohttp fails the body's read): no one to answer
            log.debug("caller gone on %s %s", request.method, request.path)
            return error_response(errors.InvalidRequest("the caller hung up"))
        log.warning(
            "dependency unavailable on %s %s: %s", request.method, request.path, type(exc).__name__
        )
        return error_response(errors.Unavailable())
    except Exception:
        error_id = new_id("err")
        log.exception("unhandled error %s on %s %s", error_id, request.method, request.path)
        failure = errors.RelayError(
            f"internal error; quote {error_id} to the operator", details={"error_id": error_id}
        )
        return error_response(failure)


def create_app(settings: Settings) -> web.Application:
    """The gateway for ``settings``; Postgres and Redis are opened on startup."""
    app = web.Application(
        # the edge: what is not UTF-8 is refused before any handler reads it
        middlewares=[error_middleware, body_deadline_middleware, edge_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[SECRETS] = SecretBox(settings.secret_key)
    app[CACHE] = RoutingCache(settings.cache_ttl_s)
    routes = all_routes()
    app[OPENAPI] = build_openapi(routes)
    add_routes(app, routes)
    app.cleanup_ctx.append(_postgres)
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_broker)
    app.cleanup_ctx.append(_group_commit)
    # /console/: a sub-application (its own sessions, CSRF checks and CSP) that shares
    # what the cleanup contexts above open; they start before it does
    setup_console(app)
    return app


async def _postgres(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[POOL] = await create_pool(
        settings.database_url,
        min_size=2,
        max_size=20,
        command_timeout=settings.db_statement_timeout_s,
    )
    await require_schema(app[POOL])  # SchemaBehind: `relay serve` says so and stops
    yield
    await app[POOL].close()


async def _redis(app: web.Application) -> AsyncIterator[None]:
    client = aioredis.from_url(app[SETTINGS].redis_url, socket_timeout=2, socket_connect_timeout=2)
    app[REDIS] = client
    app[LIMITER] = RateLimiter(client)
    settings = app[SETTINGS]
    app[THROTTLE] = AuthThrottle(
        client,
        limit=settings.auth_failure_limit,
        window_s=settings.auth_failure_window_s,
        delay_s=settings.auth_failure_delay_s,
    )
    yield
    await client.aclose()


async def _broker(app: web.Application) -> AsyncIterator[None]:
    # No middleware: the gateway only enqueues; the workers carry the actor's options.
    # (no immediate wake-up for a target whose busy drainer keeps its key in Redis)
    broker = make_broker(app[SETTINGS].broker_url, middleware=[], fail_fast=True)
    app[ENQUEUER] = Enqueuer(broker, draining=app[REDIS])
    yield
    await app[ENQUEUER].close()


async def _group_commit(app: web.Application) -> AsyncIterator[None]:
    settings, enqueuer = app[SETTINGS], app[ENQUEUER]
    app[GROUP_COMMIT] = GroupCommit(
        app[POOL],
        enqueue_grace_s=settings.requeue_after_s,
        first_delay_s=settings.retry_schedule[0],
        committed=lambda woken: enqueuer.wake_soon(woken, delay_s=settings.retry_schedule[0]),
        max_waiting=settings.ingest_max_waiting,
        acquire_timeout_s=settings.db_acquire_timeout_s,
    )
    yield
    await app[GROUP_COMMIT].close()
