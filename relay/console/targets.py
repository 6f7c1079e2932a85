"""Targets: where a tenant's events go, how healthy each is, and what can be done to one.

Enabling, disabling, rotating the secret and sending a test event do what the
API's handlers do, through the same store functions, cache and wake-ups.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from relay.api.targets import render_target, test_payload
from relay.console import forms
from relay.console.operational import items
from relay.console.render import PAGE_SIZE, PREFIX, page, see_other
from relay.console.session import VIEWER, Viewer, flash
from relay.core import errors
from relay.core.crypto import new_webhook_secret
from relay.store import console as store
from relay.store import deliveries as delivery_store
from relay.store import events as event_store
from relay.store import targets as target_store
from relay.store import tenants
from relay.store.rows import Target
from relay.web.app_keys import CACHE, ENQUEUER, POOL, SECRETS, SETTINGS

#: The window of a target's health figures.
HEALTH_WINDOW = timedelta(hours=1)
#: Targets the operators' list across tenants shows at most.
ACROSS_LIMIT = 200
#: How the operators' list across tenants may be sorted, and what each is called.
SORTS: dict[store.TargetSort, str] = {
    "failing": "failing longest",
    "breaker": "circuit open",
    "success": "lowest success rate",
}


async def find_target(request: web.Request, viewer: Viewer, target_id: str) -> Target:
    """The live target if the viewer may see it; 404 otherwise (another tenant's included)."""
    pool = request.app[POOL]
    if not forms.is_id(target_id, "tgt"):
        raise errors.NotFound()
    owner = viewer.scope
    if owner is None:
        owner = await store.owner_of(pool, "target", target_id)
    row = None if owner is None else await target_store.get_target(pool, owner, target_id)
    if row is None:
        raise errors.NotFound()
    return row


async def chosen_tenant(request: web.Request, viewer: Viewer) -> tuple[str | None, list[Any]]:
    """The tenant a page is about: the viewer's own, or the one an operator picked (or None),
    and for operators the tenants to pick from."""
    if not viewer.is_operator:
        return viewer.scope, []
    rows, _ = await tenants.list_tenants(request.app[POOL], 500, None)
    try:
        picked = forms.object_id(request.query, "tenant", "ten", label="Tenant")
    except forms.BadInput:
        raise errors.NotFound() from None
    return picked, rows


class Targets(web.View):
    """``/console/targets``: a tenant's targets with their health."""

    async def get(self) -> web.StreamResponse:
        request = self.request
        viewer = request[VIEWER]
        pool = request.app[POOL]
        tenant_id, tenant_rows = await chosen_tenant(request, viewer)
        context: dict[str, Any] = {
            "title": "Targets",
            "tenant_id": tenant_id,
            "tenant_choices": tenant_rows,
            "rows": [],
            "next_cursor": None,
            "cursor": None,
            "health": {},
            "public_url": request.app[SETTINGS].public_url,
            "across": None,
        }
        if tenant_id is None and viewer.is_operator:
            # no tenant chosen: every tenant's targets, the troubled ones first
            wanted = request.query.get("sort")
            sort: store.TargetSort = next((s for s in SORTS if s == wanted), "failing")
            context.update(
                sort=sort,
                sorts=SORTS,
                across=await store.targets_across_tenants(
                    pool,
                    sort=sort,
                    since=datetime.now(UTC) - HEALTH_WINDOW,
                    limit=ACROSS_LIMIT,
                ),
                across_limit=ACROSS_LIMIT,
            )
        if tenant_id is not None:
            try:
                cursor = forms.cursor(request.query)
            except forms.BadInput:
                cursor = None
            rows, next_cursor = await target_store.list_targets(pool, tenant_id, PAGE_SIZE, cursor)
            context.update(
                rows=[(render_target(request, r), r.failing_since) for r in rows],
                next_cursor=next_cursor,
                cursor=cursor,
                health=await store.target_health(
                    pool,
                    tenant_id,
                    [r.id for r in rows],
                    since=datetime.now(UTC) - HEALTH_WINDOW,
                ),
            )
        return await page(request, "targets.html", context)


class TargetDetail(web.View):
    """``/console/targets/{id}``: one target, its health, its latest deliveries, its actions."""

    async def get(self) -> web.StreamResponse:
        request = self.request
        viewer = request[VIEWER]
        pool = request.app[POOL]
        row = await find_target(request, viewer, request.match_info["target_id"])
        owner = row.tenant_id
        recent, _ = await delivery_store.list_deliveries(
            pool, owner, limit=20, cursor=None, target_id=row.id
        )
        health = await store.target_health(
            pool, owner, [row.id], since=datetime.now(UTC) - HEALTH_WINDOW
        )
        return await page(
            request,
            "target.html",
            {
                "title": f"Target {row.id}",
                "target": render_target(request, row),
                "target_tenant": owner,
                "failing_since": row.failing_since,
                "secret_rotated_at": row.secret_rotated_at,
                "health": health.get(row.id, store.NO_TRAFFIC),
                "recent": recent,
                "operational": items(
                    await store.operational_events(pool, owner, target_id=row.id, limit=10)
                ),
                "events": await store.event_labels(pool, owner, [d.event_id for d in recent]),
                "tenant_name": (await store.tenant_names(pool, [owner])).get(owner)
                if viewer.is_operator
                else None,
            },
        )


class TargetAction(web.View):
    """``POST /console/targets/{id}/{action}``: enable, disable, rotate-secret, test."""

    async def post(self) -> web.StreamResponse:
        request = self.request
        action = request.match_info["action"]
        handler = _ACTIONS.get(action)
        if handler is None:
            raise errors.NotFound()
        row = await find_target(request, request[VIEWER], request.match_info["target_id"])
        return await handler(request, row)


async def _set_enabled(request: web.Request, row: Target, enabled: bool) -> web.StreamResponse:
    here = f"{PREFIX}/targets/{row.id}"
    if row.enabled == enabled:
        await flash(request, f"It was already {'enabled' if enabled else 'disabled'}.")
        return see_other(here)
    who = "an operator" if request[VIEWER].is_operator else "the tenant"
    changes = {
        "enabled": enabled,
        "disabled_reason": None if enabled else f"disabled in the console by {who}",
        "failing_since": None,
    }
    async with request.app[POOL].acquire() as conn:
        updated = await target_store.update_target(
            conn,
            row.tenant_id,
            row.id,
            changes,
            grace_s=request.app[SETTINGS].requeue_after_s,
        )
    if updated is None:
        raise errors.NotFound()
    request.app[CACHE].forget_tenant(row.tenant_id)
    if enabled:
        # what waited while it was disabled is due: wake it rather than wait for the sweeper
        request.app[ENQUEUER].wake_soon([(row.id, row.tenant_id)])
    await flash(
        request,
        "Enabled: deliveries flow again."
        if enabled
        else "Disabled: its deliveries wait until it is enabled.",
    )
    return see_other(here)


async def _enable(request: web.Request, row: Target) -> web.StreamResponse:
    return await _set_enabled(request, row, True)


async def _disable(request: web.Request, row: Target) -> web.StreamResponse:
    return await _set_enabled(request, row, False)


async def _rotate(request: web.Request, row: Target) -> web.StreamResponse:
    secret = new_webhook_secret()
    rotated = await target_store.rotate_target_secret(
        request.app[POOL],
        row.tenant_id,
        row.id,
        request.app[SECRETS].seal(secret, bound_to=row.id),
    )
    if rotated is None:
        raise errors.NotFound()
    # shown once, in this answer only: never in a redirect, a message or the session
    return await page(
        request,
        "secret.html",
        {
            "title": "New signing secret",
            "target_id": row.id,
            "secret": secret,
            "overlap_hours": request.app[SETTINGS].secret_overlap_s / 3600,
        },
    )


async def _test(request: web.Request, row: Target) -> web.StreamResponse:
    here = f"{PREFIX}/targets/{row.id}"
    if not row.enabled:
        await flash(request, "The target is disabled; enable it first.", "error")
        return see_other(here)
    async with request.app[POOL].acquire() as conn:
        _, delivery_id = await event_store.create_test_event(
            conn,
            row.tenant_id,
            row.id,
            test_payload(),
            enqueue_grace_s=request.app[SETTINGS].requeue_after_s,
        )
    if delivery_id is None:  # deleted or disabled meanwhile
        raise errors.NotFound()
    request.app[ENQUEUER].wake_soon([(row.id, row.tenant_id)])
    await flash(request, "Test event sent: this page follows its delivery.")
    return see_other(f"{PREFIX}/deliveries/{delivery_id}")


_ACTIONS = {"enable": _enable, "disable": _disable, "rotate-secret": _rotate, "test": _test}


def add_views(router: web.UrlDispatcher) -> None:
    """The target routes."""
    router.add_view("/targets", Targets)
    router.add_view("/targets/{target_id}", TargetDetail)
    router.add_view("/targets/{target_id}/{action}", TargetAction)
