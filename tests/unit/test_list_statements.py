"""The lists' statements: a filter not given is left out, a pinned column leads the order."""

from __future__ import annotations

from relay.store.sql import optional_filters, pinned_order


def test_a_filter_given_is_written_plainly_and_one_not_given_keeps_its_parameter() -> None:
    where = optional_filters(
        ("$1::text", "d.status = $1::text", "dead"),
        ("$2::text", "d.id < $2::text", None),
        None,
    )
    assert where.split("\n AND ") == ["(d.status = $1::text)", "$2::text IS NULL"]
    assert optional_filters(None) == "TRUE"


def test_pinned_columns_lead_the_order_in_the_direction_their_index_reads() -> None:
    pins = [("d.tenant_id", "$1::text", "ten_a"), ("d.target_id", "$2::text", "tgt_a")]
    condition, newest = pinned_order(pins, "d.id", descending=True)
    assert condition == (
        "d.tenant_id >= $1::text AND d.tenant_id <= $1::text"
        " AND d.target_id >= $2::text AND d.target_id <= $2::text"
    )
    # (tenant_id, target_id, id DESC) read forward, then backward
    assert newest == "d.tenant_id, d.target_id, d.id DESC"
    assert pinned_order(pins, "d.id", descending=False)[1] == (
        "d.tenant_id DESC, d.target_id DESC, d.id"
    )
    assert pinned_order([], "id", descending=True) == ("TRUE", "id DESC")
    # a pin not given keeps its parameter's place, true, and orders nothing
    assert pinned_order([("tenant_id", "$1::text", None)], "id", descending=True) == (
        "$1::text IS NULL",
        "id DESC",
    )
