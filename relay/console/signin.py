"""Signing in with the admin token or a tenant API key, and signing out."""

from __future__ import annotations

from aiohttp import web

from relay.console.forms import local_path
from relay.console.render import PREFIX, page, see_other
from relay.console.session import current_viewer, identify, sign_in, sign_out
from relay.core import errors
from relay.core.auth_throttle import MANAGEMENT
from relay.web.app_keys import THROTTLE

#: Why the sign-in page is shown, in words (``?reason=``).
REASONS = {
    "expired": "Your session ended after a while without activity. Sign in again.",
    "ended": "Your session has ended (signed out, or its key was revoked). Sign in again.",
    "signed_out": "You are signed out.",
}

NEITHER = "That is neither the admin token nor a live API key."


class SignIn(web.View):
    """The sign-in form."""

    async def get(self) -> web.StreamResponse:
        request = self.request
        if not isinstance(await current_viewer(request), str):
            return see_other(local_path(request.query.get("next")) or f"{PREFIX}/")
        return await page(
            request,
            "login.html",
            {
                "title": "Sign in",
                "notice": REASONS.get(request.query.get("reason", "")),
                "error": None,
                "next": local_path(request.query.get("next")) or "",
            },
        )

    async def post(self) -> web.StreamResponse:
        request = self.request
        form = await request.post()
        token = form.get("token")
        throttle = request.app[THROTTLE]
        tried = token.strip() if isinstance(token, str) else ""
        identity = await identify(request, tried) if tried else None
        try:
            if identity is None:
                if tried:  # a value was tried: it costs the guesser (a growing delay, then 429)
                    await throttle.failed("console", MANAGEMENT, request.remote)
                return await self._again(form.get("next"), NEITHER)
            # decided only now: from a locked-out address even the right token is refused
            await throttle.admit("console", MANAGEMENT, request.remote)
        except errors.RateLimited as exc:
            refused = await self._again(form.get("next"), exc.message, status=exc.status)
            refused.headers.update(exc.headers)
            return refused
        await sign_in(request, identity)
        return see_other(local_path(form.get("next")) or f"{PREFIX}/")

    async def _again(self, next_path: object, error: str, status: int = 401) -> web.Response:
        return await page(
            self.request,
            "login.html",
            {
                "title": "Sign in",
                "notice": None,
                "error": error,
                "next": local_path(next_path) or "",
            },
            status=status,
        )


class SignOut(web.View):
    """Ends the session (a post, with the CSRF token like every form)."""

    async def post(self) -> web.StreamResponse:
        await sign_out(self.request)
        return see_other(f"{PREFIX}/login?reason=signed_out")


def add_views(router: web.UrlDispatcher) -> None:
    """The sign-in and sign-out routes."""
    router.add_view("/login", SignIn)
    router.add_view("/logout", SignOut)
