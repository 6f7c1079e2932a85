"""`relay dlq`: the operators' dead-letter tools, straight against Postgres.

Replays put dead letters back to pending with no broker message; the
sweeper of any running `relay worker` enqueues them within a second, so the
CLI needs only the database: DATABASE_URL, or with it unset ``relay dev``'s
embedded one under RELAY_DATA_DIR.

Tables never wrap an id (it could not be copied): the other columns fold or
are left out first (``--wide`` shows them all).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from relay.api.deliveries import render_attempt, render_delivery
from relay.api.routing import dumps
from relay.core.config import Settings
from relay.store import dead_letters as store
from relay.store import deliveries
from relay.store.db import Conn, connect
from relay.store.dead_letters import DeadLetterFilter


def plural(n: int, noun: str) -> str:
    """``1 dead letter``, ``2 dead letters``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _id_column(table: Table, name: str) -> None:
    table.add_column(name, no_wrap=True, min_width=30)


def _confirm(question: str, args: argparse.Namespace) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        print(f"relay: {question} Refusing without a terminal; pass --yes.", file=sys.stderr)
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


async def _list(conn: Conn, args: argparse.Namespace, console: Console) -> int:
    flt = DeadLetterFilter(target_id=args.target, since=args.since)
    rows, _ = await store.list_dead_letters(conn, args.tenant, flt, limit=args.limit, cursor=None)
    data = [{**render_delivery(r), "tenant_id": r.tenant_id} for r in rows]
    if args.json:
        print(dumps(data))
        return 0
    table = Table(title=plural(len(data), "dead letter"))
    _id_column(table, "id")
    if args.wide:
        _id_column(table, "tenant")
        _id_column(table, "target")
    table.add_column("tries", no_wrap=True, justify="right")
    table.add_column("status", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("last error", overflow="fold", ratio=1)
    for d in data:
        table.add_row(
            d["id"],
            *((d["tenant_id"], d["target_id"]) if args.wide else ()),
            str(d["attempt_count"]),
            str(d["last_status_code"] or "-"),
            d["created_at"].strftime("%m-%d %H:%M"),
            (d["last_error"] or "")[:60],
        )
    console.print(table)
    return 0


async def _show(conn: Conn, args: argparse.Namespace, console: Console) -> int:
    row = await deliveries.get_delivery_any_tenant(conn, args.id)
    if row is None:
        print(f"relay: no delivery {args.id}", file=sys.stderr)
        return 1
    attempts = [render_attempt(a) for a in await deliveries.attempts_of(conn, row.id)]
    data = {**render_delivery(row), "tenant_id": row.tenant_id, "attempts": attempts}
    if args.json:
        print(dumps(data))
        return 0
    for label, key in (
        ("delivery", "id"),
        ("event", "event_id"),
        ("target", "target_id"),
        ("tenant", "tenant_id"),
    ):
        console.print(f"{label:9}{data[key]}", soft_wrap=True)
    console.print(f"{'status':9}{data['status']}")
    table = Table(title=plural(len(attempts), "attempt"))
    table.add_column("started (UTC)", no_wrap=True)
    table.add_column("ms", no_wrap=True, justify="right")
    table.add_column("status", no_wrap=True)
    for column in ("error", "response"):
        table.add_column(column, overflow="fold", ratio=1)
    for a in attempts:
        table.add_row(
            a["started_at"].strftime("%m-%d %H:%M:%S"),
            str(a["duration_ms"]),
            str(a["status_code"] or "-"),
            a["error"] or "",
            (a["response_body"] or "")[:200],
        )
    console.print(table)
    return 0


async def _replay_ids(conn: Conn, args: argparse.Namespace, console: Console) -> int:
    ids = list(dict.fromkeys(args.ids))
    if args.tenant or args.target or args.since:
        print("relay: give ids, or --tenant/--target/--since, not both", file=sys.stderr)
        return 2
    gone = await store.dead_letters_of_deleted_targets(conn, None, ids)
    if gone:
        print(f"relay: the target of {', '.join(gone)} is deleted: not replayed", file=sys.stderr)
        return 1
    count = await store.count_dead_letters(conn, None, DeadLetterFilter(ids=ids, replayable=True))
    missing = len(ids) - count
    if missing:
        verb = "is" if missing == 1 else "are"
        print(f"relay: {missing} of the ids {verb} not a dead letter", file=sys.stderr)
    if count and not _confirm(f"Replay {plural(count, 'dead letter')}?", args):
        return 1
    replayed = []
    if count:
        replayed = await store.replay_dead_letters_batch(
            conn,
            None,
            target_id=None,
            since=None,
            ids=ids,
            up_to_id=None,
            batch=len(ids),
            enqueue_grace_s=0,
        )
    data = {"replayed": len(replayed), "ids": [r.id for r in replayed]}
    _report(data, f"replayed {plural(len(replayed), 'dead letter')}", args, console)
    return 0 if len(replayed) == len(ids) else 1


async def _replay(conn: Conn, args: argparse.Namespace, console: Console) -> int:
    if args.ids:
        return await _replay_ids(conn, args, console)
    up_to = await store.newest_dead_letter_id(conn)
    count = (
        0
        if up_to is None
        else await store.count_dead_letters(
            conn,
            args.tenant,
            DeadLetterFilter(
                target_id=args.target, since=args.since, up_to_id=up_to, replayable=True
            ),
        )
    )
    if count and not _confirm(f"Replay {plural(count, 'dead letter')}?", args):
        return 1
    replayed = 0
    if up_to is not None and count:
        # no message: the sweeper of any running worker sends them within a second
        async for batch in store.replay_in_batches(
            conn,
            args.tenant,
            target_id=args.target,
            since=args.since,
            up_to_id=up_to,
            enqueue_grace_s=0,
        ):
            replayed += len(batch)
    _report({"replayed": replayed}, f"replayed {plural(replayed, 'dead letter')}", args, console)
    return 0


async def _purge(conn: Conn, args: argparse.Namespace, console: Console) -> int:
    if not _confirm(f"Delete dead letters created before {args.since.isoformat()}?", args):
        return 1
    # a key of an ordered target blocked on a purged letter goes on: the sweeper sends it
    purged = await store.purge_dead_letters(
        conn, args.tenant, target_id=args.target, older_than=args.since, enqueue_grace_s=0
    )
    _report({"purged": purged}, f"purged {plural(purged, 'dead letter')}", args, console)
    return 0


def _report(data: dict[str, Any], text: str, args: argparse.Namespace, console: Console) -> None:
    if args.json:
        print(json.dumps(data))
    else:
        console.print(text)


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one ``dlq`` sub-command."""
    console = Console()
    handlers = {"list": _list, "show": _show, "replay": _replay, "purge": _purge}
    conn = await connect(settings.database_url)
    try:
        return await handlers[args.dlq_command](conn, args, console)
    finally:
        await conn.close()
