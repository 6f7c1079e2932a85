"""A real stack for delivery tests: `relay worker` subprocesses and loopback receivers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from relay.store.claims import Attempt, Claimed


@dataclass
class Received:
    """One request a receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float


Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


class Concurrency:
    """A receiver behaviour that holds each request and counts how many are open at once."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.now = 0
        self.most = 0

    async def __call__(self, request: web.Request, count: int) -> web.StreamResponse:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.hold_s)
        finally:
            self.now -= 1
        return web.Response(status=200)


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request and answers per path."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.behaviours: dict[str, Behaviour] = {}
        self.server: TestServer | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._last_connection = 0.0

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        # Remember every connection the server makes: its shutdown forgets one
        # accepted while it waits for in-flight handlers (a worker still sending
        # when the test ends), leaving an open socket behind.
        assert self.server.runner is not None and self.server.runner.server is not None
        low_level = self.server.runner.server
        made = low_level.connection_made

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            self._transports.add(transport)
            self._last_connection = time.monotonic()
            made(handler, transport)

        low_level.connection_made = connection_made  # type: ignore[method-assign]
        return self

    async def close(self) -> None:
        # First let connections already knocking be accepted and made: CPython 3.11
        # leaks the socket of a connection accepted just as its server closes (the
        # transport fails in Server._attach and never closes it), found later by the
        # garbage collector as an "unclosed transport" in some other test. A peer
        # stopped while the loop was not running leaves such connections in the
        # listen backlog.
        started = time.monotonic()
        while time.monotonic() - started < 2:
            await asyncio.sleep(0.05)
            if time.monotonic() - self._last_connection >= 0.1:
                break
        if self.server is not None:
            await self.server.close()
        for _ in range(3):  # let connections accepted during shutdown be made
            await asyncio.sleep(0)
        for transport in self._transports:
            if not transport.is_closing():
                transport.close()
        self._transports.clear()
        await asyncio.sleep(0)  # a closed transport releases its socket a turn later

    def url(self, path: str) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}{path}"

    def on(self, path: str, behaviour: Behaviour) -> str:
        """Answer ``path`` with ``behaviour`` (given the request and how many came before)."""
        self.behaviours[path] = behaviour
        return self.url(path)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        count = len(self.at(request.path))
        self.received.append(Received(request.path, dict(request.headers), body, time.monotonic()))
        behaviour = self.behaviours.get(request.path)
        if behaviour is None:
            return web.Response(status=200, text="ok")
        return await behaviour(request, count)


def status(code: int, headers: dict[str, str] | None = None, text: str = "") -> Behaviour:
    """Always answer ``code``."""

    async def answer(request: web.Request, count: int) -> web.StreamResponse:
        return web.Response(status=code, headers=headers, text=text)

    return answer


def fail_then_succeed(failures: int, code: int = 500) -> Behaviour:
    """Answer ``code`` ``failures`` times, then 200."""

    async def answer(request: web.Request, count: int) -> web.StreamResponse:
        if count < failures:
            return web.Response(status=code, text=f"failure {count + 1}")
        return web.Response(status=200, text="finally")

    return answer


def hang(seconds: float) -> Behaviour:
    """Answer only after ``seconds``."""

    async def answer(request: web.Request, count: int) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=200)

    return answer


@dataclass
class WorkerProcess:
    """`relay worker` as a subprocess in its own process group."""

    env: dict[str, str]
    log_path: Path
    processes: int = 1
    threads: int = 8
    #: a command the worker's runs under (tests/faults/slow_dns.py: its own resolv.conf)
    prefix: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = self._spawn(log)
        return self

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "relay.cli",
                "worker",
                "--processes",
                str(self.processes),
                "--threads",
                str(self.threads),
            ],
            env={"PATH": os.environ["PATH"], **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, timeout: float = 40) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        # Like Kubernetes or Docker: SIGTERM to the master only; it stops its children.
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=10)

    def exit_code(self, timeout: float, what: str) -> int:
        """The exit code of the process, once it exits within ``timeout``; else it is
        stopped and the test fails with the end of its log (``what`` names it)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{what} kept running:\n{self.log()[-3000:]}")

    def group_alive(self) -> bool:
        """True while any process of the group runs (zombies awaiting a reaper do not count)."""
        assert self.proc is not None
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            state, pgrp = fields[0], int(fields[2])
            if pgrp == self.proc.pid and state != "Z":
                return True
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 30, every: float = 0.1
) -> Any:
    """Poll ``check`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


async def fetch(database_url: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


class TcpProxy:
    """A loopback TCP proxy that a test can cut (closing every connection) and restore."""

    def __init__(self, target_host: str, target_port: int, *, unix_path: str = "") -> None:
        self.target = (target_host, target_port)
        self.unix_path = unix_path  # forward to this Unix socket instead (embedded Postgres)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.unix_path:
                up_reader, up_writer = await asyncio.open_unix_connection(self.unix_path)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    @classmethod
    async def in_front_of(cls, url: str, default_port: int) -> tuple[TcpProxy, str]:
        """A started proxy to the server of ``url`` and ``url`` rewritten to go through it.

        A Postgres DSN naming a socket directory (``postgresql://u@/db?host=/dir``, as the
        embedded Postgres gives) is forwarded to that Unix socket.
        """
        parsed = URL(url)
        socket_dir = parsed.query.get("host", "")
        if not parsed.host and socket_dir.startswith("/"):
            port = parsed.port or default_port
            proxy = cls("", port, unix_path=f"{socket_dir}/.s.PGSQL.{port}")
        elif parsed.host:
            proxy = cls(parsed.host, parsed.port or default_port)
        else:
            raise ValueError(f"no server to proxy in {url!r}")
        await proxy.start()
        query = {k: v for k, v in parsed.query.items() if k != "host"}
        via = parsed.with_host("127.0.0.1").with_port(proxy.port).with_query(query)
        return proxy, str(via)


def broker_drained(redis_url: str) -> bool:
    """True when no Dramatiq message is queued, delayed or in a worker's hands.

    Dramatiq keeps each message in ``<queue>.msgs`` from enqueue to ack (a worker
    holding a delayed message included; dead-lettered ``.XQ`` ones are never run),
    and a worker enqueues a retry before it acks the attempt that scheduled it. So
    once drained, every send the relay had decided on has happened: a "nothing more
    arrived" check made then cannot pass just by looking too early.
    """
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return not any(
            client.hlen(key)
            for key in client.scan_iter("dramatiq:*.msgs")
            if not key.endswith(b".XQ.msgs")
        )
    finally:
        client.close()


async def drained(redis_url: str, timeout: float = 30) -> None:
    """Wait (with a deadline) until the broker has no message left to run."""
    await eventually(lambda: asyncio.to_thread(broker_drained, redis_url), timeout=timeout)


class Workers:
    """Start `relay worker` with settings of the test's own; stopped at the end."""

    def __init__(self, database_url: str, redis_url: str, tmp_path: Path) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.tmp_path = tmp_path
        self.started: list[WorkerProcess] = []

    def start(self, processes: int = 1, **settings: str) -> WorkerProcess:
        from tests.conftest import stack_env

        env = stack_env(self.database_url, self.redis_url, **settings)
        log = self.tmp_path / f"worker-{len(self.started)}.log"
        process = WorkerProcess(env, log, processes=processes, threads=4).start()
        self.started.append(process)
        return process


def ended_attempt(claimed: Claimed, code: int) -> Attempt:
    """An attempt of ``claimed`` answered ``code`` (2xx succeeded, else retried in 5 s), as
    the engine would record it."""
    ok = 200 <= code < 300
    return Attempt(
        delivery=claimed,
        started_at=datetime.now(UTC),
        duration_ms=5,
        status_code=code,
        error=None if ok else f"HTTP {code}",
        response_body="",
        status="succeeded" if ok else "retrying",
        delay_s=None if ok else 5.0,
        carried_for_s=None,
        disable_reason=None,
    )
