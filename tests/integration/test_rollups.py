"""The counters and per-minute figures (migration 0011) say what a scan of the rows says.

Real `relay worker` processes (two of them, each its own sweeper candidate),
real receivers on 127.0.0.1: deliveries that succeed, that succeed after a
retry, that die, dead letters replayed, a target deleted with deliveries still
to send, dead letters purged. After each step every figure the console and the
stats read agrees with a count over the rows, and the sweeper folds the deltas.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relay.store import console, dead_letters, housekeeping
from relay.store.migrations import migrate
from tests.conftest import Tenant, make_tenant
from tests.history import migrated_before
from tests.integration.test_console import make_dead, sign_in
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Receiver, Workers, eventually, fail_then_succeed, fetch, status

pytestmark = pytest.mark.slow

#: Each figure as the views read it, and as a scan of the rows counts it.
FIGURES = {
    "deliveries by status": (
        "SELECT tenant_id, target_id, status, n FROM delivery_counts_now WHERE n <> 0",
        "SELECT tenant_id, target_id, status, count(*) FROM deliveries GROUP BY 1, 2, 3",
    ),
    "events per tenant and minute": (  # upstream events: the operational ones are not counted
        "SELECT tenant_id, minute, events FROM tenant_minutes_now WHERE events <> 0",
        "SELECT tenant_id, date_trunc('minute', received_at), count(*) FROM events "
        "WHERE NOT operational GROUP BY 1, 2",
    ),
    "attempts per tenant and minute": (
        "SELECT tenant_id, minute, ok, failed FROM tenant_minutes_now WHERE ok + failed <> 0",
        """
        SELECT tenant_id, date_trunc('minute', started_at),
               count(*) FILTER (WHERE status_code BETWEEN 200 AND 299),
               count(*) FILTER (WHERE status_code IS NULL OR status_code NOT BETWEEN 200 AND 299)
        FROM attempts GROUP BY 1, 2
        """,
    ),
    "deaths per tenant and minute": (
        "SELECT tenant_id, minute, died FROM tenant_minutes_now WHERE died <> 0",
        "SELECT tenant_id, date_trunc('minute', died_at), count(*) FROM delivery_deaths "
        "GROUP BY 1, 2",
    ),
    "attempts per target and minute": (
        "SELECT target_id, minute, ok, failed, last_attempt_at FROM target_minutes_now",
        """
        SELECT d.target_id, date_trunc('minute', a.started_at),
               count(*) FILTER (WHERE a.status_code BETWEEN 200 AND 299),
               count(*) FILTER (WHERE a.status_code IS NULL
                                   OR a.status_code NOT BETWEEN 200 AND 299),
               max(a.started_at)
        FROM attempts a JOIN deliveries d ON d.id = a.delivery_id GROUP BY 1, 2
        """,
    ),
    "latency histogram per target and minute": (
        "SELECT target_id, minute, bucket, n FROM target_latency_minutes_now",
        """
        SELECT d.target_id, date_trunc('minute', a.started_at), latency_bucket(a.duration_ms),
               count(*)
        FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
        WHERE a.status_code IS NOT NULL GROUP BY 1, 2, 3
        """,
    ),
    "events, attempts and deaths per tenant and UTC hour (0021)": (
        """
        SELECT tenant_id, hour, sum(events), sum(ok), sum(failed), sum(died) FROM (
            SELECT tenant_id, hour, events, ok, failed, died FROM tenant_hours
            UNION ALL
            SELECT tenant_id, date_trunc('hour', minute, 'UTC'), events, ok, failed, died
            FROM tenant_minute_deltas
        ) x GROUP BY 1, 2 HAVING sum(events) + sum(ok) + sum(failed) + sum(died) <> 0
        """,
        """
        SELECT tenant_id, date_trunc('hour', at, 'UTC'), sum(events), sum(ok), sum(failed),
               sum(died)
        FROM (
            SELECT tenant_id, received_at AS at, 1 AS events, 0 AS ok, 0 AS failed, 0 AS died
            FROM events WHERE NOT operational
            UNION ALL
            SELECT tenant_id, started_at, 0,
                   CASE WHEN status_code BETWEEN 200 AND 299 THEN 1 ELSE 0 END,
                   CASE WHEN status_code BETWEEN 200 AND 299 THEN 0 ELSE 1 END, 0
            FROM attempts
            UNION ALL
            SELECT tenant_id, died_at, 0, 0, 0, 1 FROM delivery_deaths
        ) x GROUP BY 1, 2
        """,
    ),
}

#: What the attempts' history is (a purge takes attempts away, never the past's figures).
HISTORY = (
    "events, attempts and deaths per tenant and UTC hour (0021)",
    "attempts per tenant and minute",
    "attempts per target and minute",
    "latency histogram per target and minute",
)


async def figures(database_url: str, *names: str) -> dict[str, tuple[list[Any], list[Any]]]:
    """Each figure (all by default): (as the views read it, as a scan counts it), sorted."""
    conn = await asyncpg.connect(database_url)
    try:
        out = {}
        for name in names or FIGURES:
            kept, scan = FIGURES[name]
            out[name] = (
                sorted(tuple(r) for r in await conn.fetch(kept)),
                sorted(tuple(r) for r in await conn.fetch(scan)),
            )
        return out
    finally:
        await conn.close()


async def assert_agree(database_url: str, *names: str) -> None:
    for name, (kept, scan) in (await figures(database_url, *names)).items():
        assert kept == scan, name


async def quiet(database_url: str) -> bool:
    """True when no delivery waits to be sent (every one succeeded or dead)."""
    rows = await fetch(
        database_url,
        "SELECT count(*) AS n FROM deliveries WHERE status NOT IN ('succeeded', 'dead')",
    )
    return bool(rows[0]["n"] == 0)


async def deltas_left(database_url: str) -> int:
    rows = await fetch(
        database_url,
        """
        SELECT (SELECT count(*) FROM delivery_count_deltas)
             + (SELECT count(*) FROM tenant_minute_deltas)
             + (SELECT count(*) FROM target_minute_deltas)
             + (SELECT count(*) FROM target_latency_minute_deltas) AS n
        """,
    )
    return int(rows[0]["n"])


async def test_the_figures_agree_with_a_scan_after_a_mix_of_deliveries(
    workers: Workers, gateway: Any, receiver: Receiver, database_url: str
) -> None:
    # Given two tenants; A's targets: one healthy, one that fails once, one that always
    # fails (its deliveries die), one disabled (deleted with deliveries still to send)
    a = await make_tenant(gateway, "A")
    b = await make_tenant(gateway, "B")
    source_a, source_b = await make_source(gateway, a), await make_source(gateway, b)
    ok = await make_target(gateway, a, url=receiver.on("/ok", status(200)))
    flaky = await make_target(gateway, a, url=receiver.on("/flaky", fail_then_succeed(3)))
    bad = await make_target(gateway, a, url=receiver.on("/bad", status(503)))
    held = await make_target(gateway, a, url=receiver.url("/held"), enabled=False)
    other = await make_target(gateway, b, url=receiver.on("/b", status(200)))
    # and two worker processes (`relay worker` twice: two sweepers, one leads)
    workers.start()
    workers.start()

    # When events arrive in batches to both tenants
    for batch in range(3):
        events = [{"uuid": f"a-{batch}-{i}", "objectType": "Bill"} for i in range(20)]
        assert (await post_token(gateway, source_a, events)).status == 202
        events = [{"uuid": f"b-{batch}-{i}"} for i in range(10)]
        assert (await post_token(gateway, source_b, events)).status == 202
    # and every delivery but the hanging target's has succeeded or died
    await eventually(
        lambda: _settled(database_url, [ok["id"], flaky["id"], bad["id"], other["id"]]),
        timeout=90,
    )
    # and the disabled target is deleted (what it still had to send dies)
    assert (await gateway.delete(f"/v1/targets/{held['id']}", headers=a.auth)).status == 204
    # and some of the bad target's dead letters are replayed once it answers again
    receiver.on("/bad", status(200))
    dead = await fetch(
        database_url,
        "SELECT id FROM deliveries WHERE target_id = $1 AND status = 'dead' ORDER BY id LIMIT 10",
        bad["id"],
    )
    resp = await gateway.post(
        "/v1/dead-letters/replay", json={"ids": [r["id"] for r in dead]}, headers=a.auth
    )
    assert resp.status == 202, await resp.text()
    await eventually(lambda: quiet(database_url), timeout=60)

    # Then every figure agrees with a scan of the rows
    await assert_agree(database_url)
    kept = [k for k, _ in (await figures(database_url, *HISTORY)).values()]
    statuses = await _statuses(database_url)
    assert statuses.keys() >= {"succeeded", "dead"}, statuses
    # and the sweeper folds what the triggers appended
    await eventually(lambda: _none_left(database_url), timeout=30)
    await assert_agree(database_url)

    # When the dead letters are purged (their deliveries and attempts are deleted)
    conn = await asyncpg.connect(database_url)
    try:
        purged = await dead_letters.purge_dead_letters(
            conn, a.id, target_id=None, older_than=datetime.now(UTC) + timedelta(seconds=5)
        )
        assert purged > 0
        # Then deliveries by status still agree with a scan, and the stats say it
        await assert_agree(database_url, "deliveries by status")
        stats = await housekeeping.stats(conn)
        scan = await _statuses(database_url)
        assert stats["deliveries"] == {
            s: scan.get(s, 0) for s in ("pending", "retrying", "succeeded", "dead")
        }
        # and the figures of the past keep the attempts that were made
        assert [k for k, _ in (await figures(database_url, *HISTORY)).values()] == kept
        # and the overview's per-tenant figures are the rows' counts
        since = datetime.now(UTC) - timedelta(hours=1)
        by_tenant = {
            f.tenant_id: f for f in await console.figures_by_tenant(conn, None, since=since)
        }
    finally:
        await conn.close()
    events = await fetch(
        database_url, "SELECT tenant_id, count(*) AS n FROM events WHERE NOT operational GROUP BY 1"
    )
    for row in events:
        assert by_tenant[row["tenant_id"]].events == row["n"]
    assert by_tenant[a.id].dead == scan.get("dead", 0) == 0
    assert by_tenant[b.id].succeeded == 30


async def _settled(database_url: str, target_ids: list[str]) -> bool:
    rows = await fetch(
        database_url,
        "SELECT count(*) AS n FROM deliveries WHERE target_id = ANY($1::text[]) "
        "AND status NOT IN ('succeeded', 'dead')",
        target_ids,
    )
    return bool(rows[0]["n"] == 0)


async def _none_left(database_url: str) -> bool:
    return await deltas_left(database_url) == 0


async def _statuses(database_url: str) -> dict[str, int]:
    rows = await fetch(database_url, "SELECT status, count(*) AS n FROM deliveries GROUP BY 1")
    return {r["status"]: r["n"] for r in rows}


async def test_an_upgraded_database_shows_the_figures_of_its_existing_rows(
    services: dict[str, str], tmp_path: Path
) -> None:
    # Given a database at the migration before 0011, with events, deliveries and attempts
    async with migrated_before(services["postgres"], tmp_path, 11) as (_, url):
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                """
                INSERT INTO tenants (id, name) VALUES ('ten_1', 'one');
                INSERT INTO sources (id, tenant_id, name, auth_type, secret_enc)
                    VALUES ('src_1', 'ten_1', 's', 'token', '\\x00');
                INSERT INTO targets (id, tenant_id, url, secret_enc)
                    VALUES ('tgt_1', 'ten_1', 'http://x/', '\\x00');
                INSERT INTO events (id, tenant_id, source_id, payload, received_at)
                    SELECT 'evt_' || g, 'ten_1', 'src_1', '{}', now() - g * interval '1 minute'
                    FROM generate_series(1, 50) g;
                INSERT INTO deliveries (id, tenant_id, event_id, target_id, status, next_attempt_at)
                    SELECT 'dlv_' || g, 'ten_1', 'evt_' || g, 'tgt_1',
                           CASE WHEN g % 10 = 0 THEN 'dead' WHEN g % 7 = 0 THEN 'pending'
                                ELSE 'succeeded' END,
                           CASE WHEN g % 10 <> 0 AND g % 7 = 0 THEN now() END
                    FROM generate_series(1, 50) g;
                INSERT INTO attempts
                    (id, tenant_id, delivery_id, started_at, duration_ms, status_code)
                    SELECT 'att_' || g, 'ten_1', 'dlv_' || g, now() - g * interval '1 minute',
                           g * 3,
                           CASE WHEN g % 10 = 0 THEN 500 WHEN g % 11 = 0 THEN NULL ELSE 200 END
                    FROM generate_series(1, 50) g;
                """
            )
            # When the rest of the migrations are applied
            await migrate(conn)
            # Then the figures are those of the rows
            since = datetime.now(UTC) - timedelta(hours=2)
            [fig] = await console.figures_by_tenant(conn, "ten_1", since=since)
            health = (await console.target_health(conn, "ten_1", ["tgt_1"], since=since))["tgt_1"]
        finally:
            await conn.close()
        await assert_agree(url)
    assert (fig.events, fig.dead, fig.pending) == (50, 5, 7)
    assert (fig.succeeded, fig.failed_attempts) == (41, 9)
    assert (health.attempts, health.succeeded, health.dead) == (50, 41, 5)
    # the median answered attempt took about 75 ms (3 ms x the 25th of 46 answered)
    assert health.p50_ms is not None and 60 < health.p50_ms < 90


async def test_a_narrow_dead_letter_selection_is_counted_up_to_a_cap(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    # Given 1,005 dead letters of one target, all after a 503
    source = await make_source(client, tenant)
    target = await make_target(client, tenant)
    batch = [{"uuid": f"cap-{i}"} for i in range(1005)]
    for start in range(0, 1005, 500):
        resp = await post_token(client, source, batch[start : start + 500])
        assert resp.status == 202, await resp.text()
    ids = [r["id"] for r in await fetch(database_url, "SELECT id FROM deliveries")]
    await make_dead(database_url, ids, code=503)
    await sign_in(client, tenant.api_key)
    # When the dead letters page is shown unfiltered, and filtered by status
    whole = await (await client.get("/console/dead-letters")).text()
    narrow = await (await client.get("/console/dead-letters?status=503")).text()
    by_target = await (await client.get(f"/console/dead-letters?target={target['id']}")).text()
    # Then the whole count is exact (from the counters), the narrow one says "more than"
    assert "<strong>1,005</strong> dead letters match" in whole
    assert "<strong>1,005</strong> dead letters match" in by_target
    assert "More than <strong>1,000</strong> dead letters match" in narrow


async def test_latency_buckets_hold_their_latencies_and_percentiles_stay_within_a_bucket(
    database_url: str,
) -> None:
    samples = [0, 1, 2, 3, 5, 9, 17, 50, 99, 100, 101, 999, 1000, 15_000, 60_000]

    conn = await asyncpg.connect(database_url)
    try:
        buckets = [await conn.fetchval("SELECT latency_bucket($1)", ms) for ms in samples]
    finally:
        await conn.close()
    for ms, b in zip(samples, buckets, strict=True):
        if ms == 0:
            assert b == 0
        else:
            assert 2 ** ((b - 1) / 4) <= ms < 2 ** (b / 4), (ms, b)
    # 100 latencies of 1..100 ms: p50 about 50, p99 about 99, within a bucket's width (19 %)
    counts: dict[int, int] = {}
    for ms in range(1, 101):
        b = 1 + int(4 * math.log2(ms))
        counts[b] = counts.get(b, 0) + 1
    p50, p99 = console.latency_percentile(counts, 0.5), console.latency_percentile(counts, 0.99)
    assert p50 is not None and 50 / 1.19 < p50 < 50 * 1.19
    assert p99 is not None and 99 / 1.19 < p99 < 99 * 1.19
    assert console.latency_percentile({}, 0.5) is None
