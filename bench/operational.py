"""Operational events (issue 22): what telling a tenant costs where deliveries die.

    python bench/operational.py [--deaths N] [--rounds R]

Prints figures; asserts nothing. Needs Postgres (DATABASE_URL, default
postgresql://root@127.0.0.1:5432/test): each run gets a fresh database
relay_bench_ops_<hex>, migrated, dropped at the end, error or not.

A burst of deaths is one statement that makes N deliveries of one target `dead`
(what the sweeper does when a breaker's window ends, or what N records do one by
one), each followed by the operational events written in its transaction. Timed
in three variants, each on N fresh pending deliveries, best of R rounds:

1. baseline: migration 0010's triggers disabled (the cost before operational
   events: the death record of migration 0008 only);
2. 0010, the tenant has no operational target: one event row per death;
3. 0010, the tenant has one operational target: one event row and one pending
   delivery to it per death (the engine sends them later; not timed here).

Also: the ingest routing read (`routable_targets`, run when an ingest's routes
are not cached) for a tenant with 6 targets, 3 of them operational (not routed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from typing import Any

import asyncpg

from relay.store.migrations import migrate
from relay.store.targets import routable_targets

ADMIN_DSN = os.environ.get("DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")


_ROUTES_BEFORE = """
SELECT t.config_version, r.id, r.filter_object_types, r.filter_actions, r.source_ids,
       r.ordering, r.ordering_key
FROM tenants t
LEFT JOIN targets r ON r.tenant_id = t.id AND r.enabled AND r.deleted_at IS NULL
WHERE t.id = $1
"""

#: what relay.store.targets.routable_targets reads now
_ROUTES_AFTER = _ROUTES_BEFORE.replace(
    "r.deleted_at IS NULL", "r.deleted_at IS NULL AND r.kind = $2"
)


def _dsn(name: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{name}"


async def _setup(conn: Any, n: int) -> tuple[str, str]:
    tenant = "ten_bench" + secrets.token_hex(4)
    await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, 'bench')", tenant)
    await conn.execute(
        "INSERT INTO sources (id, tenant_id, name, auth_type, secret_enc) "
        "VALUES ($1, $2, 's', 'token', '\\x00')",
        "src_" + tenant,
        tenant,
    )
    target = "tgt_" + tenant
    await conn.execute(
        "INSERT INTO targets (id, tenant_id, url, secret_enc) "
        "VALUES ($1, $2, 'http://x/', '\\x00')",
        target,
        tenant,
    )
    return tenant, target


async def _burst(conn: Any, tenant: str, target: str, n: int) -> float:
    """Insert n pending deliveries of target, then time the one statement killing them."""
    tag = secrets.token_hex(4)
    await conn.execute(
        """
        INSERT INTO events (id, tenant_id, source_id, payload)
        SELECT 'evt_' || $3 || g, $1, 'src_' || $1, '{}'::bytea FROM generate_series(1, $2) g
        """,
        tenant,
        n,
        tag,
    )
    await conn.execute(
        """
        INSERT INTO deliveries (id, tenant_id, event_id, target_id, next_attempt_at,
                                enqueued_until, attempt_count)
        SELECT 'dlv_' || $4 || g, $1, 'evt_' || $4 || g, $2, now(), now(), 8
        FROM generate_series(1, $3) g
        """,
        tenant,
        target,
        n,
        tag,
    )
    start = time.perf_counter()
    await conn.execute(
        """
        UPDATE deliveries SET status = 'dead', next_attempt_at = NULL, enqueued_until = NULL,
               last_status_code = 500, last_error = 'HTTP 500', updated_at = now()
        WHERE target_id = $1 AND status = 'pending'
        """,
        target,
    )
    return time.perf_counter() - start


async def run(deaths: int, rounds: int) -> None:
    name = f"relay_bench_ops_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(_dsn(name))
        try:
            await migrate(conn)
            rows: list[tuple[str, str]] = []
            tenant, target = await _setup(conn, deaths)
            # 1. baseline: 0010's triggers off
            await conn.execute(
                "ALTER TABLE deliveries DISABLE TRIGGER deliveries_operational_death"
            )
            base = min([await _burst(conn, tenant, target, deaths) for _ in range(rounds)])
            await conn.execute("ALTER TABLE deliveries ENABLE TRIGGER deliveries_operational_death")
            # 2. no operational target
            plain = min([await _burst(conn, tenant, target, deaths) for _ in range(rounds)])
            # 3. one operational target
            await conn.execute(
                "INSERT INTO targets (id, tenant_id, url, secret_enc, kind) "
                "VALUES ($1, $2, 'http://ops/', '\\x00', 'operational')",
                "tgt_ops" + tenant,
                tenant,
            )
            told = min([await _burst(conn, tenant, target, deaths) for _ in range(rounds)])
            made = await conn.fetchval(
                "SELECT count(*) FROM deliveries WHERE target_id = $1", "tgt_ops" + tenant
            )
            for label, secs in (
                ("1. baseline (0010's triggers off)", base),
                ("2. 0010, no operational target", plain),
                ("3. 0010, one operational target", told),
            ):
                rows.append(
                    (label, f"{secs * 1000:,.0f} ms, {secs / deaths * 1e6:,.1f} µs per death")
                )
            rows.append(
                ("deliveries made for the operational target per burst (3.)", f"{made // rounds:,}")
            )
            rows.append(("3. / baseline", f"{told / base:.1f} x"))
            # the ingest routing read, 10 targets of which 5 operational
            for i in range(4):
                await conn.execute(
                    "INSERT INTO targets (id, tenant_id, url, secret_enc, kind) "
                    "VALUES ($1, $2, 'http://x/', '\\x00', $3)",
                    f"tgt_{i}{tenant}",
                    tenant,
                    "operational" if i % 2 else "events",
                )
            reads = 2000
            # before 0010: the same read without the kind filter (every target routed)
            start = time.perf_counter()
            for _ in range(reads):
                await conn.fetch(_ROUTES_BEFORE, tenant)
            before = (time.perf_counter() - start) / reads
            rows.append(
                (
                    "routing read before 0010 (no kind filter)",
                    f"{before * 1e6:,.0f} µs per read (mean of {reads:,})",
                )
            )
            start = time.perf_counter()
            for _ in range(reads):
                await conn.fetch(_ROUTES_AFTER, tenant, "events")
            per = (time.perf_counter() - start) / reads
            routes = await routable_targets(conn, tenant)
            rows.append(
                (
                    f"routing read now: 6 targets, 3 operational; {len(routes.targets)} routed",
                    f"{per * 1e6:,.0f} µs per read (mean of {reads:,})",
                )
            )
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(f"\n## bench/operational.py, {deaths:,} deaths in one statement, best of {rounds}\n")
    print("| figure | value |\n| --- | --: |")
    for label, value in rows:
        print(f"| {label} | {value} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deaths", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.deaths, args.rounds))


if __name__ == "__main__":
    main()
