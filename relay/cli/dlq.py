"""`relay dlq`: the operators' dead-letter tools, straight against Postgres.

Replays put dead letters back to pending with no broker message; the
sweeper of any running `relay worker` enqueues them within a second, so the
CLI needs only DATABASE_URL.
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
    table = Table(title=f"{len(data)} dead letters")
    for column in ("id", "tenant", "target", "attempts", "last status", "last error", "created"):
        table.add_column(column, overflow="fold")
    for d in data:
        table.add_row(
            d["id"],
            d["tenant_id"],
            d["target_id"],
            str(d["attempt_count"]),
            str(d["last_status_code"] or "-"),
            (d["last_error"] or "")[:60],
            dumps(d["created_at"]).strip('"'),
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
    console.print(
        f"[bold]{data['id']}[/bold]  {data['status']}  event {data['event_id']}  "
        f"target {data['target_id']}  tenant {data['tenant_id']}"
    )
    table = Table(title=f"{len(attempts)} attempts")
    for column in ("started", "ms", "status", "error", "response"):
        table.add_column(column, overflow="fold")
    for a in attempts:
        table.add_row(
            dumps(a["started_at"]).strip('"'),
            str(a["duration_ms"]),
            str(a["status_code"] or "-"),
            a["error"] or "",
            (a["response_body"] or "")[:200],
        )
    console.print(table)
    return 0


async def _replay(conn: Conn, args: argparse.Namespace, console: Console) -> int:
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
    if count and not _confirm(f"Replay {count} dead letters?", args):
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
    _report({"replayed": replayed}, f"replayed {replayed} dead letters", args, console)
    return 0


async def _purge(conn: Conn, args: argparse.Namespace, console: Console) -> int:
    if not _confirm(f"Delete dead letters created before {args.since.isoformat()}?", args):
        return 1
    # a key of an ordered target blocked on a purged letter goes on: the sweeper sends it
    purged = await store.purge_dead_letters(
        conn, args.tenant, target_id=args.target, older_than=args.since, enqueue_grace_s=0
    )
    _report({"purged": purged}, f"purged {purged} dead letters", args, console)
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
