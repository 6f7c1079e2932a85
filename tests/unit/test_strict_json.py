"""Standard JSON only: what the one loader accepts and refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relay.core import strict_json

# Any standard JSON value whose strings Postgres can store
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
_json: Any = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_text, children, max_size=5),
    max_leaves=30,
)


@given(_json)
def test_standard_json_round_trips(value: Any) -> None:
    assert strict_json.loads(json.dumps(value)) == value
    assert strict_json.loads(json.dumps(value, ensure_ascii=False).encode()) == value


@given(_text, _text, st.sampled_from(["\x00", "\ud800", "\udfff"]))
def test_any_string_with_nul_or_a_lone_surrogate_is_refused(
    before: str, after: str, bad: str
) -> None:
    # as text, and as the bytes the gateway reads (where the escape is the only way in)
    for document in ({"k": before + bad + after}, {before + bad + after: 1}, [before + bad]):
        for body in (json.dumps(document), json.dumps(document).encode()):
            with pytest.raises(strict_json.BadString):
                strict_json.loads(body)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"a": NaN}', "NaN"),
        (b'{"a": Infinity}', "Infinity"),
        (b'{"a": -Infinity}', "-Infinity"),
        (b'{"a": 1, "a": 2}', "twice"),
        (b"1e999", "out of range"),
        (b"1" + b"0" * 5000, "digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (b"[" * 65 + b"]" * 65, "nested"),
        (b'"\xff"', "UTF-8"),
        (b"{", "not valid JSON"),
    ],
)
def test_what_standard_json_does_not_allow_is_refused(raw: bytes, says: str) -> None:
    with pytest.raises(strict_json.NotStandardJSON, match=says):
        strict_json.loads(raw)


def test_the_path_of_a_bad_string_is_named() -> None:
    with pytest.raises(strict_json.BadString) as caught:
        strict_json.loads('{"filter": {"objectType": ["ok", "b\\u0000d"]}}')
    assert caught.value.path == "filter.objectType[1]"


def test_depth_is_a_parameter() -> None:
    deep = "[" * 100 + "]" * 100
    assert strict_json.loads(deep, max_depth=128)
    with pytest.raises(strict_json.NotStandardJSON):
        strict_json.loads(deep)


def _nest(depth: int, shape: list[bool], leaf: Any) -> Any:
    value = leaf
    for i in range(depth):
        value = {"k": value} if shape[i % len(shape)] else [1, value]
    return value


@example(64, [False], "plain", True)
@example(65, [True], "plain", True)
@example(65, [False, True], "é", False)
@given(
    st.integers(min_value=0, max_value=80),
    st.lists(st.booleans(), min_size=1, max_size=5),
    st.sampled_from(["plain", "é", "esc\u00e9", "tab\t"]),
    st.booleans(),
)
def test_bytes_and_text_are_held_to_the_same_depth(
    depth: int, shape: list[bool], leaf: str, ascii_only: bool
) -> None:
    # a body of bytes without a \u escape takes the short way (containers only):
    # it refuses exactly what the full walk refuses
    raw = json.dumps(_nest(depth, shape, leaf), ensure_ascii=ascii_only)
    outcomes = []
    for body in (raw, raw.encode()):
        try:
            outcomes.append(("ok", strict_json.loads(body)))
        except strict_json.NotStandardJSON as exc:
            outcomes.append(("refused", str(exc)))
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0][0] == "refused") == (depth > strict_json.MAX_DEPTH)
