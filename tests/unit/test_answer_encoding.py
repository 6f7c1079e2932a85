"""The API's JSON answers: timestamps in RFC 3339 UTC with milliseconds, compact text."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from relay.api.routing import dumps, encoded_page, timestamp

zones = st.one_of(
    st.just(UTC),
    st.integers(min_value=-23 * 60, max_value=23 * 60).map(
        lambda minutes: timezone(timedelta(minutes=minutes))
    ),
)
moments = st.datetimes(
    min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30), timezones=zones
)


def reference(value: datetime) -> str:
    """The format as written before: strftime, milliseconds truncated, a Z."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


@given(moments)
def test_a_timestamp_is_the_utc_moment_to_the_millisecond(value: datetime) -> None:
    text = timestamp(value)
    assert text == reference(value)
    assert text is not None and len(text) == 24 and text.endswith("Z")
    back = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert timedelta(0) <= value - back < timedelta(milliseconds=1)


def test_the_examples_of_the_contract() -> None:
    assert timestamp(None) is None
    moment = datetime(2026, 11, 28, 12, 0, 0, 123999, tzinfo=UTC)
    assert timestamp(moment) == "2026-11-28T12:00:00.123Z"
    paris = moment.astimezone(timezone(timedelta(hours=1)))
    assert timestamp(paris) == "2026-11-28T12:00:00.123Z"
    assert timestamp(datetime(2026, 1, 1, tzinfo=UTC)) == "2026-01-01T00:00:00.000Z"


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text() | moments,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_answers_are_compact_json_with_timestamps_as_text(data: object) -> None:
    text = dumps(data)
    assert text == json.dumps(data, default=reference, separators=(",", ":"))


def test_a_page_is_its_items_and_cursor() -> None:
    body = encoded_page([dumps({"a": 1}).encode(), b"2"], "evt_1")
    assert json.loads(body) == {"data": [{"a": 1}, 2], "next_cursor": "evt_1"}
    assert json.loads(encoded_page([], None)) == {"data": [], "next_cursor": None}
