"""`relay dlq`'s command line: kept apart from the tools so that building the
`relay` parser imports nothing heavy (the gateway supervisor builds it too)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime


def parse_since(value: str) -> datetime:
    """An RFC 3339 time; a naive one is taken as UTC."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dlq`` sub-commands and their options."""
    commands = parser.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tenant", help="only this tenant's dead letters")
    common.add_argument("--target", help="only this target's dead letters")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    listing = commands.add_parser("list", parents=[common], help="list dead letters, newest first")
    listing.add_argument("--since", type=parse_since, help="created at or after this time")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument(
        "--wide",
        action="store_true",
        help="also the tenant and target columns (needs ~140 columns)",
    )
    show = commands.add_parser("show", help="one dead letter with its attempts")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    replay = commands.add_parser(
        "replay",
        parents=[common],
        help="send dead letters again: these ids, or all that --tenant/--target/--since select",
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="dead letters to replay (dlv_…)")
    replay.add_argument("--since", type=parse_since, help="created at or after this time")
    replay.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge = commands.add_parser("purge", parents=[common], help="delete old dead letters")
    purge.add_argument(
        "--since",
        type=parse_since,
        required=True,
        help="delete dead letters created before this time",
    )
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
