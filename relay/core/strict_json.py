"""Standard JSON only: the one loader for every body the relay reads (pure, no I/O).

Python's ``json`` accepts more than JSON: ``NaN`` and ``Infinity``, duplicate
keys (the last wins, while a receiver reading the raw body may keep the first),
numbers too large to be numbers anywhere else, and strings that Postgres cannot
store (NUL) or that are not Unicode text at all (lone surrogates from ``\\ud800``
escapes). Each is refused here with the path of the value that broke the rule,
so a caller can name the field.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: Nesting deeper than this is refused (the management API's bodies are shallow).
MAX_DEPTH = 64
#: Integers with more digits than this are refused (Python refuses 4,300 and more).
MAX_INT_DIGITS = 1000


class NotStandardJSON(ValueError):
    """The text is not JSON, or uses what standard JSON does not allow."""


class BadString(ValueError):
    """A string (key or value) holds NUL or a lone surrogate; ``path`` names where."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def _constant(name: str) -> Any:
    raise NotStandardJSON(f"{name} is not a JSON number")


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise NotStandardJSON(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotStandardJSON(f"the number {text[:40]} is out of range")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise NotStandardJSON(f"the key {key[:60]!r} appears twice in one object")
            seen.add(key)
    return result


def string_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text (NUL, lone surrogate), or None."""
    return _string_problem(value)


def printable(value: str) -> str:
    """``value`` with NUL and lone surrogates escaped, safe to show in an error."""
    return value.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\u0000")


def _string_problem(value: str) -> str | None:
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (a lone surrogate was found)"
    return None


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def check_strings(data: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Raise BadString for the first string with NUL or a lone surrogate; bound the depth.

    Iterative, so a deep value costs no recursion.
    """
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if (problem := _string_problem(value)) is not None:
                raise BadString(path, problem)
        elif isinstance(value, dict) or isinstance(value, list):
            if depth >= max_depth:
                raise NotStandardJSON(f"the JSON is nested more than {max_depth} levels deep")
            if isinstance(value, dict):
                for key, item in value.items():
                    if (problem := _string_problem(key)) is not None:
                        raise BadString(
                            _join(path, key.encode("utf-8", "replace").decode()), problem
                        )
                    stack.append((item, _join(path, key), depth + 1))
            else:
                stack.extend((item, _join(path, i), depth + 1) for i, item in enumerate(value))


def _too_deep(data: Any, max_depth: int) -> bool:
    """Whether a container of ``data`` sits ``max_depth`` levels deep or more."""
    if not isinstance(data, dict | list):
        return False
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth >= max_depth:
            return True
        items = value.values() if isinstance(value, dict) else value
        stack.extend((item, depth + 1) for item in items if isinstance(item, dict | list))
    return False


def loads(raw: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse standard JSON; NotStandardJSON or BadString (both ValueError) if not.

    Strings are checked too, so what this returns can be stored in Postgres.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = json.loads(
            text,
            parse_constant=_constant,
            parse_int=_integer,
            parse_float=_float,
            object_pairs_hook=_object,
        )
    except UnicodeDecodeError:
        raise NotStandardJSON("the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise NotStandardJSON(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise NotStandardJSON(f"the JSON is nested more than {max_depth} levels deep") from None
    if isinstance(raw, bytes) and "\\u" not in text:
        # Without a \u escape no string can hold NUL or a lone surrogate: UTF-8 that
        # decodes has none, and the parser refuses raw control characters. Only the
        # depth is left to check, on containers alone (the walk that names every value's
        # path cost a batch of 1,000 events a tenth of its ingest).
        if text.count("{") + text.count("[") > max_depth and _too_deep(data, max_depth):
            raise NotStandardJSON(f"the JSON is nested more than {max_depth} levels deep")
        return data
    check_strings(data, max_depth=max_depth)
    return data
