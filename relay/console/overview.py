"""The overview: traffic of the last day, what waits or died now, and a chart of the last hours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiohttp import web

from relay.console.chart import outcome_chart, totals
from relay.console.operational import items
from relay.console.render import page
from relay.console.session import VIEWER
from relay.store import console as store
from relay.web.app_keys import POOL, SETTINGS

#: The window of the figures, and of the chart.
FIGURES_WINDOW = timedelta(hours=24)
CHART_MINUTES = 180
#: The latest operational events the overview lists.
OPERATIONAL_SHOWN = 10


class Overview(web.View):
    """``/console/``: the figures for the viewer (and per tenant for operators)."""

    async def get(self) -> web.StreamResponse:
        request = self.request
        viewer = request[VIEWER]
        pool = request.app[POOL]
        now = datetime.now(UTC)
        per_tenant = await store.figures_by_tenant(pool, viewer.scope, since=now - FIGURES_WINDOW)
        chart_start = now.replace(second=0, microsecond=0) - timedelta(minutes=CHART_MINUTES - 1)
        points = await store.outcomes_by_minute(pool, viewer.scope, since=chart_start)
        oldest_due = min((t.oldest_due_at for t in per_tenant if t.oldest_due_at), default=None)
        held = await store.held_deliveries(pool, viewer.scope)
        operational = await store.operational_events(pool, viewer.scope, limit=OPERATIONAL_SHOWN)
        return await page(
            request,
            "overview.html",
            {
                "title": "Overview",
                "tenants": per_tenant,
                "total": {
                    name: sum(getattr(t, name) for t in per_tenant)
                    for name in (
                        "events",
                        "succeeded",
                        "failed_attempts",
                        "pending",
                        "retrying",
                        "dead",
                        "due",
                    )
                },
                "oldest_due": oldest_due,
                "held": held,
                "operational": items(operational),
                "chart": outcome_chart(points, chart_start, CHART_MINUTES),
                "chart_totals": totals(points),
                "chart_hours": CHART_MINUTES // 60,
                "public_url": request.app[SETTINGS].public_url,
            },
        )


def add_views(router: web.UrlDispatcher) -> None:
    """The overview's route."""
    router.add_view("/", Overview)
