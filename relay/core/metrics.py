"""Prometheus metrics of the gateway and the workers.

The gateway is one process and serves its registry at ``/metrics``. Worker
processes (Dramatiq forks) write to ``PROMETHEUS_MULTIPROC_DIR``, which
``relay worker`` creates fresh; the sweeper process serves the aggregate on
``RELAY_WORKER_METRICS_HOST``:``RELAY_WORKER_METRICS_PORT`` (default
127.0.0.1:9191).

The gateway's ``/metrics`` is public (API.md): no label names a tenant's
resources, so no tenant, source or target id is ever a label value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

EVENTS_INGESTED = Counter(
    "relay_events_ingested_total",
    "Events accepted (outcome=accepted) or requests refused at ingest (outcome=status code).",
    ["outcome"],
)
INGEST_LATENCY = Histogram(
    "relay_ingest_duration_seconds",
    "Time to answer an ingest request.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
INGEST_REROUTED = Counter(
    "relay_ingest_rerouted_total",
    "Ingest requests routed again because their tenant's sources or targets changed "
    "(on another process or replica) since this gateway read them.",
)
TENANT_BUDGET_REFUSED = Counter(
    "relay_tenant_budget_refused_total",
    "Requests answered 429 because their tenant's budget (ingest bytes, deliveries "
    "created or API requests per second) had no room; no tenant label, to keep it small.",
    ["budget"],
)
INGEST_WAITING = Gauge(
    "relay_ingest_waiting",
    "Ingest requests waiting for their commit (RELAY_INGEST_MAX_WAITING at most).",
)
DELIVERIES = Counter(
    "relay_deliveries_total",
    "Delivery attempts by outcome (succeeded, retrying, dead) or why none was made.",
    ["outcome"],
)
ATTEMPT_LATENCY = Histogram(
    "relay_attempt_duration_seconds",
    "Duration of one delivery attempt, by answer class (2xx … 5xx, error).",
    ["status_class"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CONNECTIONS_REFUSED = Counter(
    "relay_connections_refused_total",
    "Connections the gateway refused because RELAY_MAX_CONNECTIONS were open.",
)
AUTH_FAILURES = Counter(
    "relay_auth_failures_total",
    "Failed credentials: console sign-ins, admin tokens, API keys, source credentials.",
    ["kind"],
)
AUTH_THROTTLED = Counter(
    "relay_auth_throttled_total",
    "Requests answered 429 because their address failed too many credentials.",
    ["kind"],
)
IDLE_CLOSED = Counter(
    "relay_idle_connections_closed_total",
    "Idle kept-alive connections closed to make room for a new one at RELAY_MAX_CONNECTIONS.",
)
HEAD_DEADLINE_ERRORS = Counter(
    "relay_head_deadline_errors_total",
    "Request-head deadlines that failed when they fired (the connection was closed anyway).",
)
ENGINE_IN_FLIGHT = Gauge(
    "relay_attempts_in_flight",
    "Delivery attempts in flight across the worker processes.",
    multiprocess_mode="livesum",
)
BREAKER_OPENED = Counter(
    "relay_breaker_opened_total",
    "Times a target's circuit breaker opened (after failures in a row, or a failed probe).",
)
BREAKERS_OPEN = Gauge(
    "relay_breakers_open",
    "Targets whose circuit breaker is open or half_open, as the sweeper last counted.",
    multiprocess_mode="max",
)
SWEEPER_RUNS = Counter("relay_sweeper_runs_total", "Sweeps made by the leading sweeper.")
SWEPT = Counter(
    "relay_swept_targets_total",
    "Targets the sweeper woke because they had due deliveries that nobody carried.",
)
DUE_UNSENT = Gauge(
    "relay_due_deliveries",
    "Deliveries due but not yet sent, as the sweeper last counted.",
    multiprocess_mode="max",
)
DEAD_LETTERS = Gauge(
    "relay_dead_letters",
    "Dead deliveries, as the sweeper last counted.",
    multiprocess_mode="max",
)
SWEEPER_LEADER = Gauge(
    "relay_sweeper_leader",
    "1 while this worker's sweeper holds the leadership (one leader across all workers).",
    multiprocess_mode="max",
)
SWEEPER_LAST_SWEEP = Gauge(
    "relay_sweeper_last_success_timestamp_seconds",
    "Unix time of the leading sweeper's last completed sweep; stale means no sweeping.",
    multiprocess_mode="max",
)
STRANDED_KEYS_REPAIRED = Counter(
    "relay_stranded_keys_repaired_total",
    "Ordered keys the sweeper found with parked deliveries and none active, and promoted.",
)
SWEEPER_RESTARTS = Counter(
    "relay_sweeper_restarts_total",
    "Times the sweeper lost its connection or failed, and reconnected.",
)

DEPENDENCY_UP = Gauge(
    "relay_dependency_up",
    "Whether the gateway reached a dependency at its last readiness probe.",
    ["dependency"],
)


def status_class(status_code: int | None) -> str:
    """``2xx`` … ``5xx``, or ``error`` when no answer came."""
    return f"{status_code // 100}xx" if status_code is not None else "error"


def worker_registry() -> CollectorRegistry:
    """A registry aggregating every worker process's metrics (multiprocess mode)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry
