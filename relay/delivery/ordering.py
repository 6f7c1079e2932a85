"""Ordered delivery: the key that puts an event in its target's per-object order.

A target with ``ordering: "object"`` delivers the events of one key one at a
time, in the order they were received. The key is the event's
``(objectType, objectId)``, or, when the target names ``ordering_key`` (a JSON
pointer, RFC 6901), the value there in the payload. An event without a key (a
field missing or null) is not ordered.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import jsonpointer

Ordering = Literal["none", "object"]
OnDead = Literal["skip", "block"]

#: Keys longer than this are stored as their SHA-256 (a key is compared, never shown).
MAX_KEY_CHARS = 200
_MISSING = object()


def check_pointer(pointer: str) -> str | None:
    """Why ``pointer`` is not a usable JSON pointer into a payload (None: it is)."""
    if not pointer.startswith("/"):
        return "must be a JSON pointer such as /data/invoice/id (it starts with /)"
    try:
        parsed = jsonpointer.JsonPointer(pointer)
    except jsonpointer.JsonPointerException as exc:
        return f"not a JSON pointer: {exc}"
    if "-" in parsed.parts:
        # RFC 6901: "-" names the element after an array's last, which holds no value
        return 'a "-" token names the end of an array, which holds no key'
    return None


# (one encoder: json.dumps with options builds a new one per call, per event and target)
_CANONICAL = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _canonical(value: Any) -> str:
    return _CANONICAL.encode(value)


def _bounded(key: str) -> str:
    if len(key) <= MAX_KEY_CHARS:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def object_key(object_type: str | None, object_id: str | None) -> str | None:
    """The key of a SoftLedger envelope: its objectType and objectId (None if either lacks)."""
    if object_type is None or object_id is None:
        return None
    return _bounded(_canonical([object_type, object_id]))


def pointer_key(pointer: str, payload: bytes) -> str | None:
    """The key at ``pointer`` in the JSON ``payload`` (None: absent, null, or not resolvable)."""
    try:
        document = json.loads(payload)
    except ValueError:
        return None
    return document_key(pointer, document)


def document_key(pointer: str, document: Any) -> str | None:
    """The key at ``pointer`` in an already parsed payload (None: absent, null, or not
    resolvable).

    Ingest parses a body once and resolves each distinct pointer of its targets
    in that one parse (relay/ingest/routes.py ``EventKeys``). Whatever the
    pointer (a target stored before ``check_pointer`` refused "-", an index past
    the end, a token into a string) and whatever the payload, an event whose key
    cannot be read is not ordered: this never raises.
    """
    try:
        value = jsonpointer.resolve_pointer(document, pointer, _MISSING)
    except (jsonpointer.JsonPointerException, ValueError, TypeError, LookupError):
        return None  # e.g. a pointer into an array with a non-numeric token
    if value is _MISSING or value is None or isinstance(value, jsonpointer.EndOfList):
        return None  # "-": the end of an array holds nothing
    return _bounded(_canonical(value))
