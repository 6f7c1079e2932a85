"""``POST /in/{source_id}``: the front door for upstream systems.

Checks run cheapest first, and nothing is written until every check passed:
unknown source 404 → token/basic credential 401 → content type 415 → declared
length 413 → the tenant's budget of ingest bytes 429 (before the body is read)
→ body read with the cap 413 → hmac/standard-webhooks signature 401 → JSON
shape 400/422 → deliveries per request 422 → the source's rate limit 429 →
the tenant's budget of deliveries 429. Then the
events and their deliveries are committed, in one transaction with those of the
requests that arrived together (relay/ingest/group_commit.py), the answer is 202, and
their targets are woken on the broker once per group (the sweeper covers an
enqueue that fails).

After the signature check, a ``webhook-id`` or a timestamped hmac signature
already accepted in the last 10 minutes is 401 (relay/ingest/replay_guard.py);
it is released again when the request is then refused.

Read your writes: the source and the routes come from this process's cache,
each with the tenant's ``config_version`` it was read at. A credential that
fails against a cached source is checked once more against the source read
afresh (it may have just been rotated); and the commit stores nothing for a
request whose version is no longer the tenant's, in which case the source and
routes are read again, the request authenticated and routed again, and
committed again (at most ``FRESH_TRIES`` times, then 503).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from relay.api.routing import CALLER_GONE, Route, caller_gone, is_json_content_type, respond
from relay.core import errors, offload
from relay.core.metrics import EVENTS_INGESTED, INGEST_LATENCY, INGEST_REROUTED
from relay.core.ratelimit import budget_of, spend_budget
from relay.ingest import replay_guard
from relay.ingest.auth import (
    PRE_BODY_TYPES,
    check_before_body,
    check_with_body,
    timestamped_signature,
)
from relay.ingest.parse import ParsedEvent, parse_documents
from relay.ingest.routes import Routes, SourceEntry, count_deliveries, order_keys
from relay.store import sources as source_store
from relay.store import targets as target_store
from relay.store.events import IngestRequest
from relay.web.app_keys import (
    CACHE,
    GROUP_COMMIT,
    LIMITER,
    POOL,
    REDIS,
    SECRETS,
    SETTINGS,
    THROTTLE,
)

log = logging.getLogger("relay.ingest")

#: Bodies larger than this are parsed in a thread (relay/core/offload.py), not on the
#: event loop, which other requests share: a batch of 1,000 events (200 KB) took ~20 ms.
PARSE_ON_LOOP_BYTES = 64 * 1024
#: Events x targets whose ordering keys are looked up on the loop; more, in a thread.
KEYS_ON_LOOP = 1000

#: How many times a request is routed again after its tenant's configuration
#: changed under it, before it is answered 503 (each try reads afresh).
FRESH_TRIES = 3


async def load_source(app: web.Application, source_id: str) -> SourceEntry | None:
    """A source as ingest needs it, secrets decrypted; None if unknown or deleted."""
    row = await source_store.get_source_for_ingest(app[POOL], source_id)
    if row is None:
        return None
    box, settings = app[SECRETS], app[SETTINGS]
    previous = None
    valid_until = None
    if row.previous_secret_enc is not None and row.secret_rotated_at is not None:
        previous = box.open(row.previous_secret_enc, bound_to=row.id)
        valid_until = row.secret_rotated_at.timestamp() + settings.secret_overlap_s
    return SourceEntry(
        id=row.id,
        tenant_id=row.tenant_id,
        auth_type=row.auth_type,
        auth_config=row.auth_config,
        secret=box.open(row.secret_enc, bound_to=row.id),
        previous_secret=previous,
        previous_valid_until=valid_until,
        rate_limit=row.rate_limit,
        config_version=row.config_version,
        ingest_bytes_per_s=budget_of(row.ingest_bytes_per_s, settings.tenant_ingest_bytes_per_s),
        deliveries_per_s=budget_of(row.deliveries_per_s, settings.tenant_deliveries_per_s),
    )


async def load_routes(app: web.Application, tenant_id: str) -> Routes:
    """The tenant's enabled targets with their filters lower-cased, and its config version."""
    return await target_store.routable_targets(app[POOL], tenant_id)


async def _source(app: web.Application, source_id: str, *, fresh: bool = False) -> SourceEntry:
    """The source (from the cache unless ``fresh``); 404 if unknown or deleted."""
    if fresh:
        app[CACHE].forget_source(source_id)
    source = await app[CACHE].sources.get(source_id, lambda: load_source(app, source_id))
    if source is None:
        raise errors.NotFound("no such source")
    return source


async def _routes(app: web.Application, source: SourceEntry, *, fresh: bool = False) -> Routes:
    """The tenant's routes, read at the same config version as ``source``."""
    cache = app[CACHE]
    if fresh:
        cache.forget_tenant(source.tenant_id)
    routes = await cache.targets.get(source.tenant_id, lambda: load_routes(app, source.tenant_id))
    # routes older than the source are read again; newer ones mean the source is stale,
    # which the commit's version check answers (a second read of the routes would not)
    if routes.config_version < source.config_version and not fresh:
        cache.forget_tenant(source.tenant_id)
        routes = await cache.targets.get(
            source.tenant_id, lambda: load_routes(app, source.tenant_id)
        )
    return routes


def _authentic_before_body(source: SourceEntry, request: web.Request, now: float) -> bool:
    return source.auth_type not in PRE_BODY_TYPES or check_before_body(
        source, request.headers, request.query, now
    )


def _authentic_with_body(source: SourceEntry, request: web.Request, raw: bytes, now: float) -> bool:
    return source.auth_type in PRE_BODY_TYPES or check_with_body(source, request.headers, raw, now)


async def _authenticated(
    request: web.Request,
    source: SourceEntry,
    authentic: Callable[[SourceEntry], bool],
    *,
    pre_body: bool,
    refusal: str,
) -> SourceEntry:
    """The source once the request passed ``authentic`` (the check before the body, or the
    one with it), counted by the credential throttle at the source's own door.

    A check that fails against the cached source is made once more against the source
    read afresh (its secret may have been rotated through another process a moment
    ago); a locked-out guesser gets its 429 first, without that read. The source's own
    phase (``pre_body`` for token and basic) decides after a success: from a locked-out
    address even the right credential is refused.
    """
    app = request.app
    throttle, door = app[THROTTLE], f"source:{source.id}"
    if not authentic(source):
        await throttle.admit("source", door, request.remote)
        source = await _source(app, source.id, fresh=True)
        if not authentic(source):
            await throttle.failed("source", door, request.remote)
            raise errors.Unauthorized(refusal)
    if (source.auth_type in PRE_BODY_TYPES) == pre_body:
        await throttle.admit("source", door, request.remote)
    return source


async def _ingest(request: web.Request, context: dict[str, Any]) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    source_id = request.match_info["source_id"]
    if not source_id.startswith("src_") or len(source_id) > 64:
        raise errors.NotFound("no such source")
    source = await _source(app, source_id)
    context["tenant_id"] = source.tenant_id
    now = time.time()
    source = await _authenticated(
        request,
        source,
        lambda s: _authentic_before_body(s, request, now),
        pre_body=True,
        refusal="invalid or missing source credentials",
    )
    if not is_json_content_type(request):
        raise errors.UnsupportedMediaType()
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise errors.PayloadTooLarge(f"the body is larger than {settings.max_body_bytes} bytes")
    declared = request.content_length
    paid_before = 0
    if source.auth_type in PRE_BODY_TYPES:
        # over the tenant's budget: refused before the body is read (a body of unknown
        # length pays a byte now, so an exhausted budget is refused before it too). A
        # source that signs its body pays below, once the signature proved it: a
        # stranger spends nothing, and learns nothing of the budget
        paid_before = 1 if declared is None else declared
        if paid_before:
            source = await _within_budget(app, source, lambda s: _spend_bytes(app, s, paid_before))
    raw = await request.read()  # aiohttp stops at client_max_size while reading: 413
    source = await _authenticated(
        request,
        source,
        lambda s: _authentic_with_body(s, request, raw, now),
        pre_body=False,
        refusal="invalid or missing signature",
    )
    remembered = None
    if source.auth_type == "standard-webhooks":
        remembered = await replay_guard.first_sighting(
            app[REDIS], source.id, request.headers["webhook-id"]
        )
        if remembered is None:
            raise errors.Unauthorized("this webhook-id was already received")
    elif (signature := timestamped_signature(source, request.headers)) is not None:
        remembered = await replay_guard.first_signature(app[REDIS], source.id, signature)
        if remembered is None:
            raise errors.Unauthorized("this signature was already received")
    try:
        # what is still to pay: a signed body, once its replay check passed (a captured
        # request sent again spends nothing), or what a compressed one inflated beyond
        # its declared length
        unpaid = len(raw) - paid_before
        if unpaid > 0:
            source = await _within_budget(app, source, lambda s: _spend_bytes(app, s, unpaid))
        return await _accept(request, source, raw, context)
    except Exception:
        if remembered:
            await replay_guard.forget(app[REDIS], remembered)
        raise


async def _accept(
    request: web.Request, source: SourceEntry, raw: bytes, context: dict[str, Any]
) -> web.Response:
    """Parse, rate-limit, commit and enqueue an authenticated request's events."""
    app = request.app
    if len(raw) > PARSE_ON_LOOP_BYTES:
        events, documents = await offload.run(parse_documents, raw)
    else:
        events, documents = parse_documents(raw)
    context["events"] = len(events)
    routes = await _routes(app, source)
    planned = _check_quota(app, source, events, routes)
    if source.rate_limit is not None:
        limit, count = source.rate_limit, len(events)
        wait = await app[LIMITER].admit(f"src:{source.id}", limit, count)
        if math.isinf(wait):
            raise errors.RateLimited(
                math.ceil(count / limit),
                f"a batch of {count} events exceeds this source's limit of {limit} events/s; "
                f"send batches of at most {limit}",
            )
        if wait > 0:
            raise errors.RateLimited(
                math.ceil(wait), f"over this source's limit of {limit} events/s"
            )
    source = await _within_budget(app, source, lambda s: _spend_deliveries(app, s, planned))
    paid = planned
    # The ordering keys, from the body's one parse, before the group commit (which only
    # looks them up); the parse is not kept while the commit is waited for.
    if len(events) * len(routes.targets) > KEYS_ON_LOOP:
        keys = await offload.run(order_keys, source.id, events, routes.targets, documents)
    else:
        keys = order_keys(source.id, events, routes.targets, documents)
    del documents
    budget = _budget(source)
    for _ in range(FRESH_TRIES):
        result = await app[GROUP_COMMIT].commit(
            IngestRequest(
                source.tenant_id,
                source.id,
                events,
                routes.targets,
                # the older of the two reads: the request was checked by both
                min(source.config_version, routes.config_version),
                keys,
            )
        )
        if not result.stale:
            break
        # the tenant's sources or targets changed since they were read: read them again
        INGEST_REROUTED.inc()
        now = time.time()
        source = await _source(app, source.id, fresh=True)
        if not (
            _authentic_before_body(source, request, now)
            and _authentic_with_body(source, request, raw, now)
        ):
            raise errors.Unauthorized("invalid or missing source credentials")
        routes = await _routes(app, source, fresh=True)
        planned = _check_quota(app, source, events, routes)
        if budget != _budget(source):  # changed meanwhile: the request pays the new one
            budget = _budget(source)
            await _spend_bytes(app, source, len(raw))
            await _spend_deliveries(app, source, planned)
            paid = planned
        elif planned > paid:  # routed afresh to more targets: the new ones are paid for
            await _spend_deliveries(app, source, planned - paid)
            paid = planned
        keys = order_keys(source.id, events, routes.targets)  # rare: each payload parsed again
    else:
        raise errors.Unavailable(
            "this source's configuration kept changing while the events were stored; retry"
        )
    context["deliveries"] = len(result.delivery_ids)
    context["duplicates"] = result.duplicates
    return respond({"event_ids": result.event_ids}, status=202)


def _check_quota(
    app: web.Application, source: SourceEntry, events: Sequence[ParsedEvent], routes: Routes
) -> int:
    """The deliveries storing ``events`` would create; 422 if more than one request may."""
    allowed = app[SETTINGS].max_deliveries_per_request
    planned = count_deliveries(source.id, events, routes.targets)
    if planned > allowed:
        raise errors.ValidationFailed(
            f"this request would create {planned} deliveries, more than the "
            f"{allowed} allowed per request; send smaller batches",
            details=[{"field": "body", "message": "too many deliveries for one request"}],
        )
    return planned


def _budget(source: SourceEntry) -> tuple[int | None, int | None]:
    return source.ingest_bytes_per_s, source.deliveries_per_s


async def _within_budget(
    app: web.Application, source: SourceEntry, spend: Callable[[SourceEntry], Awaitable[None]]
) -> SourceEntry:
    """``spend`` against the tenant's budget; a refusal by a cached budget is checked once
    more against the source read afresh (the budget may have just been raised or
    cleared through another process: read your writes). The source it passed with."""
    try:
        await spend(source)
    except errors.RateLimited:
        fresh = await _source(app, source.id, fresh=True)
        if _budget(fresh) == _budget(source):
            raise
        await spend(fresh)
        return fresh
    return source


async def _spend_bytes(app: web.Application, source: SourceEntry, size: int) -> None:
    """429 if the tenant's budget of ingest bytes per second has no room for ``size``.

    Its burst is a second's worth, or the largest body, whichever is more: any body
    the relay takes fits once the budget has recovered.
    """
    rate = source.ingest_bytes_per_s
    if rate is not None:
        burst = max(rate, app[SETTINGS].max_body_bytes)
        await spend_budget(
            app[LIMITER],
            "ingest_bytes",
            source.tenant_id,
            rate=rate,
            burst=burst,
            units=size,
            unit="ingest bytes",
        )


async def _spend_deliveries(app: web.Application, source: SourceEntry, planned: int) -> None:
    """429 if the tenant's budget of deliveries created per second has no room for
    ``planned`` (a second's worth may go at once; a request creating more never fits)."""
    rate = source.deliveries_per_s
    if rate is not None:
        await spend_budget(
            app[LIMITER],
            "deliveries",
            source.tenant_id,
            rate=rate,
            burst=rate,
            units=planned,
            unit="deliveries",
        )


async def ingest_events(request: web.Request) -> web.Response:
    """Accept one event or a batch; 202 once every event is committed."""
    started = time.perf_counter()
    context: dict[str, Any] = {"source_id": request.match_info["source_id"]}
    status = 500
    try:
        response = await _ingest(request, context)
        status = response.status
        return response
    except errors.RelayError as exc:
        status = exc.status
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    except BaseException as exc:
        if caller_gone(request, exc):
            status = CALLER_GONE  # no one waits for the answer
        raise
    finally:
        elapsed = time.perf_counter() - started
        INGEST_LATENCY.observe(elapsed)
        outcome = "accepted" if status == 202 else str(status)
        EVENTS_INGESTED.labels(outcome).inc(context.get("events", 1) if status == 202 else 1)
        log.info(
            "ingest",
            extra={
                **context,
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )


ROUTES = [
    Route(
        "POST",
        "/in/{source_id}",
        ingest_events,
        "Ingest one event or a batch",
        "source",
        status=202,
    ),
]
