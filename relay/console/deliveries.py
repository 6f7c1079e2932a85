"""A delivery's story: the event it carries, each attempt, and what was signed and sent."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from relay.api.deliveries import DETAIL_ATTEMPTS
from relay.api.events import render_event
from relay.api.targets import render_target
from relay.console import forms
from relay.console.render import PREFIX, fragment, page, see_other
from relay.console.session import VIEWER, Viewer, flash
from relay.core import errors
from relay.store import console as store
from relay.store import deliveries as delivery_store
from relay.store import events as event_store
from relay.store import targets as target_store
from relay.store.db import Pool
from relay.store.rows import AttemptRecord, Delivery
from relay.web.app_keys import ENQUEUER, POOL, SETTINGS

FINAL = frozenset({"succeeded", "dead"})


async def find_delivery(pool: Pool, viewer: Viewer, delivery_id: str) -> Delivery:
    """The delivery if the viewer may see it; 404 otherwise (another tenant's included)."""
    if not forms.is_id(delivery_id, "dlv"):
        raise errors.NotFound()
    if viewer.is_operator:
        row = await delivery_store.get_delivery_any_tenant(pool, delivery_id)
    else:
        assert viewer.tenant_id is not None
        row = await delivery_store.get_delivery(pool, viewer.tenant_id, delivery_id)
    if row is None:
        raise errors.NotFound()
    return row


@dataclass(frozen=True)
class SignedAttempt:
    """An attempt and the signature headers it carried (never a secret)."""

    attempt: AttemptRecord
    #: ``webhook-timestamp``: when it was signed, in Unix seconds
    timestamp: int
    #: how many ``v1,…`` entries ``webhook-signature`` held (2 during a rotation)
    signatures: int


def signed_attempts(
    attempts: list[AttemptRecord],
    rotated_at: datetime | None,
    had_previous: bool,
    overlap_s: float,
) -> list[SignedAttempt]:
    """Each attempt with its signing time and how many secrets signed it."""
    shown = []
    for a in attempts:
        both = (
            had_previous
            and rotated_at is not None
            and rotated_at <= a.started_at
            and a.started_at.timestamp() < rotated_at.timestamp() + overlap_s
        )
        shown.append(SignedAttempt(a, int(a.started_at.timestamp()), 2 if both else 1))
    return shown


async def _story(request: web.Request, delivery: Delivery) -> dict[str, Any]:
    pool = request.app[POOL]
    owner = delivery.tenant_id
    target = await target_store.get_target(pool, owner, delivery.target_id)
    latest, _ = await delivery_store.attempts_page(pool, delivery.id, limit=DETAIL_ATTEMPTS)
    attempts = latest[::-1]
    made = await store.attempts_made(pool, delivery.id) if len(latest) == DETAIL_ATTEMPTS else 0
    label = (await store.target_labels(pool, owner, [delivery.target_id])).get(delivery.target_id)
    return {
        "delivery": delivery,
        "final": delivery.status in FINAL,
        "target": None if target is None else render_target(request, target),
        "target_url": label.url if label else None,
        #: attempts made before the ones shown (the page shows the latest)
        "earlier": max(0, made - len(attempts)),
        "attempts": signed_attempts(
            attempts,
            target.secret_rotated_at if target is not None else None,
            target is not None and target.previous_secret_enc is not None,
            request.app[SETTINGS].secret_overlap_s,
        ),
    }


class DeliveryStory(web.View):
    """``/console/deliveries/{id}``: the whole story of one delivery."""

    async def get(self) -> web.StreamResponse:
        request = self.request
        viewer = request[VIEWER]
        pool = request.app[POOL]
        delivery = await find_delivery(pool, viewer, request.match_info["delivery_id"])
        event = await event_store.get_event(pool, delivery.tenant_id, delivery.event_id)
        names = await store.tenant_names(pool, [delivery.tenant_id]) if viewer.is_operator else {}
        return await page(
            request,
            "delivery.html",
            {
                "title": f"Delivery {delivery.id}",
                "event": None if event is None else render_event(event),
                "tenant_name": names.get(delivery.tenant_id),
                **await _story(request, delivery),
            },
        )


class DeliveryLive(web.View):
    """``/console/deliveries/{id}/live``: its status and attempts, for the page to refresh."""

    async def get(self) -> web.StreamResponse:
        request = self.request
        delivery = await find_delivery(
            request.app[POOL], request[VIEWER], request.match_info["delivery_id"]
        )
        return fragment(request, "_delivery_live.html", await _story(request, delivery))


class RetryDelivery(web.View):
    """``POST /console/deliveries/{id}/retry``: send it again with a fresh schedule (as the API)."""

    async def post(self) -> web.StreamResponse:
        request = self.request
        pool = request.app[POOL]
        delivery = await find_delivery(pool, request[VIEWER], request.match_info["delivery_id"])
        here = f"{PREFIX}/deliveries/{delivery.id}"
        try:
            async with pool.acquire() as conn:
                row = await delivery_store.retry_delivery(
                    conn,
                    delivery.tenant_id,
                    delivery.id,
                    enqueue_grace_s=request.app[SETTINGS].requeue_after_s,
                )
        except delivery_store.TargetDeleted:
            await flash(request, "Its target was deleted: it is never sent again.", "error")
            return see_other(here)
        if row is None:
            await flash(request, "An attempt is in flight right now; try again when it ends.")
            return see_other(here)
        request.app[ENQUEUER].wake_soon([(row.target_id, row.tenant_id)])
        await flash(request, "Sent again: back to pending with a fresh schedule.")
        return see_other(here)


def add_views(router: web.UrlDispatcher) -> None:
    """The delivery routes."""
    router.add_view("/deliveries/{delivery_id}", DeliveryStory)
    router.add_view("/deliveries/{delivery_id}/live", DeliveryLive)
    router.add_view("/deliveries/{delivery_id}/retry", RetryDelivery)
