"""Events: search by what SoftLedger sends (type, action, object id, uuid) and time; open one."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from relay.api.events import DETAIL_DELIVERIES, render_event
from relay.console import forms
from relay.console.render import PAGE_SIZE, page
from relay.console.session import VIEWER
from relay.core import errors
from relay.store import console as store
from relay.store import deliveries as delivery_store
from relay.store import events as event_store
from relay.store import tenants
from relay.store.console import EventSearch
from relay.web.app_keys import POOL

SEARCH_FIELDS = ("tenant", "object_type", "action", "object_id", "uuid", "since", "until", "tz")


class Events(web.View):
    """``/console/events``: events newest first, narrowed by the search form."""

    async def get(self) -> web.StreamResponse:
        request = self.request
        viewer = request[VIEWER]
        pool = request.app[POOL]
        query = request.query
        params = {k: v for k in SEARCH_FIELDS if (v := query.get(k))}
        context: dict[str, Any] = {
            "title": "Events",
            "params": params,
            "rows": [],
            "next_cursor": None,
            "cursor": None,
            "problem": None,
            "counts": {},
            "tenant_names": {},
            "tenant_choices": [],
            "searched": any(k in params for k in SEARCH_FIELDS if k != "tz"),
        }
        if viewer.is_operator:
            context["tenant_choices"], _ = await tenants.list_tenants(pool, 500, None)
        try:
            tenant_id = viewer.scope
            if viewer.is_operator:
                tenant_id = forms.object_id(query, "tenant", "ten", label="Tenant")
            search = EventSearch(
                object_type=forms.text(query, "object_type", label="Object type"),
                action=forms.text(query, "action", label="Action"),
                object_id=forms.text(query, "object_id", label="Object id"),
                upstream_uuid=forms.text(query, "uuid", label="Upstream uuid"),
                since=forms.moment(query, "since", label="From"),
                until=forms.moment(query, "until", label="Until"),
            )
            cursor = forms.cursor(query)
        except forms.BadInput as exc:
            context["problem"] = str(exc)
            return await page(request, "events.html", context, status=422)
        rows, next_cursor = await store.search_events(
            pool, tenant_id, search, limit=PAGE_SIZE, cursor=cursor
        )
        context.update(
            rows=rows,
            next_cursor=next_cursor,
            cursor=cursor,
            counts=await store.delivery_counts_of_events(pool, viewer.scope, [r.id for r in rows]),
            tenant_names=(
                await store.tenant_names(pool, [r.tenant_id for r in rows])
                if viewer.is_operator
                else {}
            ),
        )
        return await page(request, "events.html", context)


class EventDetail(web.View):
    """``/console/events/{id}``: the payload as received and its latest deliveries."""

    async def get(self) -> web.StreamResponse:
        request = self.request
        viewer = request[VIEWER]
        pool = request.app[POOL]
        event_id = request.match_info["event_id"]
        if not forms.is_id(event_id, "evt"):
            raise errors.NotFound()
        owner = viewer.scope or await store.owner_of(pool, "event", event_id)
        row = None if owner is None else await event_store.get_event(pool, owner, event_id)
        if row is None or owner is None:
            raise errors.NotFound()
        latest, _ = await delivery_store.deliveries_of_event(
            pool, owner, row.id, limit=DETAIL_DELIVERIES
        )
        deliveries = latest[::-1]
        counts = await store.delivery_counts_of_events(pool, owner, [row.id])
        return await page(
            request,
            "event.html",
            {
                "title": f"Event {row.id}",
                "event": render_event(row),
                "deliveries": deliveries,
                "earlier": sum(counts.get(row.id, {}).values()) - len(deliveries),
                "targets": await store.target_labels(
                    pool, owner, [d.target_id for d in deliveries]
                ),
                "tenant_name": (await store.tenant_names(pool, [owner])).get(owner)
                if viewer.is_operator
                else None,
            },
        )


def add_views(router: web.UrlDispatcher) -> None:
    """The event routes."""
    router.add_view("/events", Events)
    router.add_view("/events/{event_id}", EventDetail)
