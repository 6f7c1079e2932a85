"""The console's pure parts: the chart, reading typed times, where forms may send people."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.console import forms
from relay.console.chart import outcome_chart, totals
from relay.store.console import MinuteOutcomes
from relay.store.dead_letters import DeadLetterFilter
from relay.store.sql import CLOCKS_APART, floor_id, made_since

START = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


def bars(svg: str) -> list[tuple[str, float]]:
    """(class, height) of each bar."""
    return [
        (m.group(1), float(m.group(2)))
        for m in re.finditer(r'<rect class="(\w+)"[^>]* height="([0-9.]+)"', svg)
    ]


def test_the_chart_stacks_each_minute_in_proportion_and_says_it_in_words() -> None:
    points = [
        MinuteOutcomes(START + timedelta(minutes=1), succeeded=8, failed=2, died=0),
        MinuteOutcomes(START + timedelta(minutes=2), succeeded=0, failed=1, died=1),
    ]
    svg = str(outcome_chart(points, START, 180))
    # the axis tops out at a round number at or above the busiest minute (10)
    assert bars(svg) == [("ok", 80.0), ("warn", 20.0), ("warn", 10.0), ("bad", 10.0)]
    assert "<title>09:01 UTC: 8 succeeded, 2 failed, 0 died</title>" in svg
    assert "<title>09:02 UTC: 0 succeeded, 1 failed, 1 died</title>" in svg
    assert ">10</text>" in svg and ">now</text>" in svg
    # nothing the CSP forbids: no style attribute, no script
    assert "style=" not in svg and "<script" not in svg
    assert totals(points).died == 1 and not totals(points).empty


def test_minutes_outside_the_window_and_empty_minutes_draw_nothing() -> None:
    points = [
        MinuteOutcomes(START - timedelta(minutes=1), 5, 0, 0),
        MinuteOutcomes(START + timedelta(minutes=3), 0, 0, 0),
    ]
    assert bars(str(outcome_chart(points, START, 60))) == []


def test_a_time_without_zone_is_the_viewers_when_the_page_said_its_offset() -> None:
    berlin = {"since": "2026-11-28T13:00", "tz": "60"}
    assert forms.moment(berlin, "since", label="From") == datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    # without script there is no offset: the form says UTC
    assert forms.moment({"since": "2026-11-28T13:00"}, "since", label="From") == datetime(
        2026, 11, 28, 13, 0, tzinfo=UTC
    )
    # an explicit zone wins over the offset
    explicit = {"since": "2026-11-28T13:00:00Z", "tz": "-300"}
    assert forms.moment(explicit, "since", label="From") == datetime(
        2026, 11, 28, 13, 0, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"since": "yesterday"}, "From is not a date and time"),
        ({"since": "2026-11-28\x00"}, "cannot be searched for"),
        ({"status": "5xx"}, "Status code must be a whole number"),
        ({"status": "700"}, "Status code must be a whole number"),
        ({"target": "tgt_short"}, "Target is not a tgt_… id"),
        ({"target": "ten_01ARZ3NDEKTSV4RRFFQ69G5FAV"}, "Target is not a tgt_… id"),
    ],
)
def test_bad_input_is_named_in_words(data: dict[str, str], message: str) -> None:
    with pytest.raises(forms.BadInput, match=message):
        forms.moment(data, "since", label="From")
        forms.integer(data, "status", label="Status code", low=100, high=599)
        forms.object_id(data, "target", "tgt", label="Target")


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("/console/deliveries/dlv_1", True),
        ("/console/dead-letters?status=500", True),
        ("//evil.example/console/", False),
        ("https://evil.example/console/", False),
        ("/v1/targets", False),
        ("/console\\@evil", False),
        (42, False),
    ],
)
def test_forms_only_send_people_back_inside_the_console(value: object, kept: bool) -> None:
    assert forms.local_path(value) == (value if kept else None)


def test_ids_of_a_window_start_at_its_first_millisecond() -> None:
    from ulid import ULID

    at = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    floor = floor_id("att", at)
    assert floor < f"att_{ULID.from_datetime(at)}"
    assert floor > f"att_{ULID.from_datetime(at - timedelta(milliseconds=1))}"


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1)))
def test_a_row_made_after_another_is_never_below_the_bound_its_id_gives(at: datetime) -> None:
    from ulid import ULID

    made = at.replace(tzinfo=UTC)
    parent = f"dlv_{ULID.from_datetime(made)}"
    bound = made_since("att", parent)
    # a row made after it, even by a clock CLOCKS_APART behind, is at or above the bound,
    # and the bound leaves out what was made a second before that
    assert bound is not None
    assert bound <= f"att_{ULID.from_datetime(made - CLOCKS_APART)}"
    assert bound > f"att_{ULID.from_datetime(made - CLOCKS_APART - timedelta(seconds=1))}"


@pytest.mark.parametrize(
    "parent", ["dlv_x", "dlv_", "evt", "dlv_01JD!!!!!!!!!!!!!!!!!!!!!!", "", "evt_" + "0" * 26]
)
def test_an_id_without_a_ulid_gives_no_bound(parent: str) -> None:
    assert made_since("att", parent) is None


def test_only_target_and_since_are_what_the_api_replay_can_select() -> None:
    assert DeadLetterFilter(target_id="tgt_x", since=START).api_selectable
    assert not DeadLetterFilter(status_code=500).api_selectable
    assert not DeadLetterFilter(error="timeout").api_selectable
    assert not DeadLetterFilter(until=START).api_selectable


@pytest.mark.parametrize("peak", [1, 2, 3, 5, 7, 9, 11, 23, 45, 99, 150])
def test_the_charts_axis_labels_are_whole_numbers_of_deliveries(peak: int) -> None:
    # Given a window whose busiest minute had `peak` deliveries
    points = [MinuteOutcomes(START, peak, 0, 0)]
    # When it is drawn
    svg = str(outcome_chart(points, START, 180))
    # Then every y-axis label is a whole number, and the top one is at least the peak
    labels = re.findall(r'<text class="axis" x="2" y="\d+">([^<]+)</text>', svg)
    assert labels and all(label.isdigit() for label in labels), labels
    assert max(int(label) for label in labels) >= peak
