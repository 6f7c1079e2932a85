"""Opening a portal link: a page that says whose console it opens, and a button that signs in.

A GET never uses a link up: link previews and prefetchers GET what they see,
and would burn it. The page's button posts (with the CSRF token of the session
the page started), and that post uses the link, once, in one statement
(``portal_links.use_portal_link``). A link that cannot be opened (unknown,
used, expired) is a page that says so, never a redirect to sign in.

A read-only portal session is refused every post but sign-out: the pages show
it no control, and a post made anyway is a 403 page.
"""

from __future__ import annotations

import re
from typing import Literal

from aiohttp import web

from relay.console.render import PREFIX, error_page, page, see_other
from relay.console.session import Viewer, sign_in_portal
from relay.core import errors
from relay.core.auth_throttle import MANAGEMENT
from relay.core.crypto import PORTAL_TOKEN_PREFIX, hash_portal_token
from relay.store import portal_links as store
from relay.web.app_keys import POOL, THROTTLE

#: Where links open (``/console/portal/<token>``) and where an ended portal session lands.
LINK_PREFIX = f"{PREFIX}/portal/"
ENDED_PATH = f"{PREFIX}/portal-ended"
#: What ``relay.core.crypto.new_portal_token`` makes; anything else is unknown without a query.
_TOKEN = re.compile(re.escape(PORTAL_TOKEN_PREFIX) + r"[A-Za-z0-9_-]{43}")

Refusal = Literal["unknown", "used", "expired"]
_REFUSALS: dict[Refusal, tuple[int, str, str]] = {
    "unknown": (
        404,
        "Not a portal link",
        "This is not a valid portal link. Check that it was copied whole, or ask for a new one.",
    ),
    "used": (
        410,
        "Link already used",
        "This portal link has already been used: a portal link opens the console once. "
        "Ask for a new one.",
    ),
    "expired": (410, "Link expired", "This portal link has expired. Ask for a new one."),
}


def is_public(path: str) -> bool:
    """True for the pages a browser sees without a session: a link, and the ended page."""
    return path.startswith(LINK_PREFIX) or path == ENDED_PATH


def loggable(path: str) -> str:
    """``path`` as it may be logged: a link's token is a credential, never written to a log."""
    return LINK_PREFIX + "…" if path.startswith(LINK_PREFIX) else path


class ReadOnlySession(errors.RelayError):
    """This is a read-only portal session: it shows everything and changes nothing."""

    status, code = 403, "forbidden"


def refuse_writes(request: web.Request, viewer: Viewer) -> None:
    """A read-only session may post nothing but sign-out."""
    if viewer.read_only and request.method == "POST" and request.path != f"{PREFIX}/logout":
        raise ReadOnlySession(
            "This is a read-only portal session: it shows everything and changes nothing "
            "(no replay, purge, retry, secret rotation, enabling, disabling or test event)."
        )


async def _refused(request: web.Request, why: Refusal) -> web.Response:
    status, title, message = _REFUSALS[why]
    return await page(
        request,
        "portal.html",
        {"title": title, "refused": True, "message": message, "grant": None},
        status=status,
    )


async def _guessed(request: web.Request, why: Refusal) -> web.Response:
    """A link that opens nothing: counted like a failed sign-in (a growing delay, then 429)."""
    try:
        await request.app[THROTTLE].failed("console", MANAGEMENT, request.remote)
    except errors.RateLimited as exc:
        return await _throttled(request, exc)
    return await _refused(request, why)


async def _throttled(request: web.Request, exc: errors.RateLimited) -> web.Response:
    response = await error_page(request, exc.status, exc.message)
    response.headers.update(exc.headers)
    return response


class PortalLink(web.View):
    """``/console/portal/{token}``: GET shows the button, POST uses the link and signs in."""

    async def get(self) -> web.StreamResponse:
        request = self.request
        token = request.match_info["token"]
        if not _TOKEN.fullmatch(token):
            return await _guessed(request, "unknown")
        found = await store.look_up_portal_link(request.app[POOL], hash_portal_token(token))
        if found is None:
            return await _guessed(request, "unknown")
        grant, state = found
        if state != "open":
            return await _refused(request, state)
        return await page(
            request,
            "portal.html",
            {
                "title": f"Open the console as {grant.tenant_name}",
                "refused": False,
                "message": None,
                "grant": grant,
            },
        )

    async def post(self) -> web.StreamResponse:
        request = self.request
        token = request.match_info["token"]
        if not _TOKEN.fullmatch(token):
            return await _guessed(request, "unknown")
        try:
            # from a locked-out address even a good link waits (it stays unused)
            await request.app[THROTTLE].admit("console", MANAGEMENT, request.remote)
        except errors.RateLimited as exc:
            return await _throttled(request, exc)
        token_hash = hash_portal_token(token)
        grant = await store.use_portal_link(request.app[POOL], token_hash)
        if grant is None:
            found = await store.look_up_portal_link(request.app[POOL], token_hash)
            # found and "open": used and expired in the same instant; say it was used
            return await _guessed(
                request, "unknown" if found is None else found[1] if found[1] != "open" else "used"
            )
        await sign_in_portal(request, grant)
        return see_other(f"{PREFIX}/")


class PortalEnded(web.View):
    """``/console/portal-ended``: where a portal session that ended sends its browser."""

    async def get(self) -> web.StreamResponse:
        return await page(
            self.request,
            "portal.html",
            {
                "title": "Portal session ended",
                "refused": True,
                "message": "Your portal session has ended: its link expired, or it was left "
                "unused for a while, or you signed out. Ask for a new link.",
                "grant": None,
            },
        )


def add_views(router: web.UrlDispatcher) -> None:
    """The portal routes (relative to the console)."""
    router.add_view("/portal/{token}", PortalLink)
    router.add_view("/portal-ended", PortalEnded)
