"""Typed rows: what the store hands to everything above it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple

DeliveryStatus = Literal["pending", "retrying", "succeeded", "dead"]


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
class Delivery:
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

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Delivery:
        return cls(**row)

    @classmethod
    def maybe(cls, row: Mapping[str, Any] | None) -> Delivery | None:
        return None if row is None else cls(**row)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One recorded attempt: when, how long, what came back."""

    id: str
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    response_body: str | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> AttemptRecord:
        return cls(**row)
