"""SQL shared by the store modules: keyset pages, partial updates and named fragments."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from ulid import ULID

#: How far apart the clocks of the processes that make ids may be: a row's id (made by
#: its process's clock) may fall before the id of the row it was made after (another
#: process's, or Postgres's): an attempt's before its delivery's, a delivery's before
#: its event's.
CLOCKS_APART = timedelta(hours=1)


def floor_id(prefix: str, at: datetime) -> str:
    """The lowest id of type ``prefix`` that can have been made at or after ``at``.

    Ids are ULIDs whose first ten characters are the creation time, so
    ``id >= floor_id(prefix, t)`` is a range of the key holding every row made at or
    after ``t``: passed as a value, it lets the planner leave out the days' partitions
    (migration 0012) made before it.
    """
    return f"{prefix}_{str(ULID.from_datetime(at))[:10]}{'0' * 16}"


def id_time(row_id: str) -> datetime | None:
    """When the row ``row_id`` (``prefix_ULID``) was made; None if it holds no ULID."""
    _, _, ulid = row_id.partition("_")
    try:
        return ULID.from_str(ulid).datetime
    except ValueError:
        return None


def _floor_before(prefix: str, at: datetime | None, by: timedelta) -> str | None:
    """``floor_id(prefix, at - by)``; None (no bound) without ``at``, or when that is
    before the epoch (an id of its first hours)."""
    try:
        return None if at is None else floor_id(prefix, at - by)
    except OverflowError:
        return None


def made_since(prefix: str, parent_id: str) -> str | None:
    """The lowest id of type ``prefix`` that a row made after the row ``parent_id`` can
    have (an attempt of a delivery, a delivery of an event): ``parent_id``'s time, less
    ``CLOCKS_APART``; None when ``parent_id`` holds no ULID (no bound, no row missed)."""
    return _floor_before(prefix, id_time(parent_id), CLOCKS_APART)


#: A list newest first reads the rows of the days since this long before its newest
#: first (``newest_first``).
RECENT = timedelta(days=1)


async def newest_first(
    fetch: Callable[[str | None, str | None, int], Awaitable[list[Any]]],
    prefix: str,
    cursor: str | None,
    want: int,
) -> list[Any]:
    """Up to ``want`` rows of a list by id newest first, below ``cursor``: first those
    made in the ``RECENT`` days before the cursor (or now), then, if they are fewer,
    the older ones.

    ``fetch(lo, hi, n)``: up to ``n`` rows with ``lo <= id < hi`` (None: unbounded),
    newest first. The two reads split the ids at one bound, so the rows and their order
    are those of one read. The history is partitioned by day of id (migration 0012),
    and a read of every id below the cursor starts a scan of every day's partition to
    take a page of the newest (a merge of them all, for deliveries, whose sent ones are
    partitioned under their status): with 40 days of 2 M events kept, a page of a
    tenant's events cost 5.5 ms and of its deliveries 6.4 ms; read from the last day
    first, 2.3-3.0 and 2.0-2.3 ms (bench/RESULTS.md, 2026-12-08). The older days are
    read only when the recent ones do not fill the page.
    """
    newest = datetime.now(UTC) if cursor is None else id_time(cursor)
    lo = _floor_before(prefix, newest, RECENT)
    if lo is None:
        return await fetch(None, cursor, want)
    rows = await fetch(lo, cursor, want)
    if len(rows) < want:
        # (below the cursor still: one of another type may sort below the bound)
        below = lo if cursor is None else min(lo, cursor)
        rows += await fetch(None, below, want - len(rows))
    return rows


def keyset_page(rows: Sequence[Any], limit: int) -> tuple[list[Any], str | None]:
    """Rows fetched with ``LIMIT limit + 1`` -> (the page, the next cursor or None)."""
    if len(rows) > limit:
        return list(rows[:limit]), rows[limit - 1]["id"]
    return list(rows), None


def set_clause(
    changes: Mapping[str, Any], allowed: frozenset[str], *, first_param: int
) -> tuple[str, list[Any]]:
    """``col = $n, …`` for a PATCH; column names come only from ``allowed``."""
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    parts = [f"{column} = ${first_param + i}" for i, column in enumerate(changes)]
    return ", ".join([*parts, "updated_at = now()"]), list(changes.values())


def optional_filters(*filters: tuple[str, str, Any] | None) -> str:
    """The AND of a list's optional filters, each written plainly when it is given.

    Each filter is ``(parameter, condition, value)``: the parameter with its cast
    (``"$3::text"``) and the condition that uses it (``"d.status = $3::text"``). A
    filter whose value is None is written ``$3::text IS NULL`` instead: true, and the
    parameter keeps its type and place. So each combination of filters is a
    statement of its own, whose conditions an index can serve in any plan; the
    catch-all ``($1::text IS NULL OR d.tenant_id = $1)`` is one no index serves.
    A filter given as None is left out (its parameter is used elsewhere).
    """
    return (
        "\n AND ".join(
            f"{param} IS NULL" if value is None else f"({condition})"
            for param, condition, value in filter(None, filters)
        )
        or "TRUE"
    )


def pinned_order(
    pins: Sequence[tuple[str, str, Any]], key: str, *, descending: bool
) -> tuple[str, str]:
    """(condition, ORDER BY) of a keyset list of the rows whose pinned columns equal
    their parameters, in ``key`` order; ``pins`` are ``(column, parameter, value)``,
    and a pin whose value is None is written ``$p IS NULL`` (as ``optional_filters``
    does), not pinned.

    Each pin is written ``col >= $p AND col <= $p`` and leads the ORDER BY. Written
    ``col = $p``, Postgres drops the column from the ORDER BY (it is constant),
    and ``ORDER BY id DESC`` alone is served by the primary key too. A generic plan
    (what a prepared statement may run from its sixth execution, costed from
    1/n_distinct of the rows per tenant) or a plan costed for a big tenant then
    reads the newest rows of every tenant and filters them until the page is full:
    for a small tenant, past all the others' history. Kept in the ORDER BY, the
    pinned columns are served only by an index that leads with them (the events'
    and deliveries' ``(tenant_id, id DESC)``), which reads this tenant's rows only.
    """
    given = [(c, p) for c, p, value in pins if value is not None]
    condition = " AND ".join(
        [f"{c} >= {p} AND {c} <= {p}" for c, p in given]
        + [f"{p} IS NULL" for _, p, value in pins if value is None]
    )
    # an index (pins…, key DESC) read forward gives key DESC; backward, key ascending
    pin_direction = "" if descending else " DESC"
    order = [f"{c}{pin_direction}" for c, _ in given]
    return condition or "TRUE", ", ".join([*order, f"{key} DESC" if descending else key])


# --- big arrays as text ---------------------------------------------------------
#
# asyncpg encodes a list argument element by element, asking of each whether it is a
# sub-array (two abstract-class checks per element, in Python's ``abc``): the ingest of
# 1,000 events to ten ordered targets sent ~80,000 elements, ~4 ms of the gateway's
# event loop for every 10,000. Sent as one text (``$n::text::text[]``), the same array
# is built in about a quarter of that time and parsed by Postgres.


def text_array(values: Sequence[str | None]) -> str:
    """``values`` as a Postgres array literal, to be cast with ``::text::text[]``.

    Every element is double-quoted, with its backslashes and double quotes escaped,
    so that any text (commas, braces, spaces, ``NULL``, an empty string) comes back
    as it was; None is NULL.
    """
    if not values:
        return "{}"
    plain = None not in values
    strings = values if plain else [v for v in values if v is not None]
    joined = '","'.join(strings)  # type: ignore[arg-type]
    if '"' in joined or "\\" in joined:
        values = [
            None if v is None else v.replace("\\", "\\\\").replace('"', '\\"') for v in values
        ]
    elif plain:
        return '{"' + joined + '"}'
    return "{" + ",".join("NULL" if v is None else '"' + v + '"' for v in values) + "}"


def int_array(values: Sequence[int | None]) -> str:
    """``values`` as a Postgres array literal, to be cast with ``::text::int8[]``."""
    return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"


# --- named fragments: each SQL rule that several statements share, written once ---

#: First key of the advisory locks of ordered keys ("ord").
ORDER_LOCK = 0x6F7264
#: Buckets per target: a key's lock is its bucket's, so a transaction takes at most
#: this many locks per ordered target, whatever the number of keys.
KEY_LOCK_BUCKETS = 4


def key_lock(target: str, key: str) -> str:
    """The advisory lock (second half; the first is ``ORDER_LOCK``) of ``key`` of ``target``.

    Keys share their target's ``KEY_LOCK_BUCKETS`` locks: a key's lock is its bucket's.
    Holding more than one key's lock is always safe (only more exclusion), and takes
    no more than the buckets: a request of 1,000 keys to 10 ordered targets takes at
    most 40 locks, not 10,000 (Postgres's lock table is shared by the whole cluster).
    """
    return f"hashtext({target} || '/' || (hashtext({key}) & {KEY_LOCK_BUCKETS - 1}))"


def key_locks(targets: str, keys: str, lock: str) -> str:
    """An expression that takes the advisory lock of each distinct (target, key), held to commit.

    The locks are taken in one order everywhere (sorted by hash), so two
    transactions locking overlapping keys cannot deadlock; a transaction that
    locks keys again later locks only keys it already holds. ``targets``/``keys``:
    parameters holding parallel text arrays; ``lock``: the parameter holding
    ``ORDER_LOCK``. Its value is the number of locks taken (at most
    ``KEY_LOCK_BUCKETS`` per target).
    """
    return f"""(
        SELECT count(pg_advisory_xact_lock({lock}, k.h)) FROM (
            SELECT DISTINCT {key_lock("u.target_id", "u.order_key")} AS h
            FROM unnest({targets}::text[], {keys}::text[]) AS u(target_id, order_key) ORDER BY 1
        ) k
    )"""


def holds_key(p: str, t: str) -> str:
    """True for a delivery ``p`` that holds its key's queue (its target is ``t``).

    Undelivered ones (pending, retrying) do, and dead ones while the target
    blocks on dead letters (``on_dead = 'block'``); a key's later deliveries
    wait behind them.
    """
    return (
        f"{p}.status IN ('pending', 'retrying', 'dead')"
        f" AND ({p}.status <> 'dead' OR {t}.on_dead = 'block')"
    )


def key_queue_order(p: str) -> str:
    """ORDER BY of a key's queue: its active delivery first, then the parked ones by position."""
    return f"({p}.status = 'pending' AND {p}.next_attempt_at IS NULL), {p}.order_pos"


def about_target(e: str, target: str) -> str:
    """Operational event ``e`` is about target ``target`` (NULL: any): the target's own, or
    the death of one of its deliveries."""
    return f"""({target}::text IS NULL OR ({e}.object_type = 'Target' AND {e}.object_id = {target})
        OR ({e}.object_type = 'Delivery' AND EXISTS (
            SELECT 1 FROM deliveries d WHERE d.id = {e}.object_id AND d.target_id = {target})))"""


def bump_config(changed: str, tenant: str = "$1") -> str:
    """A statement (for a WITH) that bumps the tenant's ``config_version`` if ``changed`` has rows.

    Every change to a tenant's sources or targets does this in the statement or
    transaction that makes it, after locking the row it changes (so the lock
    order is: that row, then the tenant's). Gateways check the version when they
    store events (``relay/store/events.py``): read your writes on every process.
    """
    return (
        f"UPDATE tenants SET config_version = config_version + 1"
        f" WHERE id = {tenant} AND EXISTS (SELECT 1 FROM {changed})"
    )


def hold_reason(t: str, h: str) -> str:
    """Why a due delivery of target ``t`` (its health ``h``, outer-joined) is not sent now:
    ``'disabled'``, ``'circuit'`` (its breaker is not closed), ``'rate_limit'``, or NULL."""
    return (
        f"CASE WHEN NOT {t}.enabled THEN 'disabled'"
        f" WHEN {h}.breaker <> 'closed' THEN 'circuit'"
        f" WHEN {h}.rate_limited_until > now() THEN 'rate_limit' END"
    )
