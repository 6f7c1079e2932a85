"""The gateway's HTTP server: aiohttp's, with limits, and its own errors in API.md's shape.

aiohttp answers requests it cannot parse itself, before any route runs: in plain
text that echoes up to 100 bytes of the request (a ``?token=`` included), with
an ERROR traceback holding the same bytes. :class:`GatewayRequestHandler` answers
them in API.md's error shape with a fixed message, logs only the error's type,
and adds what aiohttp lacks: a deadline on request heads, a cap on open
connections (for which the longest idle kept-alive connection makes room), and
a body left unread dropped unparsed instead of read and inflated after the
answer. `relay serve`, `relay dev` and the tests' gateway all run
:class:`GatewayRunner`.

What aiohttp offers publicly is used as is: its options (``keepalive_timeout``,
``max_line_size``…) go through ``web.AppRunner``'s keyword arguments, a connection
is a ``web.RequestHandler`` (subclassed through its public methods), and the head
deadline counts requests itself, in the handler :class:`GatewayServer` wraps around
the application's. Two private hooks remain, because aiohttp has no public way to
choose the protocol class of an ``AppRunner`` nor the class of its requests:
``AppRunner._make_server`` and ``Application._make_request``'s ``_cls`` (requests are
:class:`relay.web.bodies.GatewayRequest`, which inflates a body when it is read).
:func:`check_aiohttp_internals` fails at import if either is gone or changed, and
:meth:`GatewayRunner.setup` fails at start if aiohttp did not call it; pyproject
pins aiohttp below its next minor version.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    ContentEncodingError,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.streams import StreamReader
from aiohttp.web_request import BaseRequest

from relay.core import errors, loops
from relay.core.config import Settings
from relay.core.metrics import CONNECTIONS_REFUSED, HEAD_DEADLINE_ERRORS, IDLE_CLOSED
from relay.web.app_keys import SETTINGS
from relay.web.bodies import GatewayRequest

log = logging.getLogger(__name__)

#: aiohttp's keep-alive for idle connections (what ``web.run_app`` uses).
KEEPALIVE_TIMEOUT_S = 75.0
#: How long a refused connection may take to read its 503 before it is closed.
REFUSAL_LINGER_S = 1.0
#: After answering a request whose body was not read to its end, how long the rest
#: is still received (and thrown away unparsed, never inflated) before the connection
#: is closed: closing at once could reset the connection before the client read its
#: answer. aiohttp's ``lingering_time``, which would otherwise read and inflate it.
DISCARD_LINGER_S = 2.0


class HeadersTooLarge(errors.RelayError):
    """The request line or the headers are too large."""

    status, code = 431, "invalid_request"


class RequestTimeout(errors.RelayError):
    """The request body did not arrive in time."""

    status, code = 408, "request_timeout"


class BodyTimeout(Exception):
    """Set on a request's body stream when its deadline passes."""


#: Exceptions that mean the client sent something broken or too slowly: not our failure.
CLIENT_FAULTS: tuple[type[BaseException], ...] = (
    HttpProcessingError,
    web.RequestPayloadError,
    BodyTimeout,
)


def low_level_error(exc: BaseException | None) -> errors.RelayError:
    """API.md's error for a request aiohttp could not parse; never quotes the request."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
        bound = f" ({limit} bytes)" if limit is not None else ""
        return HeadersTooLarge(f"the request line or a header is longer than allowed{bound}")
    if isinstance(exc, BadHttpMessage) and exc.message == "Too many headers received":
        return HeadersTooLarge("too many headers")
    if isinstance(exc, ContentEncodingError):
        return errors.InvalidRequest(
            "unsupported Content-Encoding (send gzip, deflate or none) or a body that does not"
            " decode"
        )
    if isinstance(exc, PayloadEncodingError):
        return errors.InvalidRequest("the body does not match its Content-Length or chunking")
    if isinstance(exc, BadHttpMethod):
        return errors.InvalidRequest("not an HTTP/1.1 request")
    if isinstance(exc, InvalidURLError):
        return errors.InvalidRequest("invalid request target")
    return errors.InvalidRequest("malformed HTTP request (request line or headers)")


def _raw_response(error: errors.RelayError) -> bytes:
    """A whole HTTP/1.1 answer for ``error`` that closes the connection."""
    body = json.dumps(error.body()).encode()
    head = f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in error.headers.items())
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "Connection: close\r\n\r\n").encode() + body


_REFUSAL = _raw_response(errors.Unavailable("too many open connections; try again shortly"))


class GatewayRequestHandler(web.RequestHandler):
    """One connection: aiohttp's protocol with a head deadline, a cap and quiet errors."""

    def __init__(
        self,
        manager: GatewayServer,
        *,
        settings: Settings,
        loop: asyncio.AbstractEventLoop,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._gateway = manager
        self._gateway_loop = loop
        self._header_timeout_s = settings.header_timeout_s
        self._max_connections = settings.max_connections
        self._head_timer: asyncio.TimerHandle | None = None
        #: requests whose head arrived on this connection, and whether one is handled now
        self._heads_seen = 0
        self._handling = False
        self._refused = False
        #: the body of the last request, left unread and being discarded (finish_response)
        self._discarding: StreamReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """At the cap, close the oldest idle connection or refuse; then serve, with a deadline."""
        if (
            len(self._gateway.connections) >= self._max_connections
            and not self._gateway.close_oldest_idle()
        ):
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        # Not registered with the server: it does not count, and nothing reads from it.
        self._refused = True
        CONNECTIONS_REFUSED.inc()
        assert isinstance(transport, asyncio.Transport)
        transport.write(_REFUSAL)
        if transport.can_write_eof():
            transport.write_eof()  # FIN after the answer; close once the client has read it
        self._gateway_loop.call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        """Parse ``data``; a head that starts arriving gets a deadline."""
        if self._refused:
            return
        if data:
            self._gateway.idle.pop(self, None)  # a next head is arriving: no longer idle
        super().data_received(data)
        if self._head_timer is None and not self._handling:
            self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        """Drop the deadline with the connection, and stop discarding a body: the client
        is gone."""
        self._gateway.idle.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)
        self._stop_discarding()

    def _stop_discarding(self) -> None:
        # aiohttp waits up to lingering_time for the rest of an unread body, even once the
        # connection is lost (nothing wakes that wait), and the server counts the connection
        # until then: a client sending gzip bombs on new connections filled the cap, and
        # other clients were refused 503. The end of the body ends the wait.
        body, self._discarding = self._discarding, None
        if body is not None and not body.is_eof():
            body.feed_eof()

    def request_started(self) -> None:
        """A request's head has arrived and its handler runs (:class:`GatewayServer`)."""
        self._heads_seen += 1
        self._handling = True
        self._gateway.idle.pop(self, None)

    def request_ended(self) -> None:
        """Its handler has returned; bytes that arrive now start the next head."""
        self._handling = False

    def _arm_head_timer(self) -> None:
        heads = self._heads_seen
        self._head_timer = self._gateway_loop.call_later(
            self._header_timeout_s, self._head_deadline, heads
        )

    def _head_deadline(self, heads: int) -> None:
        # A timer callback: whatever fails here, asyncio would only log. So close the
        # connection anyway, and count and log the failure where operators look.
        self._head_timer = None
        try:
            if self._heads_seen == heads and not self._handling:
                log.debug("closed a connection whose request head did not arrive in time")
                self.force_close()
        except Exception:
            HEAD_DEADLINE_ERRORS.inc()
            log.exception("the request-head deadline failed; closing the connection")
            if self.transport is not None:
                self.transport.close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """API.md's error shape for what aiohttp itself refuses or fails at."""
        self._heads_seen += 1  # a head aiohttp could not parse is answered: it arrived
        if isinstance(exc, CLIENT_FAULTS):
            # The exception's text quotes the request: log its type only.
            log.debug("refused a malformed request: %s", type(exc).__name__)
            error = low_level_error(exc)
        elif status == 504:
            error = errors.Unavailable("the request took too long")
            error.status = 504
        else:
            self.logger.error("error handling a request", exc_info=exc)
            error = errors.RelayError()
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already sent; closing the connection")
        response = web.json_response(error.body(), status=error.status, headers=error.headers)
        response.force_close()
        return response

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """Write the answer; a body left unread is then discarded, never parsed or inflated.

        aiohttp would read the rest of an unread body after the answer ("lingering"),
        inflating a compressed one: 1 MB of gzip makes 1 GB to inflate, on any route,
        without a credential. So the answer closes the connection, and what still
        arrives is received and dropped as raw bytes (``close()`` makes aiohttp ignore
        incoming data) until the client is done or DISCARD_LINGER_S have passed.
        """
        unread = not request.content.is_eof()
        if unread:
            resp.force_close()  # "Connection: close", unless the answer is already out
        result = await super().finish_response(request, resp, start_time)
        transport = self.transport
        if unread:
            self.close()
            self._discarding = request.content
            if transport is None:  # the connection was lost meanwhile
                self._stop_discarding()
            if transport is not None and not transport.is_closing() and transport.can_write_eof():
                transport.write_eof()  # the answer is complete: the client need not wait
        elif resp.keep_alive and transport is not None and not transport.is_closing():
            self._gateway.mark_idle(self)  # until its next head starts arriving
        return result

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A client's broken or slow body is not a server error, and its text is not logged."""
        exc = kw.get("exc_info")
        if isinstance(exc, CLIENT_FAULTS):
            log.debug("dropped a connection: %s", type(exc).__name__)
            return
        super().log_exception(*args, **kw)


class GatewayServer(web.Server):
    """aiohttp's low-level server, making :class:`GatewayRequestHandler` connections."""

    def __init__(
        self,
        handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
        *,
        settings: Settings,
        loop: asyncio.AbstractEventLoop,
        **kwargs: Any,
    ) -> None:
        server_kwargs = {k: kwargs.pop(k) for k in SERVER_OPTIONS if k in kwargs}
        super().__init__(self._handle_request, loop=loop, **server_kwargs)
        self.settings = settings
        self._app_handler = handler
        self._gateway_loop = loop
        #: what each connection's RequestHandler is given
        self._connection_kwargs = kwargs
        #: kept-alive connections waiting for their next request, the longest idle first
        self.idle: dict[GatewayRequestHandler, None] = {}

    def mark_idle(self, connection: GatewayRequestHandler) -> None:
        """``connection`` answered its request and waits for the next one."""
        self.idle.pop(connection, None)
        self.idle[connection] = None

    def close_oldest_idle(self) -> bool:
        """Close the connection idle the longest, to make room for a new one; False if none.

        The cap protects against many connections, not against a few idle ones: a
        kept-alive connection waiting for its next request gives its place to a new
        client (as aiohttp's keep-alive timeout would later), never one in a request.
        """
        if not self.idle:
            return False
        oldest = next(iter(self.idle))
        del self.idle[oldest]
        IDLE_CLOSED.inc()
        log.debug("closed the longest idle kept-alive connection to make room for a new one")
        oldest.force_close()
        return True

    def __call__(self) -> GatewayRequestHandler:
        """A new connection's protocol."""
        return GatewayRequestHandler(
            self, settings=self.settings, loop=self._gateway_loop, **self._connection_kwargs
        )

    async def _handle_request(self, request: BaseRequest) -> web.StreamResponse:
        connection = request.protocol
        if not isinstance(connection, GatewayRequestHandler):
            return await self._app_handler(request)
        connection.request_started()
        try:
            return await self._app_handler(request)
        finally:
            connection.request_ended()


#: Options of ``web.Server`` itself; the others are each connection's ``RequestHandler``'s.
SERVER_OPTIONS = ("request_factory", "handler_cancellation")
#: Options ``web.AppRunner`` keeps for itself.
RUNNER_OPTIONS = ("handle_signals", "shutdown_timeout")


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` for the gateway app: its server is a :class:`GatewayServer`."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("access_log", None)  # the ingest log line is the access log
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT_S)
        kwargs.setdefault("lingering_time", DISCARD_LINGER_S)
        # bodies are inflated by GatewayRequest.read, when a route reads one (bodies.py)
        kwargs["auto_decompress"] = False
        super().__init__(app, **kwargs)
        self._server_kwargs = {k: v for k, v in kwargs.items() if k not in RUNNER_OPTIONS}

    async def _make_server(self) -> web.Server:
        # aiohttp's one private hook the gateway needs (see check_aiohttp_internals)
        server = await super()._make_server()  # the app's startup runs here
        return GatewayServer(
            server.request_handler,
            settings=self.app[SETTINGS],
            loop=asyncio.get_running_loop(),
            **{
                **self._server_kwargs,
                # every request a GatewayRequest: aiohttp's factory with its request class
                "request_factory": functools.partial(self.app._make_request, _cls=GatewayRequest),
                "handler_cancellation": server.handler_cancellation,
            },
        )

    async def setup(self) -> None:
        """Start the app; fail loudly if aiohttp did not build the gateway's server."""
        await super().setup()
        if not isinstance(self.server, GatewayServer):
            await self.cleanup()
            raise RuntimeError(
                "aiohttp did not build its server through AppRunner._make_server: the gateway"
                " would run without its head deadline and connection cap (aiohttp "
                f"{aiohttp.__version__}; see relay/web/server.py)"
            )


def check_aiohttp_internals() -> None:
    """Fail if what the gateway uses of aiohttp is gone or has changed shape.

    Called at import, so `relay serve` stops at start with this message rather than
    serve without its limits. (The attributes a ``web.Server`` sets on itself,
    ``request_handler``, ``request_factory`` and ``handler_cancellation``, are read
    in ``GatewayRunner._make_server``: their absence fails the start as loudly.)
    """
    problems = []
    make = getattr(web.AppRunner, "_make_server", None)
    if (
        not inspect.iscoroutinefunction(make)
        or getattr(make, "__isabstractmethod__", False)
        or list(inspect.signature(make).parameters) != ["self"]
    ):
        problems.append("web.AppRunner._make_server(self) is gone or changed")
    for owner, names in (
        (web.RequestHandler, ("connection_made", "data_received", "connection_lost")),
        (web.RequestHandler, ("force_close", "handle_error", "log_exception", "transport")),
        (web.RequestHandler, ("close", "finish_response")),
        (web.Server, ("connections",)),
        (web.BaseRequest, ("protocol",)),
        (web.BaseRunner, ("server",)),
    ):
        for name in names:
            if not hasattr(owner, name) and name not in getattr(owner, "__slots__", ()):
                problems.append(f"{owner.__name__}.{name} is gone")
    if "_cls" not in inspect.signature(web.Application._make_request).parameters:
        problems.append("web.Application._make_request(…, _cls=…) is gone")
    options = inspect.signature(web.Server).parameters
    problems += [f"web.Server({name}=…) is gone" for name in SERVER_OPTIONS if name not in options]
    if problems:
        raise ImportError(
            f"relay's gateway does not support aiohttp {aiohttp.__version__}: "
            + "; ".join(problems)
        )


check_aiohttp_internals()


async def serve(
    app: web.Application,
    host: str,
    port: int,
    announce: Callable[[str], None] | None = None,
    *,
    reuse_port: bool = False,
) -> None:
    """Serve ``app`` on ``host:port`` until SIGINT or SIGTERM, then stop gracefully."""
    runner = GatewayRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
        loops.settle_heap()
        if announce is not None:
            announce(f"======== Running on http://{host}:{port} ========\n(Press CTRL+C to quit)")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(
    app: web.Application,
    host: str,
    port: int,
    announce: Callable[[str], None] | None = None,
    *,
    reuse_port: bool = False,
) -> None:
    """``web.run_app`` for the gateway: the same, with :class:`GatewayRunner` (on uvloop)."""
    loops.run(serve(app, host, port, announce, reuse_port=reuse_port))
