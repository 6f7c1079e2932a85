"""Reading what people type into the console's filters and forms.

A bad value is a :class:`BadInput` naming the field in words, shown above the
form it came from; never a 500. Times typed without a zone are in the
viewer's zone when the page's script told us its offset (``tz``, minutes east
of UTC), else in UTC, which is what the form says without JavaScript.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from relay.api.routing import ID_PATTERN
from relay.core import strict_json

_ID = re.compile(ID_PATTERN)


class BadInput(ValueError):
    """A field the console could not read; the message says which and why."""


def text(data: Mapping[str, Any], name: str, *, label: str, max_length: int = 255) -> str | None:
    """A trimmed text field, or None when empty."""
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if len(value) > max_length:
        raise BadInput(f"{label} is longer than {max_length} characters")
    if strict_json.string_problem(value) is not None:
        raise BadInput(f"{label} holds characters that cannot be searched for")
    return value


def object_id(data: Mapping[str, Any], name: str, prefix: str, *, label: str) -> str | None:
    """An id of type ``prefix`` (``tgt``, ``ten``…), or None when empty."""
    value = text(data, name, label=label, max_length=64)
    if value is None:
        return None
    if not _ID.match(value) or not value.startswith(prefix + "_"):
        raise BadInput(f"{label} is not a {prefix}_… id")
    return value


def is_id(value: str, prefix: str) -> bool:
    """True when ``value`` is an id of type ``prefix`` (a path id that is not one is a 404)."""
    return bool(_ID.match(value)) and value.startswith(prefix + "_")


def cursor(data: Mapping[str, Any]) -> str | None:
    """The list cursor (an id from the previous page's ``next_cursor``)."""
    value = data.get("cursor")
    if not value:
        return None
    if not isinstance(value, str) or not _ID.match(value):
        raise BadInput("this page link is broken; start again from the first page")
    return value


def integer(data: Mapping[str, Any], name: str, *, label: str, low: int, high: int) -> int | None:
    """A whole number within ``low``..``high``, or None when empty."""
    value = text(data, name, label=label, max_length=12)
    if value is None:
        return None
    if not re.fullmatch(r"-?[0-9]+", value) or not low <= int(value) <= high:
        raise BadInput(f"{label} must be a whole number from {low} to {high}")
    return int(value)


def zone_offset(data: Mapping[str, Any]) -> timedelta:
    """The viewer's offset from UTC that the page's script reported (UTC without script)."""
    value = data.get("tz")
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,4}", value.strip()):
        minutes = int(value)
        if -14 * 60 <= minutes <= 14 * 60:
            return timedelta(minutes=minutes)
    return timedelta(0)


def moment(data: Mapping[str, Any], name: str, *, label: str) -> datetime | None:
    """A time: RFC 3339, or a date and time without zone (the viewer's, see ``zone_offset``)."""
    value = text(data, name, label=label, max_length=40)
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadInput(f"{label} is not a date and time such as 2026-11-28 12:00") from None
    try:
        # in the viewer's zone, the first and last days of the calendar can leave it
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC) - zone_offset(data)
        return parsed.astimezone(UTC)
    except OverflowError:
        raise BadInput(f"{label} is out of range once in UTC") from None


def ids(values: list[str], prefix: str, *, most: int) -> list[str]:
    """The selected ids of a form (checkboxes), each checked, at most ``most``."""
    chosen = list(dict.fromkeys(v for v in values if v))
    if len(chosen) > most:
        raise BadInput(f"select at most {most} at a time")
    for value in chosen:
        if not is_id(value, prefix):
            raise BadInput("a selected row is not a valid id; reload the page")
    return chosen


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def local_path(value: object) -> str | None:
    """A console path to go back to after a form (never another site).

    It goes into a ``Location`` header: a control character (CR, LF, DEL, VT, tab,
    C1) would break the answer, so a path holding one is not taken.
    """
    if (
        isinstance(value, str)
        and value.startswith("/console/")
        and not value.startswith("//")
        and "\\" not in value
        and not _CONTROL.search(value)
        and strict_json.string_problem(value) is None
        and len(value) <= 2000
    ):
        return value
    return None
