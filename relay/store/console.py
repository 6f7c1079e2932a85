"""What only the web console reads: figures, filters and look-ups the API has no query for.

Everything the API already answers (a delivery, its attempts, a target, an
event, the dead letters of a target) the console reads through the API's own
store functions; this module adds only what they lack. Every function takes the
viewer's ``tenant_id`` (None: an operator, every tenant) and filters by it.

Figures never scan the history (issue 24): traffic over a window comes from
the per-minute figures and deliveries by status from their counters, both kept
by migration 0011's triggers as the work happens; their bounds are values
(``minute_of``), so that the planner prunes the days they do not show. Lists of
events read the last day first (``sql.newest_first``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from relay.store.db import Queries
from relay.store.sql import (
    about_target,
    hold_reason,
    keyset_page,
    newest_first,
    optional_filters,
    pinned_order,
)

# --- signing in -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyOwner:
    """A live API key and the tenant it signs in as."""

    key_id: str
    tenant_id: str
    tenant_name: str


def minute_of(at: datetime) -> datetime:
    """The UTC minute holding ``at``: the figures' queries take their bounds as such
    values, not as date_trunc(..., $n) (stable, not immutable), so that the planner
    prunes the figures' day partitions (migration 0028) before it plans them: with
    40 days of partitions, the tenant's overview figures planned 88 partitions, 3.3 ms
    of planning a call against 0.2 ms with today's alone."""
    return at.astimezone(UTC).replace(second=0, microsecond=0)


async def key_owner_by_hash(conn: Queries, key_hash: bytes) -> KeyOwner | None:
    """The live key with this hash and its tenant (sign-in), or None."""
    row = await conn.fetchrow(
        """
        SELECT k.id, k.tenant_id, t.name FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
        WHERE k.key_hash = $1 AND k.revoked_at IS NULL
        """,
        key_hash,
    )
    return None if row is None else KeyOwner(row["id"], row["tenant_id"], row["name"])


async def key_owner_by_id(conn: Queries, key_id: str) -> KeyOwner | None:
    """The key a session signed in with, while it is live (a revoked key ends its sessions)."""
    row = await conn.fetchrow(
        """
        SELECT k.id, k.tenant_id, t.name FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
        WHERE k.id = $1 AND k.revoked_at IS NULL
        """,
        key_id,
    )
    return None if row is None else KeyOwner(row["id"], row["tenant_id"], row["name"])


# --- whose is it ----------------------------------------------------------------

_OWNER_QUERIES = {
    "event": "SELECT tenant_id FROM events WHERE id = $1",
    "target": "SELECT tenant_id FROM targets WHERE id = $1 AND deleted_at IS NULL",
}


async def owner_of(conn: Queries, kind: Literal["event", "target"], object_id: str) -> str | None:
    """The tenant owning an event or a live target (operators open any tenant's)."""
    owner: str | None = await conn.fetchval(_OWNER_QUERIES[kind], object_id)
    return owner


async def tenant_names(conn: Queries, tenant_ids: Sequence[str]) -> dict[str, str]:
    """Names of tenants by id."""
    rows = await conn.fetch(
        "SELECT id, name FROM tenants WHERE id = ANY($1::text[])", list(set(tenant_ids))
    )
    return {r["id"]: r["name"] for r in rows}


# --- overview ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantFigures:
    """One tenant's traffic over a window and its deliveries' state now."""

    tenant_id: str
    tenant_name: str
    events: int
    succeeded: int
    failed_attempts: int
    pending: int
    retrying: int
    dead: int
    due: int
    oldest_due_at: datetime | None


def _of_viewer(d: str, tenant_id: str | None) -> str:
    """Delivery ``d`` is work of the viewer: the tenant in ``$1`` (``tenant_id`` given),
    read through its targets' due index, or any tenant (``$1`` NULL).

    Not ``($1 IS NULL OR d.tenant_id = $1)``: under a generic plan that read every
    tenant's due deliveries to count one tenant's (124 pages for its 5 beside another
    tenant's 5,000), so one tenant's backlog slowed another's overview.
    """
    of_tenant = "SELECT t.id FROM targets t WHERE t.tenant_id = $1::text"
    return optional_filters(("$1::text", f"{d}.target_id = ANY(ARRAY({of_tenant}))", tenant_id))


async def figures_by_tenant(
    conn: Queries, tenant_id: str | None, *, since: datetime
) -> list[TenantFigures]:
    """Per tenant: events received and attempts since ``since``; deliveries waiting or dead now.

    ``succeeded`` counts 2xx attempts, so succeeded deliveries (one success each).
    Traffic comes from the folded figures (the minute holding ``since`` whole): the
    minutes up to the next UTC hour, then whole hours (migration 0021), and the deltas
    not folded yet; so a day is at most 60 minutes and 24 hours a tenant, however busy.
    Deliveries by status come from their counters; only the due ones are read, by
    their index (as many as are due, whatever the history; a tenant's, its own).
    """
    first_minute = minute_of(since)
    rows = await conn.fetch(
        f"""
        WITH traffic AS (
            SELECT tenant_id, sum(events) AS n, sum(ok) AS ok, sum(failed) AS failed
            FROM (
                SELECT m.tenant_id, m.events, m.ok, m.failed
                FROM tenant_minutes m WHERE m.minute >= $2 AND m.minute < $3
                UNION ALL
                SELECT h.tenant_id, h.events, h.ok, h.failed
                FROM tenant_hours h WHERE h.hour >= $3
                UNION ALL
                SELECT d.tenant_id, d.events, d.ok, d.failed
                FROM tenant_minute_deltas d WHERE d.minute >= $2
            ) x
            WHERE ($1::text IS NULL OR tenant_id = $1)
            GROUP BY tenant_id
        ), counts AS (
            SELECT tenant_id,
                   sum(n) FILTER (WHERE status = 'pending') AS pending,
                   sum(n) FILTER (WHERE status = 'retrying') AS retrying,
                   sum(n) FILTER (WHERE status = 'dead') AS dead
            FROM delivery_counts_now
            WHERE status IN ('pending', 'retrying', 'dead') AND ($1::text IS NULL OR tenant_id = $1)
            GROUP BY tenant_id
        ), due AS (
            SELECT d.tenant_id, count(*) AS due, min(d.next_attempt_at) AS oldest_due
            FROM deliveries d
            WHERE d.status IN ('pending', 'retrying') AND d.next_attempt_at <= now()
              AND {_of_viewer("d", tenant_id)}
            GROUP BY d.tenant_id
        )
        SELECT t.id, t.name, coalesce(traffic.n, 0)::bigint AS events,
               coalesce(traffic.ok, 0)::bigint AS ok, coalesce(traffic.failed, 0)::bigint AS failed,
               coalesce(counts.pending, 0)::bigint AS pending,
               coalesce(counts.retrying, 0)::bigint AS retrying,
               coalesce(counts.dead, 0)::bigint AS dead, coalesce(due.due, 0) AS due,
               due.oldest_due
        FROM tenants t
        LEFT JOIN traffic ON traffic.tenant_id = t.id
        LEFT JOIN counts ON counts.tenant_id = t.id
        LEFT JOIN due ON due.tenant_id = t.id
        WHERE ($1::text IS NULL OR t.id = $1)
        ORDER BY coalesce(counts.dead, 0) + coalesce(due.due, 0) DESC,
                 coalesce(traffic.n, 0) DESC, t.id
        """,
        tenant_id,
        first_minute,
        first_minute.replace(minute=0) + timedelta(hours=1),
    )
    return [
        TenantFigures(
            tenant_id=r["id"],
            tenant_name=r["name"],
            events=r["events"],
            succeeded=r["ok"],
            failed_attempts=r["failed"],
            pending=r["pending"],
            retrying=r["retrying"],
            dead=r["dead"],
            due=r["due"],
            oldest_due_at=r["oldest_due"],
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class MinuteOutcomes:
    """What happened in one minute: successful and failed attempts, deliveries that died."""

    minute: datetime
    succeeded: int
    failed: int
    died: int


async def outcomes_by_minute(
    conn: Queries, tenant_id: str | None, *, since: datetime
) -> list[MinuteOutcomes]:
    """Attempts by outcome and deliveries that died, per minute since ``since`` (minutes with
    nothing are absent). Deaths count in the minute they happened: a replay does not
    change the past."""
    rows = await conn.fetch(
        """
        SELECT minute AS m, sum(ok)::int AS ok, sum(failed)::int AS failed,
               sum(died)::int AS died
        FROM tenant_minutes_now
        WHERE minute >= $2
          AND ($1::text IS NULL OR tenant_id = $1)
        GROUP BY minute HAVING sum(ok) + sum(failed) + sum(died) > 0
        ORDER BY minute
        """,
        tenant_id,
        minute_of(since),
    )
    return [MinuteOutcomes(r["m"], r["ok"], r["failed"], r["died"]) for r in rows]


# --- labels for lists ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetLabel:
    """What a list shows of a target: its URL, and whether it is still there."""

    url: str
    deleted: bool


async def target_labels(
    conn: Queries, tenant_id: str | None, target_ids: Sequence[str]
) -> dict[str, TargetLabel]:
    """URLs of targets (deleted ones too: their deliveries keep their history)."""
    rows = await conn.fetch(
        """
        SELECT id, url, deleted_at IS NOT NULL AS deleted FROM targets
        WHERE id = ANY($2::text[]) AND ($1::text IS NULL OR tenant_id = $1)
        """,
        tenant_id,
        list(set(target_ids)),
    )
    return {r["id"]: TargetLabel(r["url"], r["deleted"]) for r in rows}


@dataclass(frozen=True, slots=True)
class EventLabel:
    """What a list shows of an event."""

    object_type: str | None
    action: str | None
    object_id: str | None


async def event_labels(
    conn: Queries, tenant_id: str | None, event_ids: Sequence[str]
) -> dict[str, EventLabel]:
    """Type, action and object id of events."""
    rows = await conn.fetch(
        """
        SELECT id, object_type, action, object_id FROM events
        WHERE id = ANY($2::text[]) AND ($1::text IS NULL OR tenant_id = $1)
        """,
        tenant_id,
        list(set(event_ids)),
    )
    return {r["id"]: EventLabel(r["object_type"], r["action"], r["object_id"]) for r in rows}


async def delivery_counts_of_events(
    conn: Queries, tenant_id: str | None, event_ids: Sequence[str]
) -> dict[str, dict[str, int]]:
    """For each event, its deliveries by status."""
    rows = await conn.fetch(
        """
        SELECT event_id, status, count(*) AS n FROM deliveries
        WHERE event_id = ANY($2::text[]) AND ($1::text IS NULL OR tenant_id = $1)
        GROUP BY event_id, status
        """,
        tenant_id,
        list(set(event_ids)),
    )
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r["event_id"], {})[r["status"]] = r["n"]
    return counts


async def attempts_made(conn: Queries, delivery_id: str) -> int:
    """How many attempts a delivery has recorded (over every retry and replay)."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM attempts WHERE delivery_id = $1", delivery_id
    )
    return count


# --- targets' health ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetHealth:
    """A target's attempts over a window: how many, how many succeeded, how long they took."""

    attempts: int
    succeeded: int
    p50_ms: float | None
    p99_ms: float | None
    last_attempt_at: datetime | None
    retrying: int
    dead: int

    @property
    def success_rate(self) -> float | None:
        """Successful attempts out of all, 0..1 (None: no attempt)."""
        return self.succeeded / self.attempts if self.attempts else None


NO_TRAFFIC = TargetHealth(0, 0, None, None, None, 0, 0)


def latency_percentile(buckets: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of latencies counted in the log buckets of
    ``latency_bucket`` (migration 0011), interpolated within its bucket (None: no latency).

    Bucket 0 holds 0 ms; bucket b >= 1 holds [2^((b-1)/4), 2^(b/4)) ms, so the
    figure is within about 19 % of the exact one.
    """
    total = sum(buckets.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(buckets):
        n = buckets[bucket]
        if seen + n >= rank:
            if bucket == 0:
                return 0.0
            low, high = 2 ** ((bucket - 1) / 4), 2 ** (bucket / 4)
            return float(low * (high / low) ** ((rank - seen) / n))
        seen += n
    return float(2 ** (max(buckets) / 4))


async def target_health(
    conn: Queries, tenant_id: str | None, target_ids: Sequence[str], *, since: datetime
) -> dict[str, TargetHealth]:
    """Attempts since ``since`` (the minute holding it whole) and deliveries retrying or dead
    now, per target: from the per-minute figures and the counters, never the attempts."""
    mine = await conn.fetch(
        "SELECT id FROM targets "
        "WHERE id = ANY($2::text[]) AND ($1::text IS NULL OR tenant_id = $1)",
        tenant_id,
        list(set(target_ids)),
    )
    ids = [r["id"] for r in mine]
    first_minute = minute_of(since)
    rows = await conn.fetch(
        """
        WITH att AS (
            SELECT target_id, sum(ok) + sum(failed) AS n, sum(ok) AS ok,
                   max(last_attempt_at) AS last_at
            FROM target_minutes_now
            WHERE target_id = ANY($1::text[]) AND minute >= $2
            GROUP BY target_id
        ), now_ AS (
            SELECT target_id, sum(n) FILTER (WHERE status = 'retrying') AS retrying,
                   sum(n) FILTER (WHERE status = 'dead') AS dead
            FROM delivery_counts_now
            WHERE target_id = ANY($1::text[]) AND status IN ('retrying', 'dead')
            GROUP BY target_id
        )
        SELECT t.id, coalesce(att.n, 0)::bigint AS n, coalesce(att.ok, 0)::bigint AS ok,
               att.last_at, coalesce(now_.retrying, 0)::bigint AS retrying,
               coalesce(now_.dead, 0)::bigint AS dead
        FROM unnest($1::text[]) AS t(id)
        LEFT JOIN att ON att.target_id = t.id LEFT JOIN now_ ON now_.target_id = t.id
        """,
        ids,
        first_minute,
    )
    latency: dict[str, dict[int, int]] = {}
    for r in await conn.fetch(
        """
        SELECT target_id, bucket, sum(n)::bigint AS n FROM target_latency_minutes_now
        WHERE target_id = ANY($1::text[]) AND minute >= $2
        GROUP BY target_id, bucket
        """,
        ids,
        first_minute,
    ):
        latency.setdefault(r["target_id"], {})[r["bucket"]] = r["n"]
    return {
        r["id"]: TargetHealth(
            attempts=r["n"],
            succeeded=r["ok"],
            p50_ms=latency_percentile(latency.get(r["id"], {}), 0.5),
            p99_ms=latency_percentile(latency.get(r["id"], {}), 0.99),
            last_attempt_at=r["last_at"],
            retrying=r["retrying"],
            dead=r["dead"],
        )
        for r in rows
    }


@dataclass(frozen=True, slots=True)
class TargetAcross:
    """A target as the operators' list across tenants shows it."""

    id: str
    tenant_id: str
    tenant_name: str
    url: str
    enabled: bool
    disabled_reason: str | None
    failing_since: datetime | None
    breaker: str
    breaker_until: datetime | None
    #: attempts and successful ones over the window
    attempts: int
    succeeded: int

    @property
    def success_rate(self) -> float | None:
        """Successful attempts out of all, 0..1 (None: no attempt)."""
        return self.succeeded / self.attempts if self.attempts else None


TargetSort = Literal["failing", "breaker", "success"]

_TARGET_ORDER: dict[TargetSort, str] = {
    # failing the longest first, then the rest
    "failing": "t.failing_since ASC NULLS LAST, t.id",
    # open breakers first (the longest open first), then half-open ones
    "breaker": "(coalesce(h.breaker, 'closed') = 'open') DESC, "
    "(coalesce(h.breaker, 'closed') = 'half_open') DESC, h.changed_at ASC NULLS LAST, t.id",
    # the lowest success rate first; targets without attempts last
    "success": "(coalesce(att.n, 0) = 0), coalesce(att.ok, 0)::float8 / greatest(att.n, 1), t.id",
}


async def targets_across_tenants(
    conn: Queries, *, sort: TargetSort, since: datetime, limit: int
) -> list[TargetAcross]:
    """Every tenant's live targets (up to ``limit``), sorted, each named with its tenant."""
    rows = await conn.fetch(
        f"""
        WITH att AS (
            SELECT target_id, sum(ok) + sum(failed) AS n, sum(ok) AS ok
            FROM target_minutes_now WHERE minute >= $1
            GROUP BY target_id
        )
        SELECT t.id, t.tenant_id, tn.name AS tenant_name, t.url, t.enabled, t.disabled_reason,
               t.failing_since, coalesce(h.breaker, 'closed') AS breaker,
               CASE WHEN h.breaker = 'closed' THEN NULL ELSE h.open_until END AS breaker_until,
               coalesce(att.n, 0)::bigint AS attempts, coalesce(att.ok, 0)::bigint AS succeeded
        FROM targets t
        JOIN tenants tn ON tn.id = t.tenant_id
        LEFT JOIN target_health h ON h.target_id = t.id
        LEFT JOIN att ON att.target_id = t.id
        WHERE t.deleted_at IS NULL
        ORDER BY {_TARGET_ORDER[sort]}
        LIMIT $2
        """,
        minute_of(since),
        limit,
    )
    return [TargetAcross(**dict(r)) for r in rows]


@dataclass(frozen=True, slots=True)
class Held:
    """Due deliveries that wait for a reason, and how many targets hold them."""

    reason: str
    deliveries: int
    targets: int


async def held_deliveries(
    conn: Queries, tenant_id: str | None, *, delivery_ids: Sequence[str] | None = None
) -> list[Held]:
    """Due deliveries held by their target (disabled, breaker open, rate limit), by reason:
    a tenant's (None: every tenant's), or of ``delivery_ids`` only (due or not yet)."""
    rows = await conn.fetch(
        f"""
        SELECT r.reason, count(*) AS deliveries, count(DISTINCT r.target_id) AS targets
        FROM (
            SELECT d.target_id, {hold_reason("t", "h")} AS reason
            FROM deliveries d JOIN targets t ON t.id = d.target_id
            LEFT JOIN target_health h ON h.target_id = t.id
            WHERE d.status IN ('pending', 'retrying') AND {_of_viewer("d", tenant_id)}
              AND CASE WHEN $2::text[] IS NULL THEN d.next_attempt_at <= now()
                       ELSE d.id = ANY($2::text[]) END
        ) r
        WHERE r.reason IS NOT NULL
        GROUP BY r.reason ORDER BY r.reason
        """,
        tenant_id,
        None if delivery_ids is None else list(delivery_ids),
    )
    return [Held(r["reason"], r["deliveries"], r["targets"]) for r in rows]


# --- events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventRow:
    """An event as a search lists it (no payload)."""

    id: str
    tenant_id: str
    source_id: str | None
    received_at: datetime
    object_type: str | None
    action: str | None
    object_id: str | None
    upstream_uuid: str | None


@dataclass(frozen=True, slots=True)
class EventSearch:
    """What an event search asks for; type and action match case-insensitively."""

    object_type: str | None = None
    action: str | None = None
    object_id: str | None = None
    upstream_uuid: str | None = None
    since: datetime | None = None
    until: datetime | None = None


async def search_events(
    conn: Queries, tenant_id: str | None, search: EventSearch, *, limit: int, cursor: str | None
) -> tuple[list[EventRow], str | None]:
    """Events matching ``search``, newest first, a page at a time (a tenant's off the
    index of its own events: ``pinned_order``)."""
    tenant, order = pinned_order([("tenant_id", "$1::text", tenant_id)], "id", descending=True)

    async def fetch(lo: str | None, hi: str | None, n: int) -> list[Any]:
        where = optional_filters(
            ("$2::text", "id < $2::text", hi),
            ("$3::text", "lower(object_type) = lower($3::text)", search.object_type),
            ("$4::text", "lower(action) = lower($4::text)", search.action),
            ("$5::text", "object_id = $5::text", search.object_id),
            ("$6::text", "upstream_uuid = $6::text", search.upstream_uuid),
            ("$7::timestamptz", "received_at >= $7::timestamptz", search.since),
            ("$8::timestamptz", "received_at < $8::timestamptz", search.until),
            ("$10::text", "id >= $10::text", lo),
        )
        return await conn.fetch(
            f"""
            SELECT id, tenant_id, source_id, received_at, object_type, action, object_id,
                   upstream_uuid
            FROM events
            WHERE {tenant} AND NOT operational AND {where}
            ORDER BY {order} LIMIT $9
            """,
            tenant_id,
            hi,
            search.object_type,
            search.action,
            search.object_id,
            search.upstream_uuid,
            search.since,
            search.until,
            n,
            lo,
        )

    rows = await newest_first(fetch, "evt", cursor, limit + 1)
    page, next_cursor = keyset_page(rows, limit)
    return [EventRow(**dict(r)) for r in page], next_cursor


@dataclass(frozen=True)
class OperationalRow:
    """An operational event as the console lists it."""

    id: str
    tenant_id: str
    received_at: datetime
    object_type: str
    action: str
    object_id: str
    #: the body's ``data`` (JSON text)
    data: str
    #: the target it is about (a Target event's object, a dead delivery's target)
    target_id: str | None


def _operational_sql(of_tenant: bool) -> str:
    """The latest operational events: of tenant $1 (``of_tenant``) or of every tenant.

    Two statements rather than ``($1 IS NULL OR tenant_id = $1)``: a prepared
    statement's generic plan cannot use an index for that condition, and read every
    event to find the few operational ones (migration 0013's indexes serve each).
    """
    tenant = "e.tenant_id = $1" if of_tenant else "$1::text IS NULL"
    return f"""
        SELECT e.id, e.tenant_id, e.received_at, e.object_type, e.action, e.object_id,
               (convert_from(e.payload, 'UTF8')::jsonb -> 'data')::text AS data,
               CASE WHEN e.object_type = 'Target' THEN e.object_id
                    ELSE convert_from(e.payload, 'UTF8')::jsonb -> 'data' ->> 'target_id'
               END AS target_id
        FROM events e
        WHERE e.operational AND {tenant}
          AND {about_target("e", "$2")}
        ORDER BY e.id DESC LIMIT $3
        """


_OPERATIONAL_OF_TENANT = _operational_sql(True)
_OPERATIONAL_OF_ALL = _operational_sql(False)


async def operational_events(
    conn: Queries, tenant_id: str | None, *, target_id: str | None = None, limit: int = 10
) -> list[OperationalRow]:
    """The latest operational events, newest first; ``target_id``: those about that target."""
    sql = _OPERATIONAL_OF_ALL if tenant_id is None else _OPERATIONAL_OF_TENANT
    rows = await conn.fetch(sql, tenant_id, target_id, limit)
    return [OperationalRow(**dict(r)) for r in rows]
