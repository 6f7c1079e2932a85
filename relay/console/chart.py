"""The overview's chart: deliveries by outcome per minute, as inline SVG drawn on the server.

No script draws it and no style attribute colours it (the console's CSP has
neither): bars carry classes the stylesheet colours, every bar a ``<title>``
in words, and the legend and totals under it say the same in text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from markupsafe import Markup, escape

from relay.store.console import MinuteOutcomes

#: Pixel height of the chart; its width is the page's. The bars are drawn in an inner SVG
#: whose units are (minute, percent of the y axis) and which stretches to the width, so
#: text stays outside it, placed in pixels and percentages, and is never distorted.
HEIGHT, PLOT_TOP, PLOT_HEIGHT = 220, 14, 176
#: Bottom to top in each bar.
SERIES = (("succeeded", "ok"), ("failed", "warn"), ("died", "bad"))


@dataclass(frozen=True)
class Totals:
    """What the chart shows, added up."""

    succeeded: int
    failed: int
    died: int

    @property
    def empty(self) -> bool:
        """True when nothing happened in the window."""
        return not (self.succeeded or self.failed or self.died)


def _ceiling(value: int) -> int:
    """A round, even number at or above ``value`` for the y axis (2, 4, 10, 20, 40, 100…):
    its half, the middle grid line's label, is a whole number of deliveries too."""
    step = 1
    while True:
        for m in (2, 4, 10):
            if step * m >= value:
                return step * m
        step *= 10


def totals(points: Sequence[MinuteOutcomes]) -> Totals:
    """The sums of the window."""
    return Totals(
        sum(p.succeeded for p in points), sum(p.failed for p in points), sum(p.died for p in points)
    )


def outcome_chart(points: Sequence[MinuteOutcomes], start: datetime, minutes: int) -> Markup:
    """Stacked bars of ``minutes`` minutes from ``start``; minutes absent from ``points`` are 0."""
    by_minute = {p.minute: p for p in points}
    peak = max((p.succeeded + p.failed + p.died for p in points), default=0)
    top = _ceiling(max(peak, 1))
    parts = [
        f'<svg class="chart" width="100%" height="{HEIGHT}" role="img" '
        'aria-labelledby="chart-title chart-desc">',
        '<title id="chart-title">Deliveries by outcome, per minute</title>',
        f'<desc id="chart-desc">{minutes} one-minute bars ending now: attempts that succeeded, '
        "attempts that failed, and deliveries that died.</desc>",
        f'<svg class="plot" x="0" y="{PLOT_TOP}" width="100%" height="{PLOT_HEIGHT}" '
        f'viewBox="0 0 {minutes} 100" preserveAspectRatio="none">',
    ]
    for fraction in (0, 0.5, 1):
        y = 100 * (1 - fraction)
        parts.append(
            f'<line class="grid" x1="0" x2="{minutes}" y1="{y:g}" y2="{y:g}" '
            'vector-effect="non-scaling-stroke"/>'
        )
    for i in range(minutes):
        minute = start + timedelta(minutes=i)
        point = by_minute.get(minute)
        if point is None:
            continue
        values = {"succeeded": point.succeeded, "failed": point.failed, "died": point.died}
        if not any(values.values()):
            continue
        title = escape(
            f"{minute:%H:%M} UTC: {point.succeeded} succeeded, {point.failed} failed, "
            f"{point.died} died"
        )
        parts.append(f"<g><title>{title}</title>")
        y = 100.0
        for name, css in SERIES:
            h = 100 * values[name] / top
            if h <= 0:
                continue
            y -= h
            parts.append(
                f'<rect class="{css}" x="{i + 0.12:.2f}" y="{y:.2f}" width="0.76" '
                f'height="{h:.2f}"/>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    for fraction in (0.5, 1):
        y = PLOT_TOP + PLOT_HEIGHT * (1 - fraction) - 4
        parts.append(f'<text class="axis" x="2" y="{y:.0f}">{top * fraction:g}</text>')
    hours = minutes // 60
    for h in range(hours + 1):
        x = 100 * h / max(hours, 1)
        label = "now" if h == hours else f"\u2212{hours - h} h"  # a minus sign
        anchor = "end" if h == hours else ("start" if h == 0 else "middle")
        parts.append(
            f'<text class="axis" x="{x:.2f}%" y="{HEIGHT - 6}" '
            f'text-anchor="{anchor}">{label}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
