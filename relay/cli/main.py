"""The ``relay`` command: serve, worker, migrate, dev, tenants, dlq."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from relay.core.config import (
    REQUIRED_FOR_MIGRATE,
    REQUIRED_FOR_SERVE,
    REQUIRED_FOR_WORKER,
    ConfigError,
    Settings,
)


def load_settings(required: Collection[str]) -> Settings:
    """Settings from the environment, or exit with one line naming the bad variable."""
    try:
        return Settings.from_env(os.environ, required=required)
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def tool_settings() -> Iterator[Settings]:
    """Settings for the operators' tools (``relay dlq``, ``relay tenants``).

    With DATABASE_URL unset they use ``relay dev``'s embedded database under
    RELAY_DATA_DIR (default ./.relay) when there is one, and say so on stderr.
    """
    if os.environ.get("DATABASE_URL"):
        yield load_settings(REQUIRED_FOR_MIGRATE)
        return
    from relay.cli.embedded import EmbeddedUnavailable, dev_data_dir, dev_database

    data_dir = dev_data_dir(os.environ)
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(dev_database(data_dir))
        except FileNotFoundError:
            print(
                f"relay: configuration error: DATABASE_URL is not set, and relay dev has no "
                f"database in {data_dir} (RELAY_DATA_DIR): set DATABASE_URL, "
                "or run relay dev first",
                file=sys.stderr,
            )
            raise SystemExit(2) from None
        except EmbeddedUnavailable as exc:
            print(f"relay: configuration error: DATABASE_URL is not set ({exc})", file=sys.stderr)
            raise SystemExit(2) from None
        print(
            f"relay: DATABASE_URL is not set; using relay dev's database in {data_dir}",
            file=sys.stderr,
        )
        yield Settings.from_env({**os.environ, "DATABASE_URL": url}, required=())


async def _migrate(settings: Settings) -> list[str]:
    from relay.core.crypto import SecretBox
    from relay.store.db import connect
    from relay.store.migrations import migrate

    box = SecretBox(settings.secret_key) if settings.secret_key else None
    conn = await connect(settings.database_url)
    try:
        applied: list[str] = await migrate(conn, secrets=box)
        return applied
    finally:
        await conn.close()


async def _check_schema(settings: Settings) -> None:
    """SchemaBehind if the database lacks a migration; nothing if it cannot be reached
    now (the worker's processes wait for it as they would have)."""
    from relay.store.db import POSTGRES_DOWN, connect
    from relay.store.migrations import check_schema

    try:
        conn = await asyncio.wait_for(connect(settings.database_url), timeout=10)
    except (*POSTGRES_DOWN, TimeoutError):  # (OSError among them)
        return
    try:
        await check_schema(conn)
    finally:
        await conn.close()


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending migrations."""
    settings = load_settings(REQUIRED_FOR_MIGRATE)
    try:
        applied = asyncio.run(_migrate(settings))
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        return 2
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gateway."""
    settings = load_settings(REQUIRED_FOR_SERVE)  # fail with one line here, not in N processes
    if args.processes < 0:
        print("relay: --processes must be 0 (one per core) or more", file=sys.stderr)
        return 2
    processes = args.processes or os.cpu_count() or 1
    if processes > 1:
        return _serve_many(args, processes)  # the supervisor imports no more than it needs
    from relay.core.logs import setup_logging
    from relay.web.app import create_app
    from relay.web.server import run

    setup_logging(settings.log_level)
    try:
        run(
            create_app(settings),
            args.host,
            args.port,
            None if args.reuse_port else lambda text: print(text, file=sys.stderr),
            reuse_port=args.reuse_port,
        )
    except ConfigError as exc:  # found at start: the schema behind the code, say
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve_many(args: argparse.Namespace, processes: int) -> int:
    """``processes`` gateways on one port (SO_REUSEPORT: the kernel spreads connections)."""
    from relay.cli.supervise import supervise

    child = [sys.executable, "-m", "relay.cli", "serve", "--host", args.host]
    child += ["--port", str(args.port), "--processes", "1", "--reuse-port"]
    print(
        f"======== Running on http://{args.host}:{args.port} ({processes} processes) ========\n"
        "(Press CTRL+C to quit)",
        file=sys.stderr,
    )
    return supervise(child, processes, lambda text: print(text, file=sys.stderr))


def worker_argv(processes: int, threads: int) -> list[str]:
    """The Dramatiq command line of ``relay worker``: actors plus the sweeper as a fork."""
    return [
        sys.executable,
        "-m",
        "dramatiq",
        "workers.broker:setup",
        "workers.deliver",
        "workers.replay",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--fork-function",
        "workers.sweeper:main",
        "--skip-logging",
        # on SIGTERM, in-flight attempts get this long; then their leases lapse
        "--worker-shutdown-timeout",
        "30000",
    ]


def with_metrics_dir(env: dict[str, str]) -> dict[str, str]:
    """``env`` with a fresh PROMETHEUS_MULTIPROC_DIR, where worker processes share metrics."""
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="relay-metrics-")
    return env


def cmd_worker(args: argparse.Namespace) -> int:
    """Run delivery workers and the sweeper (Dramatiq handles processes and SIGTERM)."""
    settings = load_settings(REQUIRED_FOR_WORKER)  # one line here, not in every process
    try:
        asyncio.run(_check_schema(settings))
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        return 2
    argv = worker_argv(args.processes, args.threads)
    os.execve(sys.executable, argv, with_metrics_dir(dict(os.environ)))
    return 0  # pragma: no cover - execv does not return


def _dev_secrets(data_dir: Path) -> dict[str, str]:
    """The dev admin token and secret key, generated once and kept in ``data_dir``."""
    path = data_dir / "dev-secrets.json"
    if path.exists():
        stored: dict[str, str] = json.loads(path.read_text())
        return stored
    generated = {
        "RELAY_ADMIN_TOKEN": "dev_" + secrets.token_urlsafe(24),
        "RELAY_SECRET_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
    }
    path.touch(mode=0o600)
    path.write_text(json.dumps(generated, indent=2))
    return generated


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cmd_dev(args: argparse.Namespace) -> int:
    """Everything in one command: services (embedded if unset), migrations, gateway, worker."""
    from relay.core.logs import setup_logging
    from relay.web.app import create_app
    from relay.web.server import run

    env = dict(os.environ)
    from relay.cli.embedded import dev_data_dir

    data_dir = dev_data_dir(env)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, value in _dev_secrets(data_dir).items():
        env.setdefault(name, value)
    env.setdefault("RELAY_ALLOW_PRIVATE_TARGETS", "1")  # a laptop's receivers are local
    env.setdefault("RELAY_PUBLIC_URL", f"http://{args.host}:{args.port}")
    with contextlib.ExitStack() as stack:
        if not env.get("DATABASE_URL") or not env.get("REDIS_URL"):
            from relay.cli.embedded import EmbeddedUnavailable, embedded_services

            try:
                database_url, redis_url = stack.enter_context(embedded_services(data_dir))
            except EmbeddedUnavailable as exc:
                print(f"relay: {exc}", file=sys.stderr)
                return 2
            env.setdefault("DATABASE_URL", database_url)
            env.setdefault("REDIS_URL", redis_url)
        try:
            settings = Settings.from_env(env, required=REQUIRED_FOR_SERVE)
        except ConfigError as exc:
            print(f"relay: configuration error: {exc}", file=sys.stderr)
            return 2
        setup_logging(settings.log_level)
        applied = asyncio.run(_migrate(settings))
        worker = subprocess.Popen(
            worker_argv(1, 8), env=with_metrics_dir(dict(env)), start_new_session=True
        )
        stack.callback(_stop, worker)
        base = settings.public_url
        print(
            f"""
Relay is running at {base}  (data in {data_dir}; migrations applied: {len(applied)})

  Console: {base}/console/  (sign in with the admin token below, or a tenant's API key)

  export RELAY_ADMIN_TOKEN={settings.admin_token}
  curl -s -X POST {base}/v1/tenants -H "Authorization: Bearer $RELAY_ADMIN_TOKEN" \\
       -H 'content-type: application/json' -d '{{"name": "Acme"}}'

Ctrl-C stops everything.
""",
            file=sys.stderr,
            flush=True,
        )
        run(create_app(settings), args.host, args.port)
    return 0


async def _create_tenant(settings: Settings, name: str) -> tuple[str, str]:
    from relay.core.crypto import hash_api_key, new_api_key, new_id
    from relay.store import tenants
    from relay.store.db import connect

    conn = await connect(settings.database_url)
    try:
        api_key = new_api_key()
        tenant, _ = await tenants.create_tenant(
            conn, new_id("ten"), name, new_id("key"), hash_api_key(api_key)
        )
        return tenant.id, api_key
    finally:
        await conn.close()


def cmd_tenants_create(args: argparse.Namespace) -> int:
    """Create a tenant and print its id and API key."""
    name = args.name.strip()
    if not 1 <= len(name) <= 200:
        print("relay: a tenant name is 1 to 200 characters", file=sys.stderr)
        return 2
    with tool_settings() as settings:
        tenant_id, api_key = asyncio.run(_create_tenant(settings, name))
    if args.json:
        print(json.dumps({"id": tenant_id, "api_key": api_key}))
    else:
        print(f"tenant_id: {tenant_id}\napi_key:   {api_key}")
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    """Operators' dead-letter tools."""
    from relay.cli import dlq

    with tool_settings() as settings:
        return asyncio.run(dlq.run(settings, args))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="relay", description="Multi-tenant webhook relay.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="apply pending database migrations")
    migrate.set_defaults(func=cmd_migrate)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--processes",
        type=int,
        default=0,
        help="gateway processes sharing the port (default: the number of cores; "
        "1 in a container that is scaled by replicas)",
    )
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help="run delivery workers and the sweeper")
    worker.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    worker.add_argument(
        "--threads",
        type=int,
        default=4,
        help="Dramatiq threads per process, for wake-ups and replays (default 4); "
        "attempts in flight per process are RELAY_WORKER_CONCURRENCY",
    )
    worker.set_defaults(func=cmd_worker)

    dev = commands.add_parser("dev", help="run everything in one process tree, for trying it")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8080)
    dev.set_defaults(func=cmd_dev)

    tenants = commands.add_parser("tenants", help="manage tenants")
    tenant_commands = tenants.add_subparsers(dest="tenants_command", required=True)
    create = tenant_commands.add_parser("create", help="create a tenant, print its API key")
    create.add_argument("name")
    create.add_argument("--json", action="store_true", help="machine-readable output")
    create.set_defaults(func=cmd_tenants_create)

    from relay.cli.dlq_args import add_arguments

    dead_letters = commands.add_parser("dlq", help="list, show, replay and purge dead letters")
    add_arguments(dead_letters)
    dead_letters.set_defaults(func=cmd_dlq)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``relay`` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
