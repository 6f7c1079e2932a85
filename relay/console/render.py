"""Rendering: pages with their shared context, redirects, error pages, template filters."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web
from markupsafe import Markup, escape

from relay.console.session import CSRF_FIELD, VIEWER, csrf_token, take_flash
from relay.web.app_keys import SETTINGS

PREFIX = "/console"
#: Rows per page of every list (the API's default page size).
PAGE_SIZE = 50


def see_other(location: str) -> web.Response:
    """303: after a form post, the browser GETs ``location`` (so a reload does not post again)."""
    return web.Response(status=303, headers={"Location": location})


async def page(
    request: web.Request,
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
) -> web.Response:
    """A full page: ``context`` plus who is looking, the CSRF token and any pending message."""
    common = {
        "viewer": request.get(VIEWER),
        "csrf_field": CSRF_FIELD,
        "csrf_token": await csrf_token(request),
        "flash": await take_flash(request),
        "idle_minutes": round(request.app[SETTINGS].console_idle_s / 60),
        "path": request.path,
    }
    return aiohttp_jinja2.render_template(template, request, {**common, **context}, status=status)


def fragment(request: web.Request, template: str, context: Mapping[str, Any]) -> web.Response:
    """A piece of a page, for the console's script to swap in (no layout, no session writes)."""
    return aiohttp_jinja2.render_template(template, request, dict(context))


async def error_page(request: web.Request, status: int, message: str) -> web.Response:
    """An HTML error page; a signed-in viewer keeps the sign-out button (except on a 503:
    the session may be what failed, so it is not touched then)."""
    token = None
    if request.get(VIEWER) is not None and status != 503:
        with contextlib.suppress(Exception):
            token = await csrf_token(request)
    titles = {
        401: "Please sign in",
        403: "Refused",
        404: "Not found",
        405: "Not allowed",
        409: "Not now",
        422: "Check what you entered",
        503: "Unavailable",
    }
    context = {
        "viewer": request.get(VIEWER),
        "csrf_field": CSRF_FIELD,
        "csrf_token": token,
        "flash": None,
        "idle_minutes": round(request.app[SETTINGS].console_idle_s / 60),
        "path": request.path,
        "status": status,
        "title": titles.get(status, "Something went wrong"),
        "message": message,
    }
    return aiohttp_jinja2.render_template("error.html", request, context, status=status)


# --- filters and globals -----------------------------------------------------------


def utc_text(value: datetime) -> str:
    """``2026-11-28 12:00:00 UTC``."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def when(value: datetime | None) -> Markup:
    """A time in UTC that the console's script shows in the viewer's zone (UTC on hover)."""
    if value is None:
        return Markup("<span class='muted'>—</span>")
    utc = value.astimezone(UTC)
    iso = utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    text = utc_text(utc)
    return Markup('<time datetime="{0}" title="{1}">{1}</time>').format(iso, text)


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """``3 min ago``, roughly."""
    if value is None:
        return "—"
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 60:
        text = f"{int(seconds)} s"
    elif seconds < 3600:
        text = f"{int(seconds // 60)} min"
    elif seconds < 86400:
        text = f"{seconds / 3600:.1f} h"
    else:
        text = f"{seconds / 86400:.1f} days"
    return f"in {text}" if future else f"{text} ago"


def duration(ms: float | None) -> str:
    """``87 ms`` or ``1.2 s``."""
    if ms is None:
        return "—"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def number(n: int) -> str:
    """``12,345``."""
    return f"{n:,}"


def percent(x: float | None) -> str:
    """``99.5 %`` (``—``: nothing to measure)."""
    if x is None:
        return "—"
    return f"{x * 100:.1f} %".replace(".0 %", " %")


def pretty_json(value: Any) -> str:
    """JSON with two-space indents, keys in the order received, non-ASCII kept."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def query(params: Mapping[str, Any], **changes: Any) -> str:
    """``?a=1&b=2`` from ``params`` with ``changes``; empty values are left out."""
    merged = {**params, **changes}
    kept = [(k, str(v)) for k, v in merged.items() if v not in (None, "")]
    return "?" + urlencode(kept) if kept else ""


def shorten(text: str | None, length: int = 80) -> str:
    """``text`` cut to ``length`` characters with an ellipsis."""
    if not text:
        return ""
    return text if len(text) <= length else text[: length - 1] + "…"


#: How each delivery status reads: a word and a sign, never colour alone.
STATUS = {
    "succeeded": ("succeeded", "✓"),
    "pending": ("pending", "…"),
    "retrying": ("retrying", "↻"),
    "dead": ("dead", "✕"),
}

FILTERS = {
    "when": when,
    "ago": ago,
    "duration": duration,
    "number": number,
    "percent": percent,
    "pretty_json": pretty_json,
    "shorten": shorten,
}
GLOBALS = {"query": query, "STATUS": STATUS, "prefix": PREFIX, "escape": escape}
