"""Schemathesis hooks for the conformance test (loaded by schemathesis, not by pytest).

One refusal cannot be said in a schema: ids in a body that name no resource of
the tenant (``source_ids`` of a target, ``target_ids`` of a replay) are 422
even though they are well-formed; nor can a PATCH's refusal of what the
target's kind (set at creation) forbids: a different ``kind``, or ``ordering``
or ``source_ids`` on an operational target. Only those failures, with exactly
those answers, are dropped, and a pattern's refusal of a value ending in a newline
that the generator's ``$`` (Python's ``re``) let through; every other mismatch
still fails the run.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis

#: Fields whose well-formed values may name nothing (422 "unknown ..." or "disabled ..."),
#: or a delivery of a deleted target (422 "... belongs to a deleted target ...").
REFERENCES = {"source_ids", "target_ids", "ids", "delivery_id"}


#: Fields a PATCH may not change given the target's kind, set at creation (its current
#: state, which a schema of the request cannot see).
KIND_BOUND = {"kind", "ordering", "source_ids"}


def _names_nothing_live(message: str) -> bool:
    return message.startswith(("unknown ", "disabled ")) or "belongs to a deleted target" in message


def _bound_by_kind(field: Any, message: str) -> bool:
    return field in KIND_BOUND and message.startswith(("an operational target", "is set at"))


def _field(body: Any, path: str) -> Any:
    """The value at ``path`` ("auth.basic.username") of a request body, or None."""
    for part in path.split("."):
        if not isinstance(body, dict):
            return None
        body = body.get(part)
    return body


def _dollar_before_newline(body: Any, detail: dict[str, Any]) -> bool:
    """A pattern refusal of a value ending in a newline that Python's ``re`` lets through.

    The generator reads patterns with Python's ``re``, whose ``$`` also matches before
    a final newline; JSON Schema's (ECMA-262) and the API's do not: ``"a\n"`` is
    not a valid username for either. Not the API's mismatch, the generator's.
    """
    value = _field(body, str(detail.get("field", "")))
    return (
        isinstance(value, str)
        and value.endswith("\n")
        and str(detail.get("message", "")).startswith("String should match pattern")
    )


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but a 422 naming only unknown referenced ids.

    Or only values the generator made valid by its regex engine's ``$`` alone. And
    drop an "invalid request accepted" that was refused 413 for its size: a body past
    the cap (a batch of over 1,000 events can weigh over 1 MiB) is refused before it is
    parsed, and schemathesis does not count 413 among refusals.
    """
    if failure.code == "ST201" and response.status_code == 413:
        try:
            return bool(json.loads(response.content)["error"]["code"] != "payload_too_large")
        except (ValueError, KeyError, TypeError):
            return True
    if failure.code != "ST202" or response.status_code != 422:
        return True
    try:
        details = json.loads(response.content)["error"]["details"]
    except (ValueError, KeyError, TypeError):
        return True
    unknown_refs = all(
        (d.get("field") in REFERENCES and _names_nothing_live(str(d.get("message", ""))))
        or (case.method == "PATCH" and _bound_by_kind(d.get("field"), str(d.get("message", ""))))
        or _dollar_before_newline(case.body, d)
        for d in details
    )
    return not (details and unknown_refs)
