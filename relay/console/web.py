"""The console's aiohttp sub-application under ``/console/``: middlewares, routes, templates.

It is a sub-application so that what it adds (sessions, CSRF checks, the
Content-Security-Policy, HTML error pages) applies to console responses only,
never to the API. Its routes are class-based views (``add_view``), so they are
not API operations and stay out of the OpenAPI document and its conformance
checks. The API's resources (pool, settings, broker…) are shared with it at
startup, so the API's own helpers work on console requests unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp_session import session_middleware

from relay.api.routing import DEPENDENCY_ERRORS, caller_gone
from relay.console import dead_letters, deliveries, events, overview, portal, signin, targets
from relay.console.render import FILTERS, GLOBALS, PREFIX, error_page, see_other
from relay.console.session import VIEWER, csrf_ok, current_viewer, session_storage
from relay.core import errors
from relay.core.crypto import new_id
from relay.web.app_keys import CACHE, ENQUEUER, POOL, REDIS, SECRETS, SETTINGS, THROTTLE

log = logging.getLogger(__name__)

# aiohttp-session keeps its state under plain string request keys; aiohttp warns
# once per key. Nothing to fix on our side.
warnings.filterwarnings("ignore", category=web.NotAppKeyWarning, module="aiohttp_session")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
#: The only files served under /console/static/, with their media types.
STATIC_FILES = {
    "console.css": "text/css",
    "console.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}
#: Paths open without a session (the sign-in page itself).
PUBLIC = frozenset({f"{PREFIX}/login"})
STATIC_PREFIX = f"{PREFIX}/static/"
#: A Host header we are willing to put into the Content-Security-Policy.
_SANE_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def content_security_policy(request: web.Request) -> str:
    """Scripts, styles and images only from the console's own static files; nothing inline."""
    host = request.host
    if _SANE_HOST.match(host):
        # an http source also matches https (CSP 3), so a TLS-terminating proxy is fine
        origin = f"{request.scheme}://{host}"
        static, console = f"{origin}{STATIC_PREFIX}", f"{origin}{PREFIX}/"
    else:
        static = console = "'self'"
    return (
        f"default-src 'none'; script-src {static}; style-src {static}; img-src {static}; "
        f"connect-src {console}; form-action {console}; frame-ancestors 'none'; "
        "base-uri 'none'"
    )


def _secure(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Content-Security-Policy"] = content_security_policy(request)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if not request.path.startswith(STATIC_PREFIX):
        # pages hold tenants' data: never kept by a browser or a proxy
        response.headers["Cache-Control"] = "no-store"
    return response


@web.middleware
async def console_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every console answer; failures as HTML pages, never JSON."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            response = web.Response(status=exc.status, headers=exc.headers)
        else:
            response = await error_page(
                request, exc.status, _HTTP_MESSAGES.get(exc.status, exc.reason)
            )
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
    except errors.RelayError as exc:
        # a 404 reads the same whether the thing is missing or another tenant's
        message = _HTTP_MESSAGES[404] if exc.status == 404 else exc.message
        response = await error_page(request, exc.status, message)
    except DEPENDENCY_ERRORS as exc:
        if caller_gone(request, exc):
            # the browser went away mid-request (aiohttp fails the form's read)
            log.debug("console: caller gone on %s", portal.loggable(request.path))
            raise
        log.warning(
            "console: dependency unavailable on %s: %s",
            portal.loggable(request.path),
            type(exc).__name__,
        )
        response = await error_page(
            request, 503, "A dependency (Postgres or Redis) is unavailable."
        )
    except Exception:
        error_id = new_id("err")
        log.exception(
            "console: unhandled error %s on %s %s",
            error_id,
            request.method,
            portal.loggable(request.path),
        )
        response = await error_page(
            request, 500, f"Something went wrong on our side; quote {error_id} to the operator."
        )
    return _secure(request, response)


_HTTP_MESSAGES = {
    404: "There is nothing here, or it belongs to another tenant.",
    405: "This page does not take that kind of request.",
}


class CsrfRefused(errors.RelayError):
    """This form did not come from this console session; reload the page and try again."""

    status, code = 403, "forbidden"


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every form post carries the session's CSRF token; every page but sign-in needs a session."""
    path = request.path
    if path.startswith(STATIC_PREFIX):
        return await handler(request)
    if request.method == "POST" and not await csrf_ok(request):
        raise CsrfRefused()
    if path in PUBLIC or portal.is_public(path):
        return await handler(request)
    state = await current_viewer(request)
    if not isinstance(state, str):
        request[VIEWER] = state
        portal.refuse_writes(request, state)
        return await handler(request)
    if request.headers.get("X-Relay-Fragment"):
        raise errors.Unauthorized("your session has ended; reload the page to sign in")
    if state == "portal_ended":
        # a portal user has no key to sign in with: say the session ended, and why
        return see_other(portal.ENDED_PATH)
    params = [] if state == "none" else [f"reason={state}"]
    if request.method == "GET":
        params.append("next=" + quote(request.rel_url.path_qs, safe=""))
    return see_other(f"{PREFIX}/login" + ("?" + "&".join(params) if params else ""))


class StaticFile(web.View):
    """The console's own CSS, script and icon; nothing else."""

    async def get(self) -> web.StreamResponse:
        name = self.request.match_info["name"]
        media_type = STATIC_FILES.get(name)
        if media_type is None:
            raise web.HTTPNotFound()
        return web.FileResponse(
            STATIC_DIR / name,
            headers={
                "Content-Type": media_type,
                # names carry ?v=<content hash> in pages, so a new version is a new URL
                "Cache-Control": "public, max-age=86400",
            },
        )


class ConsoleRoot(web.View):
    """``/console``: the console lives at ``/console/``."""

    async def get(self) -> web.StreamResponse:
        return see_other(f"{PREFIX}/")


def asset_version() -> str:
    """A short hash of the static files: pages link them with it, so caches never go stale."""
    digest = hashlib.sha256()
    for name in sorted(STATIC_FILES):
        digest.update((STATIC_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


#: Keys of the gateway the console reads (and the API helpers it calls read) on its requests.
_SHARED_KEYS: tuple[web.AppKey[Any], ...] = (
    SETTINGS,
    POOL,
    REDIS,
    SECRETS,
    CACHE,
    ENQUEUER,
    THROTTLE,
)


def setup(app: web.Application) -> None:
    """Mount the console on the gateway ``app`` under ``/console/``."""
    console = web.Application(
        middlewares=[
            console_errors,
            session_middleware(session_storage(app[SETTINGS])),
            authenticate,
        ]
    )
    env = aiohttp_jinja2.setup(
        console,
        loader=jinja2.PackageLoader("relay.console", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        default_helpers=False,
    )
    env.filters.update(FILTERS)
    env.globals.update(GLOBALS)
    env.globals["asset_version"] = asset_version()
    router = console.router
    router.add_view("/static/{name}", StaticFile)
    signin.add_views(router)
    overview.add_views(router)
    dead_letters.add_views(router)
    deliveries.add_views(router)
    targets.add_views(router)
    events.add_views(router)
    portal.add_views(router)

    async def share(_: web.Application) -> AsyncIterator[None]:
        # the gateway's cleanup contexts ran first: its pool, Redis and broker are open
        for key in _SHARED_KEYS:
            console[key] = app[key]
        yield

    console.cleanup_ctx.append(share)
    app.add_subapp(PREFIX, console)
    app.router.add_view(PREFIX, ConsoleRoot)
