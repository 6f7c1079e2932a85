"""Parsing an ingest body into events: pure functions, no I/O.

A body is one JSON object (stored byte for byte as received) or an array of
up to 1,000 objects (each stored as compact JSON, keys in the order received).
SoftLedger's fields are lifted into columns when present; any object is accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from relay.core import errors, strict_json

MAX_BATCH = 1000
#: Nesting an event may have (deeper is refused with 400, never a RecursionError).
MAX_DEPTH = 128
#: Upstream ids longer than this are not ids: refused rather than indexed.
MAX_UUID = 255
#: Extracted columns are for filtering and display; the payload keeps everything.
MAX_COLUMN = 255


@dataclass(frozen=True)
class ParsedEvent:
    """One event of an ingest body."""

    payload: bytes
    uuid: str | None
    date: str | None
    object_type: str | None
    action: str | None
    object_id: str | None
    tenant_ref: str | None


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str | int | float):
        return str(value)
    return None


def _event(obj: dict[str, Any], payload: bytes, where: str) -> ParsedEvent:
    uuid = _scalar(obj.get("uuid"))
    if uuid is not None and not 1 <= len(uuid) <= MAX_UUID:
        raise errors.ValidationFailed.field(f"{where}uuid", f"must be 1 to {MAX_UUID} characters")

    def column(name: str) -> str | None:
        value = _scalar(obj.get(name))
        return value[:MAX_COLUMN] if value is not None else None

    return ParsedEvent(
        payload=payload,
        uuid=uuid,
        date=column("date"),
        object_type=column("objectType"),
        action=column("action"),
        object_id=column("objectId"),
        tenant_ref=column("tenantId"),
    )


# (one encoder: json.dumps with options builds a new one per call, per event of a batch)
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def compact(obj: Any) -> bytes:
    """Compact JSON (no spaces), keys in their order, UTF-8 as received."""
    return _COMPACT.encode(obj).encode()


def parse_body(raw: bytes) -> list[ParsedEvent]:
    """The events of an ingest body; InvalidJSON/InvalidRequest/ValidationFailed if bad."""
    return parse_documents(raw)[0]


def parse_documents(raw: bytes) -> tuple[list[ParsedEvent], list[Any]]:
    """The events of an ingest body and each one's parsed JSON (the one parse of the body).

    Ordering keys are resolved in the parsed documents (``relay.ingest.routes``), so
    a body is parsed once however many targets name a JSON pointer into it.
    """
    try:
        data = strict_json.loads(raw, max_depth=MAX_DEPTH)
    except strict_json.BadString as exc:
        raise errors.InvalidJSON(
            f"{exc.message} (at {exc.path or 'the top'})",
            details=[{"field": exc.path or "body", "message": exc.message}],
        ) from None
    except strict_json.NotStandardJSON as exc:
        raise errors.InvalidJSON(str(exc)) from None
    if isinstance(data, dict):
        return [_event(data, raw, "")], [data]
    if not isinstance(data, list):
        raise errors.InvalidRequest("the body must be a JSON object or an array of objects")
    if not data:
        raise errors.InvalidRequest("the batch is empty")
    if len(data) > MAX_BATCH:
        raise errors.ValidationFailed(
            f"a batch holds at most {MAX_BATCH} events, not {len(data)}",
            details=[{"field": "body", "message": f"at most {MAX_BATCH} events"}],
        )
    events = []
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise errors.InvalidRequest(f"batch element {index} is not a JSON object")
        events.append(_event(item, compact(item), f"[{index}]."))
    return events, data
