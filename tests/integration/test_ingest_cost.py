"""Per-request CPU at ingest: a body is parsed once, whatever the number of ordered targets."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from relay.ingest import group_commit
from tests.conftest import Tenant
from tests.integration.test_ingest import db_rows, make_source, make_target, post_token

#: A body this large parsed once is fine; parsed once per target it is the issue's 1.45 s.
BIG = 900 * 1024


def _counting_big_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Note every ``json.loads`` of a text of at least BIG/2 characters in this process:
    "commit" when it ran inside the group commit's transaction, else "request"."""
    big_parses: list[str] = []
    committing = False
    real_loads, real_record = json.loads, group_commit.record_event_groups

    def loads(text: Any, *args: Any, **kwargs: Any) -> Any:
        if len(text) >= BIG // 2:
            big_parses.append("commit" if committing else "request")
        return real_loads(text, *args, **kwargs)

    async def record(*args: Any, **kwargs: Any) -> Any:
        nonlocal committing
        committing = True
        try:
            return await real_record(*args, **kwargs)
        finally:
            committing = False

    monkeypatch.setattr(json, "loads", loads)
    monkeypatch.setattr(group_commit, "record_event_groups", record)
    return big_parses


async def test_a_big_body_to_many_ordered_targets_is_parsed_once(
    client: Any, tenant: Tenant, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 100 ordered targets keyed by the same JSON pointer
    source = await make_source(client, tenant)
    targets = [
        await make_target(client, tenant, ordering="object", ordering_key="/data/invoice/id")
        for _ in range(100)
    ]
    # And a ~900 KB event
    body = {"uuid": "big-1", "data": {"invoice": {"id": "inv-1"}, "blob": "A" * BIG}}
    big_parses = _counting_big_parses(monkeypatch)

    # When it is posted
    resp = await post_token(client, source, body)

    # Then it is accepted, with one ordered delivery per target under the pointer's key
    assert resp.status == 202, await resp.text()
    [event_id] = (await resp.json())["event_ids"]
    rows = await db_rows(
        database_url, "SELECT target_id, order_key FROM deliveries WHERE event_id = $1", event_id
    )
    assert {r["target_id"] for r in rows} == {t["id"] for t in targets}
    assert {r["order_key"] for r in rows} == {'"inv-1"'}
    # And the body was parsed once, reading it, not once more per target in the commit
    assert big_parses == ["request"], Counter(big_parses)
