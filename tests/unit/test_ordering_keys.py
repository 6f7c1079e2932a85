"""Ordering keys: which events share an order at a target, and which are not ordered."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.ordering import MAX_KEY_CHARS, check_pointer, object_key, pointer_key
from relay.ingest.parse import ParsedEvent, parse_body
from relay.ingest.routes import TargetRoute

ORDERED = TargetRoute("t", frozenset(), frozenset(), None, ordered=True)
BY_INVOICE = TargetRoute(
    "t", frozenset(), frozenset(), None, ordered=True, ordering_key="/data/invoice/id"
)
UNORDERED = TargetRoute("t", frozenset(), frozenset(), None)


def one(body: object) -> ParsedEvent:
    (event,) = parse_body(json.dumps(body).encode())
    return event


def test_the_envelope_key_is_object_type_and_object_id() -> None:
    bill_7 = one({"objectType": "Bill", "objectId": 7, "action": "paid"})
    assert ORDERED.order_key(bill_7) == ORDERED.order_key(
        one({"objectType": "Bill", "objectId": "7", "action": "created"})
    )
    assert ORDERED.order_key(bill_7) != ORDERED.order_key(
        one({"objectType": "Invoice", "objectId": 7})
    )
    # without an objectId (or an objectType) an event is not ordered
    assert ORDERED.order_key(one({"objectType": "Bill"})) is None
    assert ORDERED.order_key(one({"objectId": 7})) is None
    assert UNORDERED.order_key(bill_7) is None


def test_a_json_pointer_names_the_key() -> None:
    first = one({"data": {"invoice": {"id": 1}}, "objectType": "Bill", "objectId": 9})
    same = one({"data": {"invoice": {"id": 1}, "other": True}})
    other = one({"data": {"invoice": {"id": "1"}}})
    assert BY_INVOICE.order_key(first) == BY_INVOICE.order_key(same)
    # the pointer's value is compared as JSON: 1 and "1" are different keys
    assert BY_INVOICE.order_key(first) != BY_INVOICE.order_key(other)
    for missing in ({"data": {}}, {"data": {"invoice": {"id": None}}}, {"data": [1, 2]}, {}):
        assert BY_INVOICE.order_key(one(missing)) is None, missing


def test_pointers_are_checked() -> None:
    assert check_pointer("/data/invoice/id") is None
    assert check_pointer("/a~1b/~0c/0") is None
    assert check_pointer("data/id") is not None
    assert check_pointer("") is not None
    assert check_pointer("/a/~2") is not None


@given(st.text(max_size=300), st.text(max_size=300))
def test_envelope_keys_are_bounded_and_tell_objects_apart(object_type: str, object_id: str) -> None:
    key = object_key(object_type, object_id)
    assert key is not None and len(key) <= max(MAX_KEY_CHARS, 71)
    assert key == object_key(object_type, object_id)
    assert key != object_key(object_type + "x", object_id)
    assert key != object_key(object_type, object_id + "x")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@given(
    JSON_VALUES, st.text(min_size=1, max_size=10).filter(lambda s: "~" not in s and "/" not in s)
)
def test_pointer_keys_follow_the_value(value: object, name: str) -> None:
    payload = json.dumps({name: value}).encode()
    key = pointer_key(f"/{name}", payload)
    if value is None:
        assert key is None
    else:
        assert key is not None
        # the same value in another document, keys in another order, is the same key
        assert key == pointer_key("/k", json.dumps({"k": value, "z": 1}).encode())
