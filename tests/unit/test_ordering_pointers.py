"""An ordering key pointer that resolves strangely leaves the event unordered, never raises."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.delivery.ordering import check_pointer, pointer_key

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["a", "-", "0", "1", "b", ""]), inner, max_size=4)
    ),
    max_leaves=20,
)
STRANGE = st.sampled_from(["-", "01", "-1", "", "~0", "~1", "1e0", " 1", "x", "99"])


@st.composite
def walks(draw: st.DrawFn) -> tuple[str, Any]:
    """A payload and a pointer that follows it some way, then strays (an index past the end…)."""
    doc = draw(JSON)
    node, tokens = doc, []
    for _ in range(draw(st.integers(1, 4))):
        known: list[str] = []
        if isinstance(node, dict):
            known = list(node)
        elif isinstance(node, list):
            known = [str(i) for i in range(len(node))]
        token = draw(st.sampled_from(known) | STRANGE) if known else draw(STRANGE)
        tokens.append(token)
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token in known:
            node = node[int(token)]
        else:
            node = None
    pointer = "/" + "/".join(t.replace("~", "~0").replace("/", "~1") for t in tokens)
    return pointer, doc


def test_the_end_of_an_array_is_no_key() -> None:
    assert pointer_key("/a/-", b'{"a": [1, 2]}') is None
    assert pointer_key("/a/-/b", b'{"a": [{"b": 1}]}') is None
    assert pointer_key("/a/-", b'{"a": "text"}') is None


@settings(max_examples=500)
@given(walks())
def test_no_pointer_and_payload_make_the_key_raise(walk: tuple[str, Any]) -> None:
    pointer, payload = walk
    key = pointer_key(pointer, json.dumps(payload).encode())
    assert key is None or isinstance(key, str)


def test_a_pointer_through_the_end_of_an_array_is_refused() -> None:
    for pointer in ("/a/-", "/-", "/a/-/b"):
        problem = check_pointer(pointer)
        assert problem is not None and "-" in problem, pointer
    assert check_pointer("/a/-b") is None
