"""Settings, read once from the environment and passed down from there.

Nothing else in the code base reads ``os.environ``: every process builds one
:class:`Settings` at start (``Settings.from_env``) and hands it to the app,
the workers and the CLI. A bad or missing value stops the process with one
line naming the variable.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_RETRY_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)

#: What each command cannot start without; everything else has a default.
REQUIRED_FOR_SERVE = ("DATABASE_URL", "REDIS_URL", "RELAY_ADMIN_TOKEN", "RELAY_SECRET_KEY")
REQUIRED_FOR_WORKER = ("DATABASE_URL", "REDIS_URL", "RELAY_SECRET_KEY")
REQUIRED_FOR_MIGRATE = ("DATABASE_URL",)


#: The largest budget per second a tenant may be given (an int8 column's range is wider).
MAX_PER_S = 1 << 40


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Everything the relay reads from its environment, validated."""

    database_url: str = ""
    redis_url: str = ""
    broker_url: str = ""
    admin_token: str = field(default="", repr=False)
    secret_key: bytes = field(default=b"", repr=False)
    public_url: str = "http://127.0.0.1:8080"
    allow_private_targets: bool = False
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    delivery_timeout_s: float = 15.0
    #: One name lookup for a delivery waits at most this (and at most half the
    #: delivery timeout); then the attempt fails as a connection error.
    dns_timeout_s: float = 2.0
    #: A worker process tries this long at boot to reach Postgres, then exits.
    worker_boot_wait_s: float = 30.0
    max_body_bytes: int = 1_048_576
    secret_overlap_s: float = 86_400.0
    disable_after_s: float = 5 * 86_400.0
    #: A target whose attempts failed for at least this long, then succeeded, is
    #: "recovered" (an operational event).
    recovered_after_s: float = 300.0
    retention_days: int = 30
    #: How long an enqueued-but-unclaimed delivery is left to the broker
    #: before the sweeper enqueues it again (the message may have been lost).
    requeue_after_s: float = 30.0
    #: How long the gateway trusts its cache of sources and targets.
    cache_ttl_s: float = 1.0
    log_level: str = "INFO"
    #: Where `relay worker` serves its processes' aggregated metrics (port 0: off).
    worker_metrics_port: int = 9191
    worker_metrics_host: str = "127.0.0.1"
    #: A connection must deliver a complete request head this soon after it opens
    #: (or after its previous answer), else it is closed.
    header_timeout_s: float = 10.0
    #: A request body must have arrived this soon after its head, else 408.
    body_timeout_s: float = 30.0
    #: Open connections one gateway process accepts; more are answered 503 and closed.
    max_connections: int = 1000
    #: Ingest requests one gateway process holds waiting for their commit; more: 503.
    ingest_max_waiting: int = 1000
    #: The gateway's longest wait for a pooled Postgres connection, and for one statement
    #: (COMMIT included): a stalled Postgres is answered 503, not waited for.
    db_acquire_timeout_s: float = 5.0
    db_statement_timeout_s: float = 5.0
    #: Quotas: live targets and sources a tenant may have, and deliveries one
    #: ingest request may create (events of the body times the targets each matches).
    max_targets_per_tenant: int = 100
    max_sources_per_tenant: int = 100
    max_deliveries_per_request: int = 10_000
    #: A tenant's budget on the shared relay, for tenants without their own
    #: (PATCH /v1/tenants/{id}): body bytes ingested, and deliveries created by
    #: ingest, per second, shared by every gateway process. None: no budget.
    tenant_ingest_bytes_per_s: int | None = None
    tenant_deliveries_per_s: int | None = None
    #: and requests with its API keys per second
    tenant_api_requests_per_s: int | None = None
    #: Attempts one worker process keeps in flight at once, shared fairly by tenants.
    worker_concurrency: int = 256
    #: A target's circuit breaker opens after this many timeouts, connection
    #: errors or 5xx in a row, for breaker_open_s (doubling at each reopening,
    #: up to breaker_max_open_s), then lets one probe through.
    breaker_threshold: int = 5
    breaker_open_s: float = 30.0
    breaker_max_open_s: float = 600.0
    #: A console session ends after this long without a request (sign in again).
    console_idle_s: float = 1800.0
    #: Failed credentials from one address: the limit-th within the window is
    #: answered 429 (and everything from it until the window ends); each failure
    #: before waits delay_s, doubling with each failure (up to 16 times delay_s).
    auth_failure_limit: int = 10
    auth_failure_window_s: float = 60.0
    auth_failure_delay_s: float = 0.2

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, required: Collection[str] = ()) -> Settings:
        """Build settings from ``env``; raise ConfigError naming the first bad variable."""

        def get(name: str) -> str | None:
            value = env.get(name)
            if value is None or value.strip() == "":
                if name in required:
                    raise ConfigError(f"{name} is required but not set")
                return None
            return value.strip()

        values: dict[str, Any] = {}
        if (v := get("DATABASE_URL")) is not None:
            values["database_url"] = _dsn(v, "DATABASE_URL", ("postgres", "postgresql"))
        if (v := get("REDIS_URL")) is not None:
            values["redis_url"] = _dsn(v, "REDIS_URL", ("redis", "rediss", "unix"))
        broker = get("BROKER_URL")
        if broker is not None:
            values["broker_url"] = _dsn(broker, "BROKER_URL", ("redis", "rediss", "amqp", "amqps"))
        else:
            values["broker_url"] = values.get("redis_url", "")
        if (v := get("RELAY_ADMIN_TOKEN")) is not None:
            if len(v) < 16:
                raise ConfigError("RELAY_ADMIN_TOKEN must be at least 16 characters")
            values["admin_token"] = v
        if (v := get("RELAY_SECRET_KEY")) is not None:
            values["secret_key"] = parse_secret_key(v)
        if (v := get("RELAY_PUBLIC_URL")) is not None:
            values["public_url"] = _dsn(v, "RELAY_PUBLIC_URL", ("http", "https")).rstrip("/")
        if (v := get("RELAY_ALLOW_PRIVATE_TARGETS")) is not None:
            if v not in ("0", "1", "true", "false"):
                raise ConfigError("RELAY_ALLOW_PRIVATE_TARGETS must be 0 or 1")
            values["allow_private_targets"] = v in ("1", "true")
        if (v := get("RELAY_RETRY_SCHEDULE")) is not None:
            values["retry_schedule"] = parse_retry_schedule(v)
        if (v := get("RELAY_DELIVERY_TIMEOUT_S")) is not None:
            values["delivery_timeout_s"] = _positive(v, "RELAY_DELIVERY_TIMEOUT_S")
        if (v := get("RELAY_DNS_TIMEOUT_S")) is not None:
            values["dns_timeout_s"] = _positive(v, "RELAY_DNS_TIMEOUT_S")
        if (v := get("RELAY_WORKER_BOOT_WAIT_S")) is not None:
            values["worker_boot_wait_s"] = _positive(v, "RELAY_WORKER_BOOT_WAIT_S")
        if (v := get("RELAY_MAX_BODY_BYTES")) is not None:
            values["max_body_bytes"] = int(_positive(v, "RELAY_MAX_BODY_BYTES", integer=True))
        if (v := get("RELAY_SECRET_OVERLAP_S")) is not None:
            values["secret_overlap_s"] = _positive(v, "RELAY_SECRET_OVERLAP_S", allow_zero=True)
        if (v := get("RELAY_DISABLE_AFTER_S")) is not None:
            values["disable_after_s"] = _positive(v, "RELAY_DISABLE_AFTER_S")
        if (v := get("RELAY_RECOVERED_AFTER_S")) is not None:
            values["recovered_after_s"] = _positive(v, "RELAY_RECOVERED_AFTER_S", allow_zero=True)
        if (v := get("RELAY_RETENTION_DAYS")) is not None:
            values["retention_days"] = int(_positive(v, "RELAY_RETENTION_DAYS", integer=True))
        if (v := get("RELAY_REQUEUE_AFTER_S")) is not None:
            values["requeue_after_s"] = _positive(v, "RELAY_REQUEUE_AFTER_S")
        if (v := get("RELAY_CACHE_TTL_S")) is not None:
            values["cache_ttl_s"] = _positive(v, "RELAY_CACHE_TTL_S", allow_zero=True)
        if (v := get("RELAY_WORKER_METRICS_PORT")) is not None:
            port = int(_positive(v, "RELAY_WORKER_METRICS_PORT", integer=True, allow_zero=True))
            if port > 65535:
                raise ConfigError("RELAY_WORKER_METRICS_PORT must be a port number")
            values["worker_metrics_port"] = port
        if (v := get("RELAY_WORKER_METRICS_HOST")) is not None:
            values["worker_metrics_host"] = _host(v, "RELAY_WORKER_METRICS_HOST")
        if (v := get("RELAY_HEADER_TIMEOUT_S")) is not None:
            values["header_timeout_s"] = _positive(v, "RELAY_HEADER_TIMEOUT_S")
        if (v := get("RELAY_BODY_TIMEOUT_S")) is not None:
            values["body_timeout_s"] = _positive(v, "RELAY_BODY_TIMEOUT_S")
        if (v := get("RELAY_MAX_CONNECTIONS")) is not None:
            values["max_connections"] = int(_positive(v, "RELAY_MAX_CONNECTIONS", integer=True))
        if (v := get("RELAY_INGEST_MAX_WAITING")) is not None:
            values["ingest_max_waiting"] = int(
                _positive(v, "RELAY_INGEST_MAX_WAITING", integer=True)
            )
        if (v := get("RELAY_DB_ACQUIRE_TIMEOUT_S")) is not None:
            values["db_acquire_timeout_s"] = _positive(v, "RELAY_DB_ACQUIRE_TIMEOUT_S")
        if (v := get("RELAY_DB_STATEMENT_TIMEOUT_S")) is not None:
            values["db_statement_timeout_s"] = _positive(v, "RELAY_DB_STATEMENT_TIMEOUT_S")
        for name, key in (
            ("RELAY_MAX_TARGETS_PER_TENANT", "max_targets_per_tenant"),
            ("RELAY_MAX_SOURCES_PER_TENANT", "max_sources_per_tenant"),
            ("RELAY_MAX_DELIVERIES_PER_REQUEST", "max_deliveries_per_request"),
        ):
            if (v := get(name)) is not None:
                values[key] = int(_positive(v, name, integer=True))
        for name, key in (
            ("RELAY_TENANT_INGEST_BYTES_PER_S", "tenant_ingest_bytes_per_s"),
            ("RELAY_TENANT_DELIVERIES_PER_S", "tenant_deliveries_per_s"),
            ("RELAY_TENANT_API_REQUESTS_PER_S", "tenant_api_requests_per_s"),
        ):
            if (v := get(name)) is not None:
                per_s = int(_positive(v, name, integer=True, allow_zero=True))
                if per_s > MAX_PER_S:
                    raise ConfigError(f"{name} must be at most {MAX_PER_S}")
                values[key] = per_s or None  # 0: none
        if (v := get("RELAY_WORKER_CONCURRENCY")) is not None:
            values["worker_concurrency"] = int(
                _positive(v, "RELAY_WORKER_CONCURRENCY", integer=True)
            )
        if (v := get("RELAY_BREAKER_THRESHOLD")) is not None:
            values["breaker_threshold"] = int(_positive(v, "RELAY_BREAKER_THRESHOLD", integer=True))
        if (v := get("RELAY_BREAKER_OPEN_S")) is not None:
            values["breaker_open_s"] = _positive(v, "RELAY_BREAKER_OPEN_S")
        if (v := get("RELAY_BREAKER_MAX_OPEN_S")) is not None:
            values["breaker_max_open_s"] = _positive(v, "RELAY_BREAKER_MAX_OPEN_S")
        if (v := get("RELAY_CONSOLE_IDLE_S")) is not None:
            values["console_idle_s"] = _positive(v, "RELAY_CONSOLE_IDLE_S")
        if (v := get("RELAY_AUTH_FAILURE_LIMIT")) is not None:
            values["auth_failure_limit"] = int(
                _positive(v, "RELAY_AUTH_FAILURE_LIMIT", integer=True)
            )
        if (v := get("RELAY_AUTH_FAILURE_WINDOW_S")) is not None:
            values["auth_failure_window_s"] = _positive(v, "RELAY_AUTH_FAILURE_WINDOW_S")
        if (v := get("RELAY_AUTH_FAILURE_DELAY_S")) is not None:
            values["auth_failure_delay_s"] = _positive(
                v, "RELAY_AUTH_FAILURE_DELAY_S", allow_zero=True
            )
        if (v := get("RELAY_LOG_LEVEL")) is not None:
            if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                raise ConfigError("RELAY_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
            values["log_level"] = v.upper()
        return cls(**values)

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (tests and `relay dev`)."""
        return replace(self, **changes)


def parse_secret_key(value: str) -> bytes:
    """Decode RELAY_SECRET_KEY: base64 of exactly 32 bytes."""
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("RELAY_SECRET_KEY must be base64 (of 32 random bytes)") from None
    if len(key) != 32:
        raise ConfigError(f"RELAY_SECRET_KEY must decode to 32 bytes, not {len(key)}")
    return key


def parse_retry_schedule(value: str) -> tuple[float, ...]:
    """Parse RELAY_RETRY_SCHEDULE: comma-separated non-negative seconds, at least one."""
    parts = [p.strip() for p in value.split(",")]
    try:
        seconds = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(
            "RELAY_RETRY_SCHEDULE must be comma-separated seconds, e.g. 0,5,300"
        ) from None
    if not seconds or any(not math.isfinite(s) or s < 0 for s in seconds):
        raise ConfigError("RELAY_RETRY_SCHEDULE entries must be finite and >= 0")
    return seconds


def _dsn(value: str, name: str, schemes: tuple[str, ...]) -> str:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in schemes or not rest:
        raise ConfigError(
            f"{name} must be a URL starting with {' or '.join(s + '://' for s in schemes)}"
        )
    return value


def _host(value: str, name: str) -> str:
    """An IP address to listen on (``0.0.0.0`` or ``::`` for every interface)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{name} must be an IP address, e.g. 127.0.0.1 or 0.0.0.0") from None


def _positive(value: str, name: str, *, integer: bool = False, allow_zero: bool = False) -> float:
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind}, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}")
    return number
