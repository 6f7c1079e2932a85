"""Services a fault test owns, so it can stop and start them: Postgres, Redis, gateways."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.cli.embedded import _free_port, embedded_redis
from tests.stack import WorkerProcess


class RestartableRedis:
    """A Redis server of the test's own, on a fixed port, keeping its data across restarts."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir, self.port = data_dir, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._running: contextlib.ExitStack | None = None

    def start(self) -> RestartableRedis:
        self._running = contextlib.ExitStack()
        self._running.enter_context(embedded_redis(self.data_dir, port=self.port))
        return self

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None


class RestartablePostgres:
    """A Postgres server of the test's own (pgserver's binaries), on a Unix socket."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.url = ""
        self._server: Any = None

    def start(self) -> RestartablePostgres:
        import pgserver

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # XDG_RUNTIME_DIR unset in containers
            self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        self.url = str(self._server.get_uri())
        return self

    def stop(self) -> None:
        """Stop the server and return only once its postmaster is gone.

        pgserver's ``pg_ctl -w stop`` can fail while clients still hammer the server;
        a start that then finds the old postmaster shutting down fails. So wait for
        the process, and if it lingers, ask for an immediate shutdown (SIGQUIT).
        """
        if self._server is None:
            return
        pid = self._postmaster_pid()
        with contextlib.suppress(Exception):
            self._server.cleanup()
        self._server = None
        if pid is None:
            return
        deadline = time.monotonic() + 30
        signalled = False
        while _alive(pid):
            if not signalled and time.monotonic() > deadline - 20:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)
                signalled = True
            if time.monotonic() > deadline:
                raise RuntimeError(f"postmaster {pid} did not stop")
            time.sleep(0.05)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours counts as gone
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


@dataclass
class GatewayProcess(WorkerProcess):
    """`relay serve` as a subprocess on its own port."""

    port: int = 0

    def __post_init__(self) -> None:
        self.port = self.port or _free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relay.cli",
                "serve",
                "--port",
                str(self.port),
                "--processes",
                str(self.processes),
            ],
            env={"PATH": os.environ["PATH"], **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> GatewayProcess:
        super().start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not start:\n{self.log()[-3000:]}")


@contextlib.contextmanager
def replicas(
    env: dict[str, str], tmp_path: Path, *, processes: int = 1, count: int = 2
) -> Iterator[list[str]]:
    """``count`` `relay serve` replicas of ``processes`` processes each, on one database;
    yields their base URLs, and prints the end of each one's log when stopped."""
    started = [
        GatewayProcess(env, tmp_path / f"replica-{n}.log", processes=processes).start()
        for n in range(count)
    ]
    try:
        yield [g.url for g in started]
    finally:
        for gateway in started:
            gateway.stop()
            print(gateway.log()[-5000:])
