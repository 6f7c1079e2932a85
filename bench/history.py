"""Does anything cost more as history grows? Every figure empty, then with history, in one run.

    python bench/history.py [--events 2000000] [--quick] [--results] [--redis URL] [--keep]

Prints figures; asserts nothing. Needs Postgres (DATABASE_URL, default
postgresql://root@127.0.0.1:5432/test: a fresh database bench_history_<pid> is
created and dropped at the end, error or not, unless --keep), Redis (--redis, default db 12,
flushed at the start) and wrk on the PATH. The relay it starts is the one of
this checkout (PYTHONPATH is set to it). Every process it starts is in its own
process group and is killed at the end.

1. Setup: migrate; a gateway and `relay worker --processes 2` (RELAY_RETENTION_DAYS
   3650, so the sweeper purges nothing by itself); tenant H (one token source, two
   targets on a local receiver that answers 200 at once), tenant I (a source, no
   target: the ingest figure), tenant D (a source, one target: the drain figure).
2. The figures, measured on the "empty" database, then again with history, writes
   first. The empty database holds the history's last day (--events / 40 events over
   the last day, as the history fills it): what a page shows (its lists, a chart of
   the last hours, figures of the last day) is then the same in both runs, and the
   ratio says what the 39 older days cost. With --sparse-seed it holds 1,000 events
   over 40 days instead (the baseline before 2026-12-07): its lists have a page of
   rows, but its charts and figures are nearly empty, so a page draws less;
   - e2e: 300 single events/s to H for --seconds, open loop, POST start to the
     receiver's receipt, p50/p99;
   - ingest: wrk -t1 -c64 POSTing a single event to I for --seconds, events/s;
   - drain: the worker stopped, 20,000 events to D (one delivery each) ingested,
     then the worker started: deliveries/s from its start until all succeeded;
   - API lists as H: GET /v1/deliveries, /v1/events, /v1/dead-letters, p99;
   - console, signed in through the form: the overview as the operator and as H,
     H's targets page, H's dead letters, p50/p99; GET /v1/admin/stats p50/p99;
   - retention: the sweeper's own entry point (housekeeping.purge_old_events,
     batch after batch until a batch is short, then purge_old_rollups when the
     checkout has it) with a retention of 30 days, so the oldest 10 of the 40
     days of history go (on the empty database, nothing, or with --sparse-seed the
     seed's oldest quarter); meanwhile H gets 100 single events/s, open loop, from
     5 s before it until 1 s after it: the e2e p50/p99 of those posted before it
     began and of those posted while it ran (and how many).
3. The history, between the two: --events events to H in all (default 2,000,000),
   filled with set-based SQL (generate_series) in chunks, spread evenly over the 39
   days before the last (over the 40 days with --sparse-seed), into each day's
   partitions, made first as the sweeper makes them ahead of each day (with
   --default-partitions, into the DEFAULT partitions: retention then deletes rows),
   each with 2 deliveries (one per target) and one attempt per delivery (so 2 per
   event, each with its target, as relay_record writes it):
   98.5 % succeeded (200 in 5..54 ms), 1.5 % dead (a 503), with their
   delivery_deaths rows; then the figures' deltas are folded
   (when the checkout keeps figures), VACUUM ANALYZE, a CHECKPOINT, and the
   gateway and the worker are restarted (no plan cached from the empty run).

Ends with a table: figure | empty | with history | ratio (with history / empty;
for latencies lower is better). --quick: 2 s phases, 2,000 events to drain, 10
requests per page (default: 10 s, 20,000, 100). --results appends the table to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # the relay of this checkout (retention's entry point)
import engine  # noqa: E402
from engine import TOKEN, Stack, event, latencies, pct, send_paced, stop, until  # noqa: E402
from ingest import EVENT, wrk  # noqa: E402

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
DAYS = 40
#: make the history's days' partitions before the fill (not with --default-partitions)
DAY_PARTITIONS = True
RETENTION_DAYS = 30
CHUNK = 250_000  # events per fill statement
SEED = 1_000  # events of the "empty" database: a page of each list


@dataclass
class Viewer:
    """A tenant (or the operator) as the bench uses it."""

    key: str
    ingest_url: str = ""
    target_ids: tuple[str, ...] = ()
    source_id: str = ""


async def make_tenant(stack: Stack, name: str, targets: int) -> tuple[str, Viewer]:
    """A tenant with one token source and ``targets`` targets on the receiver."""
    created = await stack.api("/v1/tenants", TOKEN, {"name": name})
    key = created["api_key"]
    source = await stack.api("/v1/sources", key, {"name": "s", "auth": {"type": "token"}})
    ids = []
    for i in range(targets):
        url = f"http://127.0.0.1:{stack.port}/{name}/{i}"
        ids.append((await stack.api("/v1/targets", key, {"url": url}))["id"])
    ingest = f"{stack.base}/in/{source['id']}?token={source['secret']}"
    return created["id"], Viewer(key, ingest, tuple(ids), source["id"])


# --- the history ------------------------------------------------------------------

#: The first ten characters of a ULID made at ``at`` (its milliseconds in Crockford base32);
#: the bench's ids end with 16 hex digits of a serial number (hex digits are base32 ones).
ULID_TIME = """
CREATE FUNCTION pg_temp.ulid_time(at timestamptz) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT string_agg(
        substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ',
               ((floor(extract(epoch FROM at) * 1000)::bigint >> (5 * (9 - i))) & 31)::int + 1,
               1),
        '' ORDER BY i)
    FROM generate_series(0, 9) AS i
$$
"""


def ident(prefix: str, serial: str) -> str:
    """SQL of an id of type ``prefix`` made at the chunk's ``tp`` with ``serial`` (SQL)."""
    return f"'{prefix}_' || tp || upper(lpad(to_hex({serial}), 16, '0'))"


async def fill(
    dsn: str,
    tenant_id: str,
    viewer: Viewer,
    events: int,
    *,
    days: tuple[int, int] = (0, DAYS),
    quiet: bool = False,
) -> float:
    """``events`` events of history to the tenant, with their deliveries and attempts,
    spread evenly from ``days[1]`` days ago to ``days[0]`` days ago (and a minute)."""
    from relay.store import housekeeping

    started = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET synchronous_commit = off")
        await conn.execute(ULID_TIME)
        with_target = bool(
            await conn.fetchval(
                "SELECT count(*) FROM information_schema.columns"
                " WHERE table_name = 'attempts' AND column_name = 'target_id'"
            )
        )
        # a database that lived those days has their partitions (the sweeper makes each
        # day's ahead of it): without them (--default-partitions) the history lands in
        # the DEFAULT partitions, and retention deletes it row by row instead of
        # dropping days
        if DAY_PARTITIONS and await conn.fetchval(
            "SELECT to_regproc('relay_ensure_partition') IS NOT NULL"
        ):
            for back in range(DAYS + 1):
                for parent, prefix in housekeeping.HISTORY:
                    await conn.execute(
                        "SELECT relay_ensure_partition($1, $2,"
                        " (now() AT TIME ZONE 'UTC')::date - $3::int)",
                        parent,
                        prefix,
                        back,
                    )
            # and its figures' days (0028: a checkout without them keeps its figures
            # in one table)
            if await conn.fetchval(
                "SELECT to_regproc('relay_ensure_figures_partition') IS NOT NULL"
            ):
                for back in range(DAYS + 1):
                    for parent, _ in housekeeping.FIGURES:
                        await conn.execute(
                            "SELECT relay_ensure_figures_partition($1,"
                            " (now() AT TIME ZONE 'UTC')::date - $2::int)",
                            parent,
                            back,
                        )
        t1, t2 = viewer.target_ids
        for first in range(0, events, CHUNK):
            last = min(events, first + CHUNK)
            async with conn.transaction():
                # event g at days[1] days ago + g/N of the span (the last days[0] days
                # and a minute ago)
                await conn.execute(
                    f"""
                    CREATE TEMP TABLE chunk ON COMMIT DROP AS
                    SELECT g, at, pg_temp.ulid_time(at) AS tp, (hashint8(g) & 1023) < 15 AS dead
                    FROM (
                        SELECT g, now() - interval '1 minute' - interval '{days[0]} days'
                                  - (($3::bigint - g)::float8 / $3)
                                    * interval '{days[1] - days[0]} days' AS at
                        FROM generate_series($1::bigint, $2::bigint) AS g
                    ) x
                    """,
                    first + 1,
                    last,
                    events,
                )
                await conn.execute(
                    f"""
                    INSERT INTO events (id, tenant_id, source_id, object_type, action, object_id,
                                        payload, received_at)
                    SELECT {ident("evt", "g")}, $1, $2, 'Bill', 'paid', g::text,
                           convert_to('{{"objectType":"Bill","action":"paid","objectId":'
                                      || g || '}}', 'UTF8'), at
                    FROM chunk
                    """,
                    tenant_id,
                    viewer.source_id,
                )
                await conn.execute(
                    f"""
                    INSERT INTO deliveries (id, tenant_id, event_id, target_id, status,
                                            attempt_count, last_status_code, last_error,
                                            created_at, updated_at)
                    SELECT {ident("dlv", "2 * g + k")}, $1, {ident("evt", "g")},
                           CASE k WHEN 0 THEN $2 ELSE $3 END,
                           CASE WHEN dead THEN 'dead' ELSE 'succeeded' END, 1,
                           CASE WHEN dead THEN 503 ELSE 200 END,
                           CASE WHEN dead THEN 'HTTP 503' END,
                           at, at + interval '20 ms'
                    FROM chunk CROSS JOIN (VALUES (0), (1)) AS t(k)
                    """,
                    tenant_id,
                    t1,
                    t2,
                )
                # each attempt with its target, as relay_record writes it (0026): a
                # row without one has the rollup look its delivery up in every
                # deliveries partition (minutes a chunk over 40 day partitions)
                target = ", target_id" if with_target else ""
                await conn.execute(
                    f"""
                    INSERT INTO attempts (id, tenant_id, delivery_id, started_at, duration_ms,
                                          status_code, error{target})
                    SELECT {ident("att", "2 * g + k")}, $1,
                           {ident("dlv", "2 * g + k")}, at + interval '5 ms',
                           5 + (hashint8(g * 2 + k) & 1023) % 50,
                           CASE WHEN dead THEN 503 ELSE 200 END,
                           CASE WHEN dead THEN 'HTTP 503' END
                           {", CASE k WHEN 0 THEN $2 ELSE $3 END" if with_target else ""}
                    FROM chunk CROSS JOIN (VALUES (0), (1)) AS t(k)
                    """,
                    tenant_id,
                    *((t1, t2) if with_target else ()),
                )
                await conn.execute(
                    f"""
                    INSERT INTO delivery_deaths (delivery_id, tenant_id, target_id, died_at)
                    SELECT {ident("dlv", "2 * g + k")}, $1,
                           CASE k WHEN 0 THEN $2 ELSE $3 END, at + interval '20 ms'
                    FROM chunk CROSS JOIN (VALUES (0), (1)) AS t(k) WHERE dead
                    """,
                    tenant_id,
                    t1,
                    t2,
                )
            if not quiet:
                print(f"    filled {last:,} of {events:,} events", flush=True)
        # as an old database is: the sweeper has folded the figures' deltas (where the
        # checkout keeps them), autovacuum has been by
        if await conn.fetchval("SELECT to_regproc('fold_rollups') IS NOT NULL"):
            await conn.execute("SELECT fold_rollups()")
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return time.perf_counter() - started


# --- the figures ---------------------------------------------------------------------


class Relay:
    """The stack and the relay's processes of this run."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.gateway: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.gateway = await self.stack.gateway()
        self.worker = await self.stack.worker()

    def stop_worker(self) -> None:
        if self.worker is not None:
            stop(self.worker)
            self.worker = None

    async def restart(self) -> None:
        self.stop_worker()
        if self.gateway is not None:
            stop(self.gateway)
        await self.start()


async def timed_gets(
    session: aiohttp.ClientSession, url: str, n: int, headers: dict[str, str] | None = None
) -> list[float]:
    """``n`` sequential GETs (after one warm-up), each in ms; every answer must be 200."""
    out = []
    for i in range(n + 1):
        began = time.perf_counter()
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            await resp.read()
            assert resp.status == 200, f"GET {url}: {resp.status}"
        if i:
            out.append((time.perf_counter() - began) * 1000)
    return out


async def console_session(base: str, token: str) -> aiohttp.ClientSession:
    """A session signed in to the console through its form."""
    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with session.get(f"{base}/console/login") as resp:
        found = CSRF.search(await resp.text())
        assert found, "no CSRF field on the sign-in page"
    form = {"token": token, "csrf_token": found[1]}
    async with session.post(f"{base}/console/login", data=form, allow_redirects=False) as resp:
        assert resp.status == 303, f"sign-in: {resp.status}"
    return session


Figures = dict[str, tuple[float, ...]]


async def measure(
    relay: Relay, h: Viewer, i: Viewer, d: tuple[str, Viewer], args: argparse.Namespace
) -> Figures:
    """Every figure once, in order: e2e, ingest, drain, then the reads (pages hold rows)."""
    stack = relay.stack
    out: Figures = {}
    # e2e at 300/s
    paced = await send_paced(h.ingest_url, args.seconds * 300, 300)
    got = [v * 1000 for v in await latencies(stack, paced.sent)]
    missing = len(paced.sent) - len(got)
    if missing:
        print(f"    warning: {missing} of {len(paced.sent)} e2e events never arrived")
    out["e2e at 300/s p50/p99"] = (pct(got, 50), pct(got, 99))
    # ingest
    with tempfile.TemporaryDirectory(prefix="bench-history-wrk-") as scripts:
        measured = await wrk(i.ingest_url, EVENT, args.seconds, 64, Path(scripts))
    if measured.non_2xx or measured.socket_errors:
        print(f"    warning: ingest {measured.non_2xx} non-2xx, errors {measured.socket_errors}")
    out["ingest (wrk, 64 connections) events/s"] = (measured.accepted / args.seconds,)
    # drain
    tenant_d, dv = d
    relay.stop_worker()
    before = await succeeded(stack.dsn, tenant_d)
    await stack.ingest(dv.ingest_url, [event()[1] for _ in range(args.drain)], batch=500)
    started = time.perf_counter()
    relay.worker = await stack.worker()

    async def drained() -> bool:
        return await succeeded(stack.dsn, tenant_d) >= before + args.drain

    await until(drained, max(120, args.drain / 20), f"{args.drain} deliveries to succeed")
    out[f"drain of a {args.drain:,} backlog dlv/s"] = (
        args.drain / (time.perf_counter() - started),
    )
    n = args.requests
    api = {"Authorization": f"Bearer {h.key}"}
    async with aiohttp.ClientSession() as plain:
        for name, path in (
            ("deliveries", "/v1/deliveries"),
            ("events", "/v1/events"),
            ("dead letters", "/v1/dead-letters"),
        ):
            ms = await timed_gets(plain, stack.base + path, n, api)
            out[f"API list {name} p50/p99"] = (pct(ms, 50), pct(ms, 99))
        admin = {"Authorization": f"Bearer {TOKEN}"}
        ms = await timed_gets(plain, stack.base + "/v1/admin/stats", n, admin)
        out["GET /v1/admin/stats p50/p99"] = (pct(ms, 50), pct(ms, 99))
    for who, token in (("operator", TOKEN), ("tenant", h.key)):
        session = await console_session(stack.base, token)
        try:
            ms = await timed_gets(session, stack.base + "/console/", n)
            out[f"console overview ({who}) p50/p99"] = (pct(ms, 50), pct(ms, 99))
            if who == "tenant":
                for name, path in (
                    ("targets", "/console/targets"),
                    ("dead letters", "/console/dead-letters"),
                ):
                    ms = await timed_gets(session, stack.base + path, n)
                    out[f"console {name} (tenant) p50/p99"] = (pct(ms, 50), pct(ms, 99))
        finally:
            await session.close()
    return out


async def succeeded(dsn: str, tenant_id: str) -> int:
    rows = await engine.sql(
        dsn,
        f"SELECT count(*) FROM deliveries WHERE tenant_id = '{tenant_id}' AND status = 'succeeded'",
    )
    return int(rows[0][0])


async def retention(dsn: str) -> tuple[float, int]:
    """Seconds and events the sweeper's retention takes to purge past RETENTION_DAYS."""
    from relay.store import housekeeping

    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        total = 0
        while True:
            batch, _ = await housekeeping.purge_old_events(conn, RETENTION_DAYS)
            total += batch
            if batch < 1000:
                break
        trim = getattr(housekeeping, "purge_old_rollups", None)
        while trim is not None and await trim(conn, RETENTION_DAYS) > 0:
            pass
        return time.perf_counter() - started, total
    finally:
        await conn.close()


#: retention's probe: H's source gets this many events/s from LEAD_S before the
#: retention begins until a second after it ends
PROBE_RATE = 100
LEAD_S = 5.0


async def retention_under_load(stack: Stack, h: Viewer) -> Figures:
    """Retention (as ``retention``) while events go to H at PROBE_RATE/s, open loop:
    its time, and the e2e p50/p99 of the events posted before it began and while it ran."""
    purging: dict[str, float] = {}

    async def purge() -> tuple[float, int]:
        await asyncio.sleep(LEAD_S)
        purging["start"] = time.time()
        try:
            return await retention(stack.dsn)
        finally:
            purging["end"] = time.time()

    def ended() -> bool:  # a second after the retention ended
        return "end" in purging and time.time() >= purging["end"] + 1.0

    purged = asyncio.create_task(purge())
    sent = (await send_paced(h.ingest_url, 10**9, PROBE_RATE, until=ended)).sent
    took, removed = await purged
    await latencies(stack, sent)  # waits for them all (30 s at most)
    at = (await stack.receipts(full=True))["at"]
    before = [1000 * (at[k] - t) for k, t in sent.items() if k in at and t < purging["start"]]
    during = [
        1000 * (at[k] - t)
        for k, t in sent.items()
        if k in at and purging["start"] <= t <= purging["end"]
    ]
    missing = len(sent) - sum(k in at for k in sent)
    if missing:
        print(f"    warning: {missing} of {len(sent)} probe events never arrived")
    return {
        "retention of 10 days": (took, removed),
        f"e2e at {PROBE_RATE}/s before retention p50/p99": (pct(before, 50), pct(before, 99)),
        f"e2e at {PROBE_RATE}/s during retention p50/p99": (
            pct(during, 50),
            pct(during, 99),
            len(during),
        ),
    }


# --- the run ---------------------------------------------------------------------------

LOWER_IS_BETTER = ("p50", "p99", "retention")


def show(value: tuple[float, ...], name: str) -> str:
    if "events/s" in name or "dlv/s" in name:
        return f"{value[0]:,.0f}/s"
    if name.startswith("retention"):
        return f"{value[0]:,.1f} s ({value[1]:,.0f} events)"
    if "during retention" in name:
        return f"{value[0]:,.1f}/{value[1]:,.1f} ms ({value[2]:,.0f} events)"
    return "/".join(f"{v:,.1f}" for v in value) + " ms"


def ratio(empty: tuple[float, ...], full: tuple[float, ...]) -> str:
    parts = [f"{f / e:.2f}" if e > 0 else "-" for e, f in zip(empty, full, strict=False)]
    return "/".join(parts[:2])


async def run(args: argparse.Namespace, logdir: Path) -> list[tuple[str, str, str, str]]:
    engine.REDIS_URL = args.redis
    stack = Stack("history", logdir)
    stack.keep = args.keep
    stack.env |= {
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": args.redis,
        "RELAY_RETENTION_DAYS": "3650",
        "RELAY_LOG_LEVEL": "WARNING",
    }
    redis.Redis.from_url(args.redis).flushdb()
    async with stack:
        relay = Relay(stack)
        await relay.start()
        h_id, h = await make_tenant(stack, "h", 2)
        _, i = await make_tenant(stack, "i", 0)
        d = await make_tenant(stack, "d", 1)
        # the last day's traffic as the history has it (the pages' windows and lists
        # show the same then), or with --sparse-seed a page's worth of every list
        relay.stop_worker()
        if args.sparse_seed:
            seed, seed_days, history_days = SEED, (0, DAYS), (0, DAYS)
        else:
            seed, seed_days, history_days = args.events // DAYS, (0, 1), (1, DAYS)
        await fill(stack.dsn, h_id, h, seed, days=seed_days, quiet=True)
        relay.worker = await stack.worker()
        await latencies(stack, (await send_paced(h.ingest_url, 1, 1)).sent, wait=60)  # warm
        print(f"  empty database (a seed of {seed:,} events over {seed_days[1]} days):", flush=True)
        empty = await measure(relay, h, i, d, args)
        empty |= await retention_under_load(stack, h)
        for name, value in empty.items():
            print(f"    {name:<44} {show(value, name)}", flush=True)
        print(f"  filling {args.events - seed:,} events of history:", flush=True)
        relay.stop_worker()
        took = await fill(stack.dsn, h_id, h, args.events - seed, days=history_days)
        print(f"    filled in {took:,.0f} s", flush=True)
        await relay.restart()
        await latencies(stack, (await send_paced(h.ingest_url, 1, 1)).sent, wait=60)  # warm
        print("  with history:", flush=True)
        full = await measure(relay, h, i, d, args)
        full |= await retention_under_load(stack, h)
        for name, value in full.items():
            print(f"    {name:<44} {show(value, name)}", flush=True)
        relay.stop_worker()
    rows = []
    for name in empty:
        rows.append(
            (name, show(empty[name], name), show(full[name], name), ratio(empty[name], full[name]))
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000, help="events of history")
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke test)")
    parser.add_argument("--results", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12", help="flushed")
    parser.add_argument(
        "--default-partitions",
        action="store_true",
        help="fill the history into the DEFAULT partitions, not its days' (before"
        " 2026-12-07: retention then deletes it row by row)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the database at the end (its name printed)"
    )
    parser.add_argument(
        "--sparse-seed",
        action="store_true",
        help=f"the empty database holds {SEED:,} events over {DAYS} days (before 2026-12-07:"
        " its pages' windows nearly empty), not the history's last day",
    )
    args = parser.parse_args()
    global DAY_PARTITIONS
    DAY_PARTITIONS = not args.default_partitions
    args.seconds, args.drain, args.requests = (2, 2_000, 10) if args.quick else (10, 20_000, 100)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    header = engine.machine() + f", {args.events:,} events" + (" (quick)" if args.quick else "")
    print(f"Relay with history: {header}", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-history-") as logdir:
            rows = asyncio.run(run(args, Path(logdir)))
    except KeyboardInterrupt:
        sys.exit("interrupted: every process stopped, the database dropped")
    finally:
        for proc in engine.PROCS:
            stop(proc, grace=0)
    lines = [
        "| figure | empty | with history | ratio |",
        "| --- | --: | --: | --: |",
        *(f"| {a} | {b} | {c} | {r} |" for a, b, c, r in rows),
    ]
    print("\n".join(lines))
    if args.results:
        with (HERE / "RESULTS.md").open("a") as out:
            out.write(f"\n## bench/history.py: {header}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
