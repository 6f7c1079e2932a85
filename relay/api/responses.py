"""What each route answers, for the OpenAPI document.

The models mirror the ``render_*`` functions of the API modules; the
conformance test (schemathesis against a running gateway) checks every answer
against them, so they cannot drift from what is served. Answers may gain
fields (API.md leaves extra fields open), so no model forbids them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import pydantic

Status = Literal["pending", "retrying", "succeeded", "dead"]


class TenantBase(pydantic.BaseModel):
    """A tenant (never a key)."""

    id: str
    name: str
    created_at: datetime


class TenantLimits(pydantic.BaseModel):
    """A tenant's budget on the shared relay; null: the relay's default."""

    ingest_bytes_per_s: int | None
    deliveries_per_s: int | None
    api_requests_per_s: int | None


class Tenant(TenantBase):
    """A tenant (never a key), with its budget."""

    limits: TenantLimits


class TenantCreated(TenantBase):
    """A new tenant with its first API key, shown once."""

    api_key: str
    api_key_id: str


class ApiKey(pydantic.BaseModel):
    """An API key's metadata (never the key)."""

    id: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(pydantic.BaseModel):
    """A new API key, shown once."""

    id: str
    api_key: str
    created_at: datetime


class SourceAuthShown(pydantic.BaseModel):
    """The source's auth settings (never its secret)."""

    type: Literal["token", "basic", "hmac", "standard-webhooks"]


class Source(pydantic.BaseModel):
    """A source (no secret)."""

    id: str
    name: str
    auth: SourceAuthShown
    rate_limit: int | None
    ingest_url: str
    created_at: datetime
    updated_at: datetime


class SourceWithSecret(Source):
    """A source with its secret: at creation and rotation only."""

    secret: str


class FilterShown(pydantic.BaseModel):
    """Which events a target wants."""

    model_config = pydantic.ConfigDict(populate_by_name=True)
    object_type: list[str] = pydantic.Field(alias="objectType")
    action: list[str]


class CircuitShown(pydantic.BaseModel):
    """The target's circuit breaker.

    ``closed``: attempts flow. ``open``: after failures in a row (timeouts,
    connection errors, 5xx) its due deliveries wait, spending no attempt, until
    ``until``; then one probe goes through (``half_open``), and its success
    closes the breaker while its failure opens it again for twice as long.
    """

    state: Literal["closed", "open", "half_open"]
    reason: str | None = pydantic.Field(description="Why it opened (null when closed).")
    until: datetime | None = pydantic.Field(
        description="When the open period ends and a probe may go (null when closed)."
    )


class BlockedShown(pydantic.BaseModel):
    """Keys of an ordered target with on_dead "block" that wait on a dead letter."""

    keys: int = pydantic.Field(description="Keys whose delivery died and blocks them.")
    waiting: int = pydantic.Field(description="Deliveries waiting behind those dead letters.")


class Target(pydantic.BaseModel):
    """A target (no secret)."""

    id: str
    kind: Literal["events", "operational"] = pydantic.Field(
        description='"events": upstream events; "operational": the relay\'s events about the '
        "tenant's targets and deliveries (set at creation)."
    )
    url: str
    description: str | None
    filter: FilterShown
    source_ids: list[str] | None
    headers: dict[str, str]
    rate_limit: int | None
    max_in_flight: int = pydantic.Field(
        description="At most this many attempts to the target are in flight at once."
    )
    ordering: Literal["none", "object"] = pydantic.Field(
        description='"object": the deliveries of one key arrive one at a time, in the order '
        "the events were received; other keys do not wait."
    )
    ordering_key: str | None = pydantic.Field(
        description="A JSON pointer into the payload naming the key; null: objectType and objectId."
    )
    on_dead: Literal["skip", "block"] = pydantic.Field(
        description='When a key\'s delivery dies: "skip" (the next goes) or "block" (the key '
        "waits until the dead letter is replayed or purged)."
    )
    blocked: BlockedShown
    enabled: bool
    disabled_reason: str | None
    circuit: CircuitShown
    created_at: datetime
    updated_at: datetime


class TargetWithSecret(Target):
    """A new target with its signing secret."""

    secret: str


class Secret(pydantic.BaseModel):
    """A signing secret."""

    secret: str


class TestSent(pydantic.BaseModel):
    """The test event and its one delivery."""

    event_id: str
    delivery_id: str


class Delivery(pydantic.BaseModel):
    """One event sent to one target."""

    id: str
    event_id: str
    target_id: str
    status: Status
    attempt_count: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    blocked_by: str | None = pydantic.Field(
        default=None,
        description="Present while an ordered delivery waits: the delivery of its key "
        "it waits behind.",
    )
    waiting_for: Literal["circuit", "disabled", "rate_limit", "key"] | None = pydantic.Field(
        default=None,
        description="Present while a due delivery is held, saying what holds it: "
        '"circuit" (its target\'s breaker is open; next_attempt_at is then the '
        'breaker\'s until), "disabled" (its target is disabled), "rate_limit" (the '
        'target\'s rate limit defers it) or "key" (it waits behind blocked_by, of its '
        "ordering key).",
    )


class Attempt(pydantic.BaseModel):
    """One attempt of a delivery."""

    id: str
    started_at: datetime
    duration_ms: int | None
    status_code: int | None
    error: str | None
    response_body: str | None


class DeliveryWithAttempts(Delivery):
    """A delivery and its latest attempts."""

    attempts: list[Attempt] = pydantic.Field(
        description="Its latest 100 attempts at most, oldest first."
    )
    attempts_next_cursor: str | None = pydantic.Field(
        description="When it has earlier attempts: the cursor that lists them at "
        "GET /v1/deliveries/{id}/attempts (newest first); null when all are shown."
    )


class DeadLetter(Delivery):
    """A dead delivery with its tenant (operators see every tenant's)."""

    tenant_id: str


class Event(pydantic.BaseModel):
    """An event with its payload as received."""

    id: str
    source_id: str | None
    received_at: datetime
    object_type: str | None
    action: str | None
    object_id: str | None
    payload: Any = pydantic.Field(
        description="The payload as JSON. In a list, null for the events whose payloads "
        "did not fit in the page's 1 MiB of payloads (newest first): "
        "GET /v1/events/{id} has it."
    )
    payload_size: int = pydantic.Field(description="The payload's size in bytes.")


class EventWithDeliveries(Event):
    """An event and its latest deliveries."""

    deliveries: list[Delivery] = pydantic.Field(
        description="Its latest 100 deliveries at most, oldest first."
    )
    deliveries_next_cursor: str | None = pydantic.Field(
        description="When it has earlier deliveries: the cursor that lists them at "
        "GET /v1/deliveries?event_id={id} (newest first); null when all are shown."
    )


class OperationalEvent(pydantic.BaseModel):
    """An event of the relay about the tenant's own targets and deliveries."""

    id: str = pydantic.Field(description="The event's id: the webhook-id its receivers get.")
    uuid: str = pydantic.Field(description="The body's uuid, unique per operational event.")
    object_type: Literal["Target", "Delivery"]
    action: str = pydantic.Field(
        description="Target: disabled, circuit_opened, circuit_closed, recovered, "
        "key_blocked; Delivery: dead."
    )
    object_id: str = pydantic.Field(description="The target's or the delivery's id.")
    data: dict[str, Any] = pydantic.Field(description="What the body's data says.")
    created_at: datetime


class Replayed(pydantic.BaseModel):
    """How many dead letters went back to pending."""

    replayed: int


class DeliveryIds(pydantic.BaseModel):
    """The deliveries a replay created."""

    delivery_ids: list[str]


class EventIds(pydantic.BaseModel):
    """The events an ingest request stored (or found: duplicates)."""

    event_ids: list[str]


class DeliveryCounts(pydantic.BaseModel):
    """Deliveries by status."""

    pending: int
    retrying: int
    succeeded: int
    dead: int


class TenantDeadLetters(pydantic.BaseModel):
    """A tenant's number of dead letters."""

    tenant_id: str
    count: int


class Stats(pydantic.BaseModel):
    """Delivery statistics across tenants."""

    deliveries: DeliveryCounts
    oldest_due_age_s: float | None
    oldest_pending_age_s: float | None
    dead_letters_by_tenant: list[TenantDeadLetters]


class TargetHeaders(pydantic.BaseModel):
    """A target's custom headers, values in clear."""

    headers: dict[str, str]


class PortalLinkCreated(pydantic.BaseModel):
    """A portal link, shown once: its URL signs one browser into the console as the tenant."""

    id: str
    url: str = pydantic.Field(
        description="Opens the console as the tenant, once, until expires_at; hand it to one "
        "person instead of an API key."
    )
    expires_at: datetime = pydantic.Field(
        description="After this the link is refused, and the session it made has ended."
    )
    read_only: bool


class Health(pydantic.BaseModel):
    """The process is alive."""

    status: Literal["ok"]


class Ready(pydantic.BaseModel):
    """Postgres answered; the state of every dependency."""

    status: Literal["ready"]
    checks: dict[str, Literal["ok", "unreachable"]]


@dataclass(frozen=True)
class Answer:
    """A route's success body (``page``: a list of ``model``) and its other outcomes."""

    model: type[pydantic.BaseModel] | None = None
    page: bool = False
    #: Outcomes beyond what the route's auth, path, body and query imply.
    errors: tuple[int, ...] = ()
    #: A body that is not JSON: its media type.
    media_type: str | None = None


#: Every route's answer, by method and path (a unit test keeps this in step with the routes).
ANSWERS: dict[tuple[str, str], Answer] = {
    ("GET", "/healthz"): Answer(Health),
    ("GET", "/readyz"): Answer(Ready, errors=(503,)),
    ("GET", "/openapi.json"): Answer(),
    ("GET", "/metrics"): Answer(media_type="text/plain"),
    ("POST", "/v1/tenants"): Answer(TenantCreated),
    ("GET", "/v1/tenants"): Answer(Tenant, page=True),
    ("GET", "/v1/tenants/{tenant_id}"): Answer(Tenant),
    ("PATCH", "/v1/tenants/{tenant_id}"): Answer(Tenant),
    ("GET", "/v1/tenants/{tenant_id}/api-keys"): Answer(ApiKey, page=True),
    ("POST", "/v1/tenants/{tenant_id}/api-keys"): Answer(ApiKeyCreated),
    ("DELETE", "/v1/tenants/{tenant_id}/api-keys/{key_id}"): Answer(),
    ("POST", "/v1/tenants/{tenant_id}/portal-links"): Answer(PortalLinkCreated),
    ("GET", "/v1/admin/dead-letters"): Answer(DeadLetter, page=True),
    ("POST", "/v1/admin/dead-letters/replay"): Answer(Replayed),
    ("GET", "/v1/admin/stats"): Answer(Stats),
    ("POST", "/v1/sources"): Answer(SourceWithSecret),
    ("GET", "/v1/sources"): Answer(Source, page=True),
    ("GET", "/v1/sources/{source_id}"): Answer(Source),
    ("PATCH", "/v1/sources/{source_id}"): Answer(Source, errors=(409,)),
    ("DELETE", "/v1/sources/{source_id}"): Answer(),
    ("POST", "/v1/sources/{source_id}/rotate-secret"): Answer(SourceWithSecret),
    ("POST", "/v1/targets"): Answer(TargetWithSecret),
    ("GET", "/v1/targets"): Answer(Target, page=True),
    ("GET", "/v1/targets/{target_id}"): Answer(Target),
    ("PATCH", "/v1/targets/{target_id}"): Answer(Target),
    ("DELETE", "/v1/targets/{target_id}"): Answer(),
    ("GET", "/v1/targets/{target_id}/secret"): Answer(Secret),
    ("GET", "/v1/targets/{target_id}/headers"): Answer(TargetHeaders),
    ("POST", "/v1/targets/{target_id}/rotate-secret"): Answer(Secret),
    ("POST", "/v1/targets/{target_id}/test"): Answer(TestSent, errors=(409,)),
    ("GET", "/v1/events"): Answer(Event, page=True),
    ("GET", "/v1/events/{event_id}"): Answer(EventWithDeliveries),
    ("POST", "/v1/events/{event_id}/replay"): Answer(DeliveryIds),
    ("GET", "/v1/operational-events"): Answer(OperationalEvent, page=True),
    ("GET", "/v1/deliveries"): Answer(Delivery, page=True),
    ("GET", "/v1/deliveries/{delivery_id}"): Answer(DeliveryWithAttempts),
    ("GET", "/v1/deliveries/{delivery_id}/attempts"): Answer(Attempt, page=True),
    # 422: a deleted target's delivery is never sent again
    ("POST", "/v1/deliveries/{delivery_id}/retry"): Answer(Delivery, errors=(409, 422)),
    ("GET", "/v1/dead-letters"): Answer(Delivery, page=True),
    ("POST", "/v1/dead-letters/replay"): Answer(Replayed),
    ("POST", "/v1/portal-links"): Answer(PortalLinkCreated),
    ("POST", "/in/{source_id}"): Answer(EventIds, errors=(400, 413, 415, 422, 429)),
}
