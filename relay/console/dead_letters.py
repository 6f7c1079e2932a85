"""Dead letters: filter, select, replay after a confirmation, and (operators) purge.

Replays go through the API's own ``replay_dead_letters`` (the same selection
rules, the same wake-ups, the same worker job for large selections); purges
through the store function ``relay dlq purge`` uses. A selection the API can
express (tenant, target, since) is replayed whole by the API's path; one with
the console's extra filters (until, status code, error text) is replayed by
id, at most ``MAX_REPLAY_IDS`` per confirmation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aiohttp import web
from multidict import MultiMapping

from relay.api.deliveries import MAX_REPLAY_IDS, DeletedTargetLetters, replay_dead_letters
from relay.console import forms
from relay.console.render import PAGE_SIZE, PREFIX, page, see_other
from relay.console.session import VIEWER, Viewer, flash
from relay.core import errors
from relay.store import console as store
from relay.store import dead_letters, tenants
from relay.store import targets as target_store
from relay.store.dead_letters import DeadLetterFilter
from relay.web.app_keys import POOL

#: Filter fields, as the list's query string and the forms' hidden fields carry them.
FILTER_FIELDS = ("tenant", "target", "since", "until", "status", "error", "tz")


@dataclass(frozen=True)
class Selection:
    """Whose dead letters (None: every tenant's, operators only) and which."""

    tenant_id: str | None
    flt: DeadLetterFilter


def read_selection(viewer: Viewer, data: Mapping[str, Any]) -> Selection:
    """The filter of a list or a form; a tenant is always held to its own."""
    tenant = viewer.scope
    if viewer.is_operator:
        tenant = forms.object_id(data, "tenant", "ten", label="Tenant")
    flt = DeadLetterFilter(
        target_id=forms.object_id(data, "target", "tgt", label="Target"),
        since=forms.moment(data, "since", label="From"),
        until=forms.moment(data, "until", label="Until"),
        status_code=forms.integer(data, "status", label="Status code", low=100, high=599),
        error=forms.text(data, "error", label="Error text", max_length=200),
    )
    if flt.since and flt.until and flt.since >= flt.until:
        raise forms.BadInput("From must be before Until")
    return Selection(tenant, flt)


def filter_params(data: Mapping[str, Any]) -> dict[str, str]:
    """The filter fields of ``data`` as they were typed, to carry from page to page."""
    return {k: v for k in FILTER_FIELDS if isinstance(v := data.get(k), str) and v}


async def _choices(request: web.Request, tenant_id: str | None) -> dict[str, Any]:
    """Tenants (for operators) and the tenant's targets, for the filter's menus."""
    pool = request.app[POOL]
    viewer = request[VIEWER]
    tenant_rows: list[Any] = []
    if viewer.is_operator:
        tenant_rows, _ = await tenants.list_tenants(pool, 500, None)
    target_rows: list[Any] = []
    if tenant_id is not None:
        target_rows, _ = await target_store.list_targets(pool, tenant_id, 500, None)
    return {"tenant_choices": tenant_rows, "target_choices": target_rows}


class DeadLetters(web.View):
    """``/console/dead-letters``: the list, filtered, a page at a time."""

    async def get(self) -> web.StreamResponse:
        request = self.request
        viewer = request[VIEWER]
        pool = request.app[POOL]
        params = filter_params(request.query)
        context: dict[str, Any] = {
            "title": "Dead letters",
            "params": params,
            "rows": [],
            "next_cursor": None,
            "matching": 0,
            "matching_capped": False,
            "problem": None,
            "cursor": None,
            "max_ids": MAX_REPLAY_IDS,
            "filtered": False,
            # the purge form's suggestion: what died more than a week ago
            "purge_default": (datetime.now(UTC) - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M"),
        }
        try:
            selection = read_selection(viewer, request.query)
            cursor = forms.cursor(request.query)
        except forms.BadInput as exc:
            context["problem"] = str(exc)
            context.update(await _choices(request, viewer.scope))
            return await page(request, "dead_letters.html", context, status=422)
        rows, next_cursor = await dead_letters.list_dead_letters(
            pool, selection.tenant_id, selection.flt, limit=PAGE_SIZE, cursor=cursor
        )
        matching, capped = await dead_letters.count_dead_letters_shown(
            pool, selection.tenant_id, selection.flt
        )
        context.update(
            rows=rows,
            next_cursor=next_cursor,
            cursor=cursor,
            matching=matching,
            matching_capped=capped,
            targets=await store.target_labels(pool, viewer.scope, [r.target_id for r in rows]),
            events=await store.event_labels(pool, viewer.scope, [r.event_id for r in rows]),
            tenant_names=(
                await store.tenant_names(pool, [r.tenant_id for r in rows])
                if viewer.is_operator
                else {}
            ),
            filtered=any(k in params for k in FILTER_FIELDS if k != "tz"),
            **await _choices(request, selection.tenant_id),
        )
        return await page(request, "dead_letters.html", context)


Scope = Literal["selected", "all"]


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay will do: how many, and how."""

    count: int
    #: the ids to replay (None: the API's whole-selection replay)
    ids: list[str] | None
    #: more match than one replay by id takes
    capped: bool


async def plan_replay(
    request: web.Request, selection: Selection, scope: Scope, ids: list[str]
) -> ReplayPlan:
    """Count what a replay will send, exactly as it will select it."""
    pool = request.app[POOL]
    owner, flt = selection.tenant_id, selection.flt
    # a deleted target's dead letters are never replayed, so never counted as to be sent
    if scope == "selected":
        count = await dead_letters.count_dead_letters(
            pool, owner, DeadLetterFilter(ids=ids, replayable=True)
        )
        return ReplayPlan(count, ids, capped=False)
    if flt.api_selectable:
        up_to = await dead_letters.newest_dead_letter_id(pool)
        count = (
            0
            if up_to is None
            else await dead_letters.count_dead_letters(
                pool,
                owner,
                DeadLetterFilter(
                    target_id=flt.target_id, since=flt.since, up_to_id=up_to, replayable=True
                ),
            )
        )
        return ReplayPlan(count, None, capped=False)
    replayable = dataclasses.replace(flt, replayable=True)
    matching = await dead_letters.count_dead_letters(pool, owner, replayable)
    chosen = await dead_letters.dead_letter_ids(pool, owner, replayable, limit=MAX_REPLAY_IDS)
    return ReplayPlan(len(chosen), chosen, capped=matching > len(chosen))


class Replay(web.View):
    """``POST /console/dead-letters/replay``: a confirmation with the count, then the replay."""

    async def post(self) -> web.StreamResponse:
        request = self.request
        viewer = request[VIEWER]
        form = await request.post()
        back = forms.local_path(form.get("next")) or f"{PREFIX}/dead-letters"
        scope: Scope = "all" if form.get("scope") == "all" else "selected"
        try:
            selection = read_selection(viewer, form)
            chosen = forms.ids(_strings(form, "ids"), "dlv", most=MAX_REPLAY_IDS)
        except forms.BadInput as exc:
            await flash(request, str(exc), "error")
            return see_other(back)
        if scope == "selected" and not chosen:
            await flash(request, "Select at least one dead letter to replay.", "error")
            return see_other(back)
        if form.get("confirm") != "yes":
            plan = await plan_replay(request, selection, scope, chosen)
            return await page(
                request,
                "confirm_replay.html",
                {
                    "title": "Replay dead letters?",
                    "plan": plan,
                    "scope": scope,
                    "ids": chosen,
                    "params": filter_params(form),
                    "next": back,
                },
            )
        plan = await plan_replay(request, selection, scope, chosen)
        try:
            count = await replay_dead_letters(
                request,
                selection.tenant_id,
                target_id=selection.flt.target_id if plan.ids is None else None,
                since=selection.flt.since if plan.ids is None else None,
                ids=plan.ids,
            )
        except DeletedTargetLetters as exc:
            shown = ", ".join(exc.ids[:3]) + (
                f" and {len(exc.ids) - 3} more" if len(exc.ids) > 3 else ""
            )
            await flash(
                request,
                f"Nothing was replayed: {shown} belong to deleted targets and are never sent"
                " again. Leave them out of the selection.",
                "error",
            )
            return see_other(back)
        noun = "dead letter" if count == 1 else "dead letters"
        if not count:
            message = "Nothing was replayed: none of them is a dead letter any more."
        elif plan.ids is None:
            message = f"Replaying {count} {noun}: a worker puts them back to pending in batches."
        else:
            message = f"Replayed {count} {noun}: back to pending"
            held = await store.held_deliveries(
                request.app[POOL], selection.tenant_id, delivery_ids=plan.ids
            )
            reasons = {
                "circuit": "their target's circuit breaker is open: they go after a probe succeeds",
                "disabled": "their target is disabled: they go once it is enabled again",
                "rate_limit": "their target's rate limit defers them",
            }
            waits = [f"{h.deliveries} wait, as {reasons[h.reason]}" for h in held]
            message += "; " + "; ".join(waits) + "." if waits else ", sent again within seconds."
        await flash(request, message)
        return see_other(back)


class Purge(web.View):
    """``POST /console/dead-letters/purge`` (operators): delete dead letters made before a time."""

    async def post(self) -> web.StreamResponse:
        request = self.request
        viewer = request[VIEWER]
        if not viewer.is_operator:
            raise errors.NotFound()
        form = await request.post()
        back = f"{PREFIX}/dead-letters"
        try:
            tenant_id = forms.object_id(form, "tenant", "ten", label="Tenant")
            target_id = forms.object_id(form, "target", "tgt", label="Target")
            older_than = forms.moment(form, "older_than", label="Made before")
        except forms.BadInput as exc:
            await flash(request, str(exc), "error")
            return see_other(back)
        if older_than is None:
            await flash(request, "Say before when: dead letters made before that are deleted.")
            return see_other(back)
        pool = request.app[POOL]
        if form.get("confirm") != "yes":
            count = await dead_letters.count_dead_letters(
                pool, tenant_id, DeadLetterFilter(target_id=target_id, until=older_than)
            )
            return await page(
                request,
                "confirm_purge.html",
                {
                    "title": "Purge dead letters?",
                    "count": count,
                    "older_than": older_than,
                    "fields": {
                        k: v for k in ("tenant", "target", "older_than", "tz") if (v := form.get(k))
                    },
                    "tenant_id": tenant_id,
                    "target_id": target_id,
                },
            )
        async with pool.acquire() as conn:
            # as `relay dlq purge`: a key blocked on a purged letter goes on (the sweeper sends it)
            purged = await dead_letters.purge_dead_letters(
                conn, tenant_id, target_id=target_id, older_than=older_than, enqueue_grace_s=0
            )
        await flash(request, f"Purged {purged} dead letter{'s' if purged != 1 else ''}.")
        return see_other(back)


def _strings(form: MultiMapping[Any], name: str) -> list[str]:
    return [v for v in form.getall(name, []) if isinstance(v, str)]


def add_views(router: web.UrlDispatcher) -> None:
    """The dead-letter routes."""
    router.add_view("/dead-letters", DeadLetters)
    router.add_view("/dead-letters/replay", Replay)
    router.add_view("/dead-letters/purge", Purge)
