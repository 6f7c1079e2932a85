"""The decision table of what an answer means, and Retry-After parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.outcome import (
    MAX_RETRY_AFTER_S,
    decide,
    delivery_headers,
    jittered,
    parse_retry_after,
)

SCHEDULE = (0, 5, 300, 1800)
MID = lambda: 0.5  # noqa: E731 - no jitter: uniform draw at the middle


@pytest.mark.parametrize(
    ("status", "attempt", "retry_after", "expected"),
    [
        (200, 1, None, ("succeeded", None, None)),
        (204, 4, None, ("succeeded", None, None)),
        (299, 2, None, ("succeeded", None, None)),
        (500, 1, None, ("retrying", 5, None)),
        (None, 1, None, ("retrying", 5, None)),  # timeout / connection error
        (302, 2, None, ("retrying", 300, None)),  # redirects are not followed
        (404, 3, None, ("retrying", 1800, None)),
        (500, 4, None, ("dead", None, None)),  # after the last scheduled attempt
        (None, 4, None, ("dead", None, None)),
        (410, 1, None, ("dead", None, "the target answered 410 Gone")),
        (429, 1, 60.0, ("retrying", 60, None)),  # Retry-After later than schedule
        (503, 1, 2.0, ("retrying", 5, None)),  # earlier: schedule wins
        (500, 1, 60.0, ("retrying", 5, None)),  # only 429/503 carry Retry-After
        (429, 1, 10**9, ("retrying", 86400, None)),  # capped at a day
        (429, 4, 60.0, ("dead", None, None)),
    ],
)
def test_decision_table(
    status: int | None,
    attempt: int,
    retry_after: float | None,
    expected: tuple[str, float | None, str | None],
) -> None:
    outcome = decide(
        status_code=status,
        attempt_number=attempt,
        schedule=SCHEDULE,
        retry_after_s=retry_after,
        rand=MID,
    )
    assert (outcome.status, outcome.delay_s, outcome.disable_target) == expected


@given(st.floats(0, 1e6), st.floats(0, 1))
def test_jitter_stays_within_twenty_percent(seconds: float, draw: float) -> None:
    value = jittered(seconds, lambda: draw)
    assert seconds * 0.8 - 1e-9 <= value <= seconds * 1.2 + 1e-9


def test_retry_after_forms() -> None:
    now = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after(" 7 ", now) == 7
    http_date = (now + timedelta(seconds=90)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(http_date, now) == 90
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0
    for bad in (None, "", "soon", "-5", "1.5e3"):
        assert parse_retry_after(bad, now) is None


@pytest.mark.parametrize(
    "value",
    [
        "²",  # str.isdigit() is true, float() refuses it
        "¹²",
        "٣",  # Arabic-Indic three: float() would accept it, HTTP does not
        "\uff11\uff12",  # fullwidth digits
        "12\u00a0",
        "+5",
        "5 5",
        "0x10",
        "1_000",
        "Wed, 21 Oct 99999 07:28:00 GMT",
        "Wed, 32 Oct 2015 07:28:00 GMT",
    ],
)
def test_retry_after_only_ascii_digits_or_an_http_date(value: str) -> None:
    now = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after(value, now) is None


@given(st.text())
def test_retry_after_never_raises(value: str) -> None:
    now = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
    result = parse_retry_after(value, now)
    assert result is None or 0 <= result <= MAX_RETRY_AFTER_S
    bare = value.strip(" \t")
    if bare.isascii() and bare.isdigit():
        assert result == min(int(bare), MAX_RETRY_AFTER_S)


def test_headers_carry_target_headers_and_signature_last() -> None:
    headers = delivery_headers(
        event_id="evt_1",
        body=b"{}",
        secrets=["whsec_" + "A" * 44],
        timestamp=1700000000,
        target_headers={"X-Env": "prod"},
    )
    assert headers["X-Env"] == "prod"
    assert headers["webhook-id"] == "evt_1" and headers["webhook-timestamp"] == "1700000000"
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["content-type"] == "application/json"


def test_a_retry_after_too_large_to_be_a_number_is_capped() -> None:
    now = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("9" * 400, now) == MAX_RETRY_AFTER_S
    assert parse_retry_after("90", now) == 90
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now) == MAX_RETRY_AFTER_S
