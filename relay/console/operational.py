"""The console's lists of operational events: on the overview, and on a target's page."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from relay.store.console import OperationalRow


@dataclass(frozen=True)
class OperationalItem:
    """One operational event as a line of the console: what, about what, and why."""

    id: str
    tenant_id: str
    at: datetime
    what: str
    object_type: str
    object_id: str
    target_id: str | None
    summary: str
    #: "bad" (a death, a disabling, an opening), "ok" (a closing, a recovery) or "warn"
    tone: str


_TONE = {
    "disabled": "bad",
    "circuit_opened": "bad",
    "dead": "bad",
    "key_blocked": "warn",
    "circuit_closed": "ok",
    "recovered": "ok",
}


def _summary(action: str, data: dict[str, Any]) -> str:
    if action == "disabled":
        return f"disabled: {data.get('reason') or 'no reason recorded'}"
    if action == "circuit_opened":
        until = f" until {data['until']}" if data.get("until") else ""
        return f"breaker opened{until}: {data.get('reason') or 'failures in a row'}"
    if action == "circuit_closed":
        return "breaker closed: deliveries go out again"
    if action == "recovered":
        return f"delivering again after failing since {data.get('failing_since')}"
    if action == "key_blocked":
        return f"key {data.get('key')} waits on dead letter {data.get('delivery_id')}"
    if action == "dead":
        code = data.get("last_status_code")
        last = f"HTTP {code}" if code is not None else (data.get("last_error") or "no answer")
        n = data.get("attempts")
        return f"dead after {n} attempt{'' if n == 1 else 's'} ({last})"
    return json.dumps(data)[:200]


def items(rows: list[OperationalRow]) -> list[OperationalItem]:
    """The rows as the console shows them."""
    out = []
    for r in rows:
        try:
            data = json.loads(r.data) if r.data else {}
        except ValueError:  # pragma: no cover - the relay writes them
            data = {}
        out.append(
            OperationalItem(
                id=r.id,
                tenant_id=r.tenant_id,
                at=r.received_at,
                what=f"{r.object_type} {r.action}",
                object_type=r.object_type,
                object_id=r.object_id,
                target_id=r.target_id,
                summary=_summary(r.action, data if isinstance(data, dict) else {}),
                tone=_TONE.get(r.action, "warn"),
            )
        )
    return out
