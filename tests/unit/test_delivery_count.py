"""count_deliveries: the bound the ingest quota checks before anything is written."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.ingest.parse import ParsedEvent
from relay.ingest.routes import TargetRoute, count_deliveries

names = st.sampled_from(["Bill", "bill", "Invoice", None])
actions = st.sampled_from(["paid", "created", None])
events = st.lists(
    st.builds(
        ParsedEvent,
        payload=st.just(b"{}"),
        uuid=st.sampled_from(["a", "b", "c", None]),
        date=st.none(),
        object_type=names,
        action=actions,
        object_id=st.none(),
        tenant_ref=st.none(),
    ),
    max_size=30,
)
routes = st.lists(
    st.builds(
        TargetRoute,
        id=st.text(min_size=1, max_size=5),
        object_types=st.frozensets(st.sampled_from(["bill", "invoice"])),
        actions=st.frozensets(st.sampled_from(["paid", "created"])),
        source_ids=st.sampled_from([None, frozenset({"src_1"}), frozenset({"src_2"})]),
    ),
    max_size=5,
)


@given(events=events, routes=routes)
def test_each_distinct_event_times_the_routes_it_matches(
    events: list[ParsedEvent], routes: list[TargetRoute]
) -> None:
    first: dict[str, ParsedEvent] = {}
    distinct = []
    for event in events:
        if event.uuid is None or event.uuid not in first:
            distinct.append(event)
            if event.uuid is not None:
                first[event.uuid] = event
    expected = sum(
        1
        for event in distinct
        for route in routes
        if route.matches("src_1", event.object_type, event.action)
    )
    assert count_deliveries("src_1", events, routes) == expected
    assert count_deliveries("src_1", events, []) == 0
