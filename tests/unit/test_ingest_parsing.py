"""The ingest body parser and the source credential checks: pure functions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core import errors
from relay.delivery.signing import sign_payload
from relay.ingest.auth import check_before_body, check_with_body
from relay.ingest.parse import MAX_BATCH, parse_body
from relay.ingest.routes import SourceEntry, TargetRoute

#: Text Postgres can store (NUL and lone surrogates are refused: see test_strict_json.py)
storable = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
json_scalars = st.none() | st.booleans() | st.integers() | st.text(storable, max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(storable, max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
objects = st.dictionaries(st.text(storable, max_size=10), json_values, max_size=6)


@given(objects)
def test_a_single_object_keeps_its_exact_bytes(obj: dict[str, Any]) -> None:
    raw = json.dumps(obj, indent=2).encode()
    [event] = parse_body(raw)
    assert event.payload == raw


@given(st.lists(objects, min_size=1, max_size=30))
def test_a_batch_round_trips_each_element(batch: list[dict[str, Any]]) -> None:
    events = parse_body(json.dumps(batch).encode())
    assert [json.loads(e.payload) for e in events] == batch
    compact = [json.dumps(o, separators=(",", ":"), ensure_ascii=False).encode() for o in batch]
    assert [e.payload for e in events] == compact
    assert [list(json.loads(e.payload)) for e in events] == [list(o) for o in batch]


@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_fail_with_a_client_error(raw: bytes) -> None:
    try:
        events = parse_body(raw)
    except (errors.InvalidJSON, errors.InvalidRequest, errors.ValidationFailed) as exc:
        assert exc.status in (400, 422)
        return
    assert 1 <= len(events) <= MAX_BATCH


@given(json_scalars | st.lists(json_scalars, min_size=1, max_size=3))
def test_scalars_and_arrays_of_scalars_are_400(value: Any) -> None:
    with pytest.raises(errors.InvalidRequest):
        parse_body(json.dumps(value).encode())


def test_softledger_fields_are_extracted() -> None:
    [event] = parse_body(
        json.dumps(
            {
                "uuid": "u",
                "date": "d",
                "objectType": "Bill",
                "action": "paid",
                "objectId": 12,
                "tenantId": 3,
            }
        ).encode()
    )
    assert (
        event.uuid,
        event.date,
        event.object_type,
        event.action,
        event.object_id,
        event.tenant_ref,
    ) == ("u", "d", "Bill", "paid", "12", "3")
    [event] = parse_body(b'{"uuid": {"nested": 1}, "objectType": true}')
    assert event.uuid is None and event.object_type is None


def test_batch_size_limit() -> None:
    assert len(parse_body(json.dumps([{}] * MAX_BATCH).encode())) == MAX_BATCH
    with pytest.raises(errors.ValidationFailed):
        parse_body(json.dumps([{}] * (MAX_BATCH + 1)).encode())


@given(st.text(max_size=12), st.text(max_size=12), st.text(max_size=12), st.text(max_size=12))
def test_filter_matching_is_case_insensitive(
    ot: str, act: str, want_ot: str, want_act: str
) -> None:
    route = TargetRoute("t", frozenset({want_ot.lower()}), frozenset({want_act.lower()}), None)
    expected = ot.lower() == want_ot.lower() and act.lower() == want_act.lower()
    assert route.matches("s", ot, act) is expected
    assert TargetRoute("t", frozenset(), frozenset(), None).matches("s", ot, act)
    assert not TargetRoute("t", frozenset(), frozenset(), frozenset({"other"})).matches(
        "s", ot, act
    )


def _source(
    auth_type: str,
    secret: str,
    previous: str | None = None,
    until: float | None = None,
    **config: str,
) -> SourceEntry:
    return SourceEntry("src_1", "ten_1", auth_type, config, secret, previous, until, None)


secrets_ = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=8, max_size=40
)


@given(secret=secrets_, other=secrets_, body=st.binary(max_size=100))
def test_hmac_check(secret: str, other: str, body: bytes) -> None:
    source = _source("hmac", secret, header="X-Sig", prefix="sha256=")
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    for value in (digest.hex(), base64.b64encode(digest).decode()):
        assert check_with_body(source, {"X-Sig": "sha256=" + value}, body, 0)
        assert not check_with_body(source, {"X-Sig": value}, body, 0)
    if other != secret:
        wrong = hmac.new(other.encode(), body, hashlib.sha256).hexdigest()
        assert not check_with_body(source, {"X-Sig": "sha256=" + wrong}, body, 0)


@given(
    key=st.binary(min_size=16, max_size=32),
    body=st.binary(max_size=100),
    skew=st.integers(-600, 600),
)
def test_standard_webhooks_check(key: bytes, body: bytes, skew: int) -> None:
    secret = "whsec_" + base64.b64encode(key).decode()
    now = time.time()
    ts = int(now) + skew
    headers = {
        "webhook-id": "m",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_payload(secret, "m", ts, body),
    }
    assert check_with_body(_source("standard-webhooks", secret), headers, body, now) is (
        abs(now - ts) <= 300
    )


@given(secret=secrets_, previous=secrets_)
def test_previous_token_accepted_only_until_the_overlap_ends(secret: str, previous: str) -> None:
    source = _source("token", secret, previous, until=1000.0)
    assert check_before_body(source, {}, {"token": secret}, 2000)
    assert check_before_body(source, {"Authorization": f"Bearer {previous}"}, {}, 999)
    assert check_before_body(source, {}, {"token": previous}, 1001) is (previous == secret)
