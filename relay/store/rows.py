"""Typed rows: what the store hands to everything above it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal, NamedTuple, Self

from relay.delivery.outcome import BreakerState

DeliveryStatus = Literal["pending", "retrying", "succeeded", "dead"]
#: What holds a due delivery: its target's open breaker, its disabled target, the
#: target's rate limit, or (parked) another delivery of its ordering key.
WaitingFor = Literal["circuit", "disabled", "rate_limit", "key"]
_NAMES: dict[type, tuple[str, ...]] = {}
_MISSING = object()


def _names(cls: type) -> tuple[str, ...]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


class Row:
    """A frozen dataclass built from a database row by its field names.

    Columns the row has beyond the fields are ignored (``SELECT *`` may grow);
    a field the row lacks takes its default, or fails if it has none.
    """

    __slots__ = ()

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        values = {name: row.get(name, _MISSING) for name in _names(cls)}
        return cls(**{name: v for name, v in values.items() if v is not _MISSING})

    @classmethod
    def maybe(cls, row: Mapping[str, Any] | None) -> Self | None:
        return None if row is None else cls.from_row(row)


@dataclass(frozen=True, slots=True)
class Tenant(Row):
    """A tenant: whose sources, targets and events these are."""

    id: str
    name: str
    created_at: datetime
    #: its budget (None: the relay's default, relay/core/config.py)
    ingest_bytes_per_s: int | None = None
    deliveries_per_s: int | None = None
    api_requests_per_s: int | None = None


@dataclass(frozen=True, slots=True)
class ApiKey(Row):
    """A tenant's API key as it may be shown: never its hash."""

    id: str
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Source(Row):
    """Where an upstream sends a tenant's events, with its secrets sealed."""

    id: str
    tenant_id: str
    name: str
    auth_type: str
    auth_config: dict[str, Any]
    secret_enc: bytes
    previous_secret_enc: bytes | None
    secret_rotated_at: datetime | None
    rate_limit: int | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None
    #: its tenant's config_version and budget, where read with it (ingest)
    config_version: int = 0
    ingest_bytes_per_s: int | None = None
    deliveries_per_s: int | None = None


@dataclass(frozen=True, slots=True)
class Target(Row):
    """Where a tenant receives its events: the row, its breaker and its blocked keys."""

    id: str
    tenant_id: str
    url: str
    description: str | None
    filter_object_types: list[str]
    filter_actions: list[str]
    source_ids: list[str] | None
    headers_enc: bytes | None
    secret_enc: bytes
    previous_secret_enc: bytes | None
    secret_rotated_at: datetime | None
    rate_limit: int | None
    max_in_flight: int
    ordering: Literal["none", "object"]
    ordering_key: str | None
    on_dead: Literal["skip", "block"]
    enabled: bool
    disabled_reason: str | None
    failing_since: datetime | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None
    #: "events": upstream events; "operational": the relay's events about the tenant's own
    kind: Literal["events", "operational"] = "events"
    # from target_health (a target without a health row is healthy)
    breaker: BreakerState = "closed"
    breaker_reason: str | None = None
    breaker_open_until: datetime | None = None
    consecutive_failures: int = 0
    #: keys whose delivery died and blocks them (on_dead "block")
    blocked_keys: int = 0
    #: deliveries waiting behind those dead letters
    blocked_waiting: int = 0


@dataclass(frozen=True, slots=True)
class Event(Row):
    """An event as received: what it is about, and its payload's bytes and size."""

    id: str
    source_id: str | None
    received_at: datetime
    object_type: str | None
    action: str | None
    object_id: str | None
    #: None: left out of a list page, whose payloads are bounded in bytes
    payload: bytes | None
    payload_size: int
    #: an operational event (the relay's own, about the tenant's resources)
    operational: bool = False


class Wake(NamedTuple):
    """A target to wake: it has due work that nobody carries."""

    target_id: str
    tenant_id: str


class Replayed(NamedTuple):
    """A delivery put back to pending, and the target to wake for it."""

    id: str
    target_id: str
    tenant_id: str

    @property
    def wake(self) -> Wake:
        return Wake(self.target_id, self.tenant_id)


@dataclass(frozen=True, slots=True)
class Delivery(Row):
    """A delivery as the API and the CLI show it (the columns of ``DELIVERY_COLUMNS``)."""

    id: str
    tenant_id: str
    event_id: str
    target_id: str
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    #: an ordered delivery waiting: the delivery of its key it waits behind
    blocked_by: str | None = None
    #: what holds it while it is due (or parked): see ``WaitingFor``
    waiting_for: WaitingFor | None = None


@dataclass(frozen=True, slots=True)
class AttemptRecord(Row):
    """One recorded attempt: when, how long, what came back."""

    id: str
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    response_body: str | None
