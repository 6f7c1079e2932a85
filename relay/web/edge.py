"""The edge: every header, query and form value is text before any handler reads it.

aiohttp hands header values over with the bytes that are not UTF-8 as lone
surrogates (``surrogateescape``), and percent-decodes a query or a form with
U+FFFD in place of such bytes. A credential compared or hashed as UTF-8 then
raised in the middle of a handler (a 500 with a traceback quoting the byte).
Here they are checked once, before any handler: a request carrying such bytes
is answered 400 ``invalid_request`` in API.md's error shape, on every route
and whichever header carries them (a credential included), naming where the
bytes were but never echoing them, and logged at DEBUG only. Past this
middleware every header, query and console form value is valid UTF-8.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, unquote_to_bytes

from aiohttp import web

from relay.core import errors

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Where forms are posted (the console); the API takes only JSON.
FORM_PREFIX = "/console/"
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


def is_text(value: str) -> bool:
    """True when ``value`` came from valid UTF-8 (no byte was smuggled in as a surrogate)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def percent_decodes_as_text(encoded: str) -> bool:
    """True when a query string or urlencoded form decodes to UTF-8, ``%XX`` escapes included."""
    if not is_text(encoded):
        return False
    try:
        unquote_to_bytes(encoded.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def header_problem(request: web.Request) -> errors.RelayError | None:
    """The refusal for the first header whose value is not UTF-8, if any."""
    for name, value in request.headers.items():
        if is_text(value):
            continue
        shown = name if name.isascii() and name.isprintable() else "a"
        return errors.InvalidRequest(f"the {shown} header is not valid UTF-8")
    return None


async def form_problem(request: web.Request) -> errors.RelayError | None:
    """The refusal for a console form that is not UTF-8, if any (the form is read once here)."""
    if request.method != "POST" or not request.path.startswith(FORM_PREFIX):
        return None
    if request.content_type not in _FORM_TYPES:
        return None
    refusal = errors.InvalidRequest("the form is not valid UTF-8")
    if request.content_type == "multipart/form-data":
        try:
            await request.post()  # aiohttp decodes each field strictly; the result is kept
        except (UnicodeDecodeError, LookupError):
            return refusal
        return None
    body = await request.read()  # kept by aiohttp: the handler's post() parses the same bytes
    try:
        parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return refusal
    return None


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a request whose headers, query or form are not UTF-8; else hand it on."""
    problem = header_problem(request)
    if problem is None and not percent_decodes_as_text(request.rel_url.raw_query_string):
        problem = errors.InvalidRequest("the query string is not valid UTF-8")
    if problem is None:
        problem = await form_problem(request)
    if problem is not None:
        log.debug("refused a request that is not UTF-8: %s", problem.message)
        raise problem
    return await handler(request)
