"""Signing in with the admin token or a tenant API key, and signing out."""

from __future__ import annotations

from aiohttp import web

from relay.console.forms import local_path
from relay.console.render import PREFIX, page, see_other
from relay.console.session import current_viewer, sign_in, sign_out

#: Why the sign-in page is shown, in words (``?reason=``).
REASONS = {
    "expired": "Your session ended after a while without activity. Sign in again.",
    "ended": "Your session has ended (signed out, or its key was revoked). Sign in again.",
    "signed_out": "You are signed out.",
}


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
        viewer = None
        if isinstance(token, str) and token.strip():
            viewer = await sign_in(request, token.strip())
        if viewer is None:
            return await page(
                request,
                "login.html",
                {
                    "title": "Sign in",
                    "notice": None,
                    "error": "That is neither the admin token nor a live API key.",
                    "next": local_path(form.get("next")) or "",
                },
                status=401,
            )
        return see_other(local_path(form.get("next")) or f"{PREFIX}/")


class SignOut(web.View):
    """Ends the session (a post, with the CSRF token like every form)."""

    async def post(self) -> web.StreamResponse:
        await sign_out(self.request)
        return see_other(f"{PREFIX}/login?reason=signed_out")


def add_views(router: web.UrlDispatcher) -> None:
    """The sign-in and sign-out routes."""
    router.add_view("/login", SignIn)
    router.add_view("/logout", SignOut)
