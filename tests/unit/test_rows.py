"""Typed rows: built from a row by field name, and the API shows what the store's rows hold."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime

import pytest

from relay.api import responses
from relay.api.deliveries import DELIVERY_FIELDS, render_delivery
from relay.store.rows import Delivery, Event, Tenant

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_a_row_with_more_columns_than_fields_builds_the_fields() -> None:
    row = {"id": "ten_1", "name": "Acme", "created_at": NOW, "added_later": 1}
    assert Tenant.from_row(row) == Tenant("ten_1", "Acme", NOW)


def test_a_row_missing_a_field_without_default_is_refused() -> None:
    with pytest.raises(TypeError):
        Event.from_row({"id": "evt_1"})


def test_maybe_passes_none_through() -> None:
    assert Tenant.maybe(None) is None


def test_every_field_the_api_shows_of_a_delivery_is_in_the_stores_row() -> None:
    assert set(DELIVERY_FIELDS) <= {f.name for f in fields(Delivery)}
    assert set(DELIVERY_FIELDS) == set(responses.Delivery.model_fields)


def test_blocked_by_is_shown_only_while_a_delivery_waits() -> None:
    base = Delivery("dlv_1", "ten_1", "evt_1", "tgt_1", "pending", 0, None, None, None, NOW, NOW)
    assert "blocked_by" not in render_delivery(base)
    assert "tenant_id" not in render_delivery(base)
    waiting = Delivery(
        **{**{f.name: getattr(base, f.name) for f in fields(base)}, "blocked_by": "dlv_0"}
    )
    assert render_delivery(waiting)["blocked_by"] == "dlv_0"
