"""Claiming a target's due deliveries and recording their attempts.

Postgres decides. A delivery is claimed with a lease (``locked_until``): while
it holds, no other worker may attempt it, and the target's leases are counted
(in ``delivery_leases``) against its cap. ``enqueued_until`` says until when
somebody carries a waiting delivery (a broker message or a worker's timer; a
lease carries it while it holds); past it, the sweeper wakes the delivery's
target. The breaker's state is read and written here too, in the same
transactions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, cast

from relay.core.crypto import new_id
from relay.delivery.ordering import OnDead
from relay.delivery.outcome import CLOSED, Breaker, BreakerState
from relay.store.db import Conn, Queries, fetch_past_moves
from relay.store.key_queues import lock_keys, promote_keys
from relay.store.rows import DeliveryStatus, Replayed, Wake
from relay.store.sql import ORDER_LOCK

#: First key of the advisory lock that serialises the claims of one target.
_CLAIM_LOCK = 0x636C61  # "cla"


@dataclass(frozen=True)
class SendTarget:
    """A target as the engine sends to it, with its breaker."""

    id: str
    tenant_id: str
    url: str
    headers_enc: bytes | None
    secret_enc: bytes
    previous_secret_enc: bytes | None
    secret_rotated_at: datetime | None
    rate_limit: int | None
    max_in_flight: int
    live: bool  # enabled and not deleted
    #: every attempt has failed since ``failing_since`` (auto-disable)
    failing: bool
    breaker: BreakerState
    consecutive_failures: int
    #: the breaker is open and its open period has not ended
    cooling: bool
    open_until: datetime | None
    #: an ordered key whose delivery died waits for a replay or purge ("block")
    on_dead: OnDead

    @classmethod
    def from_row(cls, row: Any) -> SendTarget:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


class Claimed(NamedTuple):
    """One claimed delivery: ours to attempt until ``locked_until``."""

    id: str
    event_id: str
    attempt_count: int
    locked_until: datetime
    payload: bytes
    #: its ordering key (None: the target does not order it)
    order_key: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Claimed:
        return cls(
            row["id"],
            row["event_id"],
            row["attempt_count"],
            row["locked_until"],
            row["payload"],
            row["order_key"],
        )


class BreakerChange(NamedTuple):
    """A record opened or closed a target's breaker: what it was, is, and until when."""

    before: Breaker
    after: Breaker
    #: when the open period ends (None: closed)
    until: datetime | None


@dataclass(frozen=True)
class Attempt:
    """One attempt's result and the delivery's next state, to record."""

    delivery: Claimed
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    response_body: str | None
    status: DeliveryStatus
    #: until the next attempt (None: no next attempt)
    delay_s: float | None
    #: somebody (a timer of this worker) carries the delivery until this long from now;
    #: None: nobody but the sweeper, from when it is due
    carried_for_s: float | None
    disable_reason: str | None


# One call claims (migrations 0016, 0018, 0019: the lock, the target read after it,
# the claim, the cap's share among drainers, the payloads up to INLINE_PAYLOAD_BYTES):
# see relay_claim() there. Its transaction commits without waiting for its WAL to
# reach the disk (synchronous_commit off, for that transaction only): a claim is a
# lease, and a lease that a crash of Postgres loses is a delivery claimed again, as
# when a worker dies holding it (an attempt in flight then may be made twice: at
# least once, as always). The record that follows is a synchronous commit, and
# flushes the claim's WAL with its own. It saves each claim a flush of the WAL
# (bench/pg_cycle.py, a claim's wall time a delivery: 40.0 -> 29.6 us at claims of
# 64, ~425 -> 310 us at claims of one).
_CLAIM = (
    "SELECT c.* FROM relay_claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) c,"
    " set_config('synchronous_commit', 'off', true) AS no_flush"
)

#: A claim answers its events' payloads up to this many bytes in all (no round trip
#: more); the others are read apart, a row each, once the claim's transaction (and its
#: lock on the target) has ended: ten 900 KB payloads answered as one array cost
#: Postgres ~100 ms a claim, and another tenant's deliveries waited (migration 0019).
INLINE_PAYLOAD_BYTES = 256 * 1024

# The payloads a claim left out, by their events' ids (migration 0019).
_PAYLOADS = "SELECT id, payload FROM relay_payloads($1::text[])"


class Share(NamedTuple):
    """What one claim took of a target's cap."""

    #: the target as read (None: it does not exist)
    target: SendTarget | None
    rows: list[Claimed]
    #: drainers in other worker processes that share the cap (as the claim saw)
    sharers: int
    #: due deliveries were left because other drainers' leases filled the cap
    kept_out: bool
    #: the claim keeps this drainer's share of the cap (a row in drain_shares)
    sharing: bool


#: A drainer that saw a backlog shares its target's cap this long after its last claim.
SHARE_S = 5.0
#: A cap is shared only in parts of this many or more (a cap under twice this stays
#: with one drainer): a smaller part costs a claim and a record per few deliveries.
SHARE_MIN_PART = 16


def part_of_cap(cap: int, sharers: int) -> int:
    """A drainer's part of a cap that ``sharers`` other drainers share with it."""
    return -(-cap // (1 + sharers))


async def claim_batch(
    conn: Conn, target_id: str, *, want: int, lease_s: float
) -> tuple[SendTarget | None, list[Claimed]]:
    """Claim up to ``want`` due deliveries of a target, within its cap and its breaker."""
    share = await claim_share(conn, target_id, want=want, lease_s=lease_s)
    return share.target, share.rows


async def claim_share(
    conn: Conn,
    target_id: str,
    *,
    want: int,
    lease_s: float,
    holder: str | None = None,
    holding: int = 0,
    ending: Sequence[str] = (),
    ahead: int = 0,
) -> Share:
    """Claim up to ``want`` due deliveries of a target, within its cap and its breaker.

    One call (relay_claim, migrations 0016, 0018 and 0019), payloads included (a
    big one is read apart after it: ``INLINE_PAYLOAD_BYTES``). The claims of one
    target are serialised (an advisory lock for the length of that call's
    transaction), so the count of leases and the new ones agree across every
    worker process: the target never has more than ``max_in_flight`` attempts in
    flight. An open breaker claims nothing until its open period ends; then one
    probe is claimed and the breaker is half_open until it is recorded (or its
    lease lapses).

    ``holder`` (a drainer, unique across processes) holding ``holding`` leases
    of the target shares its cap with the other drainers that saw a backlog of
    it: it takes no more than its part (the cap divided among them, in parts of
    ``SHARE_MIN_PART`` or more), so a second worker process woken for a busy
    target gets room as the first one's attempts end, instead of finding the
    cap always full.

    ``ending``: leases of this drainer whose attempts have ended, and whose record
    is on its way (another connection): they are not in flight at the target, so
    the claim does not count them against the cap, and a drainer can claim their
    replacements while it records them.

    ``ahead``: leases past its part that the holder may take while no other
    drainer holds a lease of the target and its breaker is closed (migration
    0024). Its process starts no more than its part at once, and queues the
    rest; another drainer's claim counts them as in flight, so the cap stays
    strict across processes.
    """
    row = await conn.fetchrow(
        _CLAIM,
        target_id,
        _CLAIM_LOCK,
        want,
        lease_s,
        holder,
        holding,
        SHARE_S,
        SHARE_MIN_PART,
        list(ending),
        INLINE_PAYLOAD_BYTES,
        ahead,
    )
    if row is None:
        return Share(None, [], 0, False, False)
    target = SendTarget.from_row(row)
    payloads: dict[str, bytes | None] = dict(zip(row["payload_ids"], row["payloads"], strict=True))
    claimed = list(
        zip(
            row["claimed"],
            row["event_ids"],
            row["attempt_counts"],
            row["leases"],
            row["order_keys"],
            strict=True,
        )
    )
    if big := [event_id for event_id, payload in payloads.items() if payload is None]:
        # read apart, after the claim's transaction: the leases keep these events, and
        # a payload never changes
        try:
            payloads.update((r["id"], r["payload"]) for r in await conn.fetch(_PAYLOADS, big))
        except Exception:
            # the claim has committed: give its deliveries back now, no attempt spent,
            # rather than leave them leased (an ordered key held) for the lease's length
            taken = [Claimed(i, e, n, lease, b"", key) for i, e, n, lease, key in claimed]
            with contextlib.suppress(Exception):
                await release_batch(conn, taken, delay_s=0.0, carried_for_s=None)
            raise
    # (a delivery whose event is gone, which retention never leaves, is not attempted)
    return Share(
        target,
        [
            Claimed(i, e, n, lease, payload, key)
            for i, e, n, lease, key in claimed
            if (payload := payloads.get(e)) is not None
        ],
        row["sharers"],
        row["kept_out"],
        row["sharing"],
    )


async def end_share(conn: Queries, target_id: str, holder: str) -> None:
    """A drainer ends: the other drainers of the target have the cap without it."""
    await conn.execute(
        "DELETE FROM drain_shares WHERE target_id = $1 AND holder = $2", target_id, holder
    )


async def another_drains(conn: Queries, target_id: str, holder: str, *, within_s: float) -> bool:
    """Whether a drainer other than ``holder`` renewed its share of the target's cap in
    the last ``within_s`` seconds (its claims still find a backlog)."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM drain_shares WHERE target_id = $1 AND holder <> $2"
            " AND until > now() + make_interval(secs => $3))",
            target_id,
            holder,
            SHARE_S - within_s,
        )
    )


async def release_batch(
    conn: Queries, claimed: Sequence[Claimed], *, delay_s: float, carried_for_s: float | None
) -> None:
    """Give claims back without spending an attempt.

    They become due in ``delay_s``; ``carried_for_s``: a timer of this worker
    wakes the target then (None: the sweeper does, once they are due).
    """
    await conn.execute(
        """
        WITH released AS (
            UPDATE deliveries d
            SET locked_until = NULL,
                next_attempt_at = greatest(d.next_attempt_at, now() + make_interval(secs => $3)),
                enqueued_until = now() + make_interval(secs => $3 + coalesce($4::float8, 0)),
                updated_at = now()
            FROM unnest($1::text[], $2::timestamptz[]) AS r(id, lease)
            WHERE d.id = r.id AND d.locked_until = r.lease AND d.status IN ('pending', 'retrying')
            RETURNING d.id
        )
        DELETE FROM delivery_leases l USING unnest($1::text[], $2::timestamptz[]) AS r(id, lease)
        WHERE l.delivery_id = r.id AND l.locked_until = r.lease
          AND l.delivery_id IN (SELECT id FROM released)
        """,
        [c.id for c in claimed],
        [c.locked_until for c in claimed],
        delay_s,
        carried_for_s,
    )


async def mark_rate_limited(conn: Queries, target_id: str, *, for_s: float) -> None:
    """Say that a rate limit defers the target's claims for ``for_s`` (waiting_for "rate_limit").

    The mark lapses by itself: the engine renews it while its limiter defers.
    """
    await conn.execute(
        """
        INSERT INTO target_health AS h (target_id, rate_limited_until)
        VALUES ($1, now() + make_interval(secs => $2::float8))
        ON CONFLICT (target_id) DO UPDATE
        SET rate_limited_until = greatest(h.rate_limited_until, excluded.rate_limited_until)
        """,
        target_id,
        for_s,
    )


async def breaker_of(conn: Queries, target_id: str) -> Breaker:
    """A target's breaker, locked until the transaction ends (closed if it has no row)."""
    row = await conn.fetchrow(
        """
        SELECT breaker, consecutive_failures, opened_count, reason FROM target_health
        WHERE target_id = $1 FOR UPDATE
        """,
        target_id,
    )
    if row is None:
        return CLOSED
    return Breaker(
        cast(BreakerState, row["breaker"]),
        row["consecutive_failures"],
        row["opened_count"],
        row["reason"],
    )


async def save_breaker(conn: Queries, target_id: str, breaker: Breaker) -> datetime | None:
    """Store a target's breaker (an open period starts now, when ``open_for_s`` is set).

    Returns when its open period ends (None: closed).
    """
    until: datetime | None = await conn.fetchval(
        """
        INSERT INTO target_health AS h (target_id, breaker, consecutive_failures, opened_count,
                                        reason, open_until, changed_at)
        VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6::float8), now())
        ON CONFLICT (target_id) DO UPDATE
        SET breaker = excluded.breaker,
            consecutive_failures = excluded.consecutive_failures,
            opened_count = excluded.opened_count,
            reason = excluded.reason,
            open_until = CASE WHEN $6::float8 IS NOT NULL THEN excluded.open_until
                              WHEN excluded.breaker = 'closed' THEN NULL
                              ELSE h.open_until END,
            changed_at = CASE WHEN h.breaker = excluded.breaker AND $6::float8 IS NULL
                              THEN h.changed_at ELSE now() END
        RETURNING h.open_until
        """,
        target_id,
        breaker.state,
        breaker.consecutive_failures,
        breaker.opened_count,
        breaker.reason,
        breaker.open_for_s,
    )
    return until


# The record of a batch (migration 0018, relay_record(): its statement and what it
# answers are described there).
_RECORD = "SELECT * FROM relay_record($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
# The same, with the ended ordered deliveries' keys locked first and the next of each
# promoted after (migration 0020: relay/store/key_queues.py's statements).
_RECORD_ORDERED = (
    "SELECT * FROM relay_record_ordered(" + ", ".join(f"${n}" for n in range(1, 18)) + ")"
)


# A success ends the target's failing streak; when it had lasted $2 seconds or more,
# Target recovered (an operational event, in this transaction; none about an
# operational target). The row is locked by the record already.
_RECOVERED = """
WITH before AS (
    SELECT tenant_id, url, kind, failing_since FROM targets WHERE id = $1
), cleared AS (
    UPDATE targets SET failing_since = NULL WHERE id = $1
)
SELECT emit_operational(
    b.tenant_id, 'Target', 'recovered', $1,
    jsonb_build_object('url', b.url, 'failing_since', relay_rfc3339(b.failing_since))
)
FROM before b
WHERE b.kind = 'events' AND b.failing_since <= now() - make_interval(secs => $2::float8)
"""

# The record disables a live target ($2: why): Target disabled, in its transaction.
_DISABLED = """
SELECT emit_operational(
    tenant_id, 'Target', 'disabled', id, jsonb_build_object('url', url, 'reason', $2::text)
)
FROM targets WHERE id = $1 AND kind = 'events' AND enabled AND deleted_at IS NULL
"""


def _touches_target(failing: bool, succeeded: bool, disable: str | None) -> bool:
    """Whether a batch changes the target row: its failing state, or disabling it (a
    410 disables it even among successes of the same batch)."""
    return disable is not None or (failing and succeeded) or (not succeeded and not failing)


async def record_batch(
    conn: Conn,
    target_id: str,
    attempts: Sequence[Attempt],
    *,
    breaker: Callable[[Breaker], Breaker] | None,
    failing: bool | None = None,
    grace_s: float = 30.0,
    on_breaker: Callable[[BreakerChange], None] | None = None,
    recovered_after_s: float = 300.0,
) -> list[str]:
    """Record attempts of one target and their deliveries' new states atomically.

    Returns the ids recorded; an attempt whose lease was lost is not (another
    worker may hold the delivery now). ``breaker``: the new breaker as a function
    of the current one (read under lock), or None to leave it alone. ``failing``:
    whether the target was failing when claimed, a guess only: the record
    decides from the target row as it is in the recording transaction (another
    process may have changed it since the claim). An ordered delivery that ended
    (succeeded or dead) lets the next of its key become due, in the same
    transaction (``grace_s``: how long the sweeper leaves it to us).
    ``on_breaker`` is told, inside the transaction, when the breaker opens
    (or reopens) or closes; a caller that logs it does so once the record returns.
    The operational events the record causes are written in its transaction:
    Target ``disabled`` (a 410, or failing too long), Target ``recovered`` (a
    success after attempts failed for ``recovered_after_s`` or more); the
    breaker's and the deaths' come from triggers on the rows (migration 0010).

    Lock order, here as everywhere: the target row, then its health, then the
    ended deliveries' key locks, then the deliveries (``delete_target`` and PATCH
    lock the target first; retries, replays and purges take a key's lock before
    its rows). The target row is locked and written only when its failing state
    changes. When neither it nor the breaker changes (a healthy target), the
    record is one statement (in a transaction with the key locks when ordered
    deliveries ended) that checks the target's failing state as it writes; only
    if the guess was stale is it made again, under the target row's lock.
    """
    if not attempts:
        return []
    succeeded = any(a.status == "succeeded" for a in attempts)
    disable = next((a.disable_reason for a in attempts if a.disable_reason), None)
    args = (
        [a.delivery.id for a in attempts],
        [a.delivery.locked_until for a in attempts],
        [a.status for a in attempts],
        [a.delay_s for a in attempts],
        [a.carried_for_s for a in attempts],
        [a.status_code for a in attempts],
        [a.error for a in attempts],
        [new_id("att") for _ in attempts],
        [a.started_at for a in attempts],
        [a.duration_ms for a in attempts],
        [a.response_body for a in attempts],
        target_id,
    )
    ended_keys = {
        a.delivery.id: a.delivery.order_key
        for a in attempts
        if a.delivery.order_key is not None and a.status in ("succeeded", "dead")
    }

    async def write(expected: bool | None) -> list[str] | None:
        """The record (None: the target's failing state is not ``expected``; nothing written).

        With ordered deliveries ended: their keys locked, the record, and the next of
        each of their keys promoted, in one call (relay_record_ordered)."""
        if ended_keys:
            row = await conn.fetchrow(
                _RECORD_ORDERED,
                *args,
                expected,
                list(ended_keys),
                list(ended_keys.values()),
                ORDER_LOCK,
                grace_s,
            )
        else:
            row = await conn.fetchrow(_RECORD, *args, expected)
        assert row is not None  # the function always answers one row
        if expected is not None and row["failing"] != expected:
            return None
        return list(row["ids"])

    guess = bool(failing)
    if breaker is None and not _touches_target(guess, succeeded, disable):
        fast = await write(guess)  # one call: its own transaction
        if fast is not None:
            return fast
        # the guess was stale (nothing written): record under the target row's lock
    async with conn.transaction():
        failing_now = bool(
            await conn.fetchval(
                "SELECT failing_since IS NOT NULL FROM targets WHERE id = $1 FOR NO KEY UPDATE",
                target_id,
            )
        )
        touch_target = _touches_target(failing_now, succeeded, disable)
        if breaker is not None:
            before = await breaker_of(conn, target_id)
            after = breaker(before)
            if after != before:
                until = await save_breaker(conn, target_id, after)
                opened = after.open_for_s is not None
                closed = after.state == "closed" and before.state != "closed"
                if on_breaker is not None and (opened or closed):
                    on_breaker(BreakerChange(before, after, until))
        recorded = await write(None)
        assert recorded is not None
        if disable is not None:
            # only an answer that was recorded disables the target (a 410 whose lease
            # was lost is another worker's to make again)
            kept = set(recorded)
            disable = next(
                (a.disable_reason for a in attempts if a.disable_reason and a.delivery.id in kept),
                None,
            )
            touch_target = _touches_target(failing_now, succeeded, disable)
        if recorded and touch_target and succeeded and disable is None:
            await conn.execute(_RECOVERED, target_id, recovered_after_s)
        elif recorded and touch_target:
            if disable is not None:
                await conn.execute(_DISABLED, target_id, disable)
            await conn.execute(
                """
                UPDATE targets
                SET failing_since = coalesce(failing_since, $2),
                    enabled = CASE WHEN $3::text IS NULL THEN enabled ELSE false END,
                    disabled_reason = coalesce($3, disabled_reason),
                    updated_at = CASE WHEN $3::text IS NULL THEN updated_at ELSE now() END
                WHERE id = $1
                """,
                target_id,
                min(a.started_at for a in attempts),
                disable,
            )
    return recorded


# The retry window of a delivery began here (its creation, last retry or replay, or
# when its ordering key let it go).
_WINDOW_START = "coalesce(d.round_started_at, d.created_at)"

# Deliveries whose retry window ($1 seconds) has ended while their live target's
# breaker holds them (open, or half_open and they are not the probe): up to $2,
# one index probe per such target. Read without locks; _END_PAST_WINDOW checks again.
_PAST_WINDOW = f"""
SELECT d.id, d.target_id, d.order_key
FROM target_health h
JOIN targets t ON t.id = h.target_id AND t.enabled AND t.deleted_at IS NULL
CROSS JOIN LATERAL (
    SELECT d.id, d.target_id, d.order_key FROM deliveries d
    WHERE d.target_id = h.target_id AND d.status IN ('pending', 'retrying')
      AND d.next_attempt_at IS NOT NULL
      AND {_WINDOW_START} <= now() - make_interval(secs => $1::float8)
    ORDER BY {_WINDOW_START}
    LIMIT $2
) d
WHERE h.breaker <> 'closed'
LIMIT $2
"""

_END_PAST_WINDOW = f"""
UPDATE deliveries d
SET status = 'dead', next_attempt_at = NULL, enqueued_until = NULL, locked_until = NULL,
    last_error = 'circuit open: the retry window ended while the breaker held it ('
                 || coalesce(h.reason, 'no reason recorded') || ')',
    updated_at = now()
FROM target_health h, targets t
WHERE d.id = ANY($1::text[]) AND h.target_id = d.target_id AND h.breaker <> 'closed'
  AND t.id = d.target_id AND t.enabled AND t.deleted_at IS NULL
  AND d.status IN ('pending', 'retrying') AND d.next_attempt_at IS NOT NULL
  AND (d.locked_until IS NULL OR d.locked_until < now())
  AND {_WINDOW_START} <= now() - make_interval(secs => $2::float8)
RETURNING d.id, d.target_id, d.tenant_id, d.order_key
"""


class Ended(NamedTuple):
    """A delivery that became dead without another attempt."""

    id: str
    target_id: str
    tenant_id: str


async def end_past_window(
    conn: Conn, *, window_s: float, limit: int, grace_s: float
) -> tuple[list[Ended], list[Replayed]]:
    """End the deliveries an open breaker holds past their retry window.

    The breaker saves attempts but never lengthens a delivery's retry window
    (``window_s``: the schedule's total): a delivery whose window ends while
    its target's breaker is open (or half_open, and it is not the probe) becomes
    dead at once, without another attempt, ``last_error`` saying the circuit was
    open. A lease still held (the probe) is left to its record. An ordered key
    whose delivery ended this way goes on as after any death (``on_dead``); the
    deliveries made due are returned to be woken (``grace_s``: how long the
    sweeper leaves them to that wake-up). Keys' locks are taken before the rows.
    Returns the deliveries ended (up to ``limit``) and those made due.
    """
    async with conn.transaction():
        picked = await conn.fetch(_PAST_WINDOW, window_s, limit)
        if not picked:
            return [], []
        keys = sorted({(r["target_id"], r["order_key"]) for r in picked if r["order_key"]})
        await lock_keys(conn, keys)
        rows = await fetch_past_moves(conn, _END_PAST_WINDOW, [r["id"] for r in picked], window_s)
        ended_keys = sorted({(r["target_id"], r["order_key"]) for r in rows if r["order_key"]})
        promoted = await promote_keys(conn, ended_keys, grace_s=grace_s, locked=True)
    return [Ended(r["id"], r["target_id"], r["tenant_id"]) for r in rows], promoted


class LastLook(NamedTuple):
    """What a drainer that found all that was due sees once its attempts end."""

    #: a delivery of the target is due and not leased: claim
    due: bool
    #: seconds until its next waiting delivery falls due (None: it has none)
    due_in: float | None
    #: when its open breaker lets a probe through (None: it is not open)
    open_until: datetime | None


_LAST_LOOK = "SELECT due, due_in, open_until FROM relay_last_look($1)"  # (migration 0027)


async def last_look(conn: Queries, target_id: str) -> LastLook:
    """Whether the target has a due delivery no one holds, and when its next falls due,
    in one round trip: what a claim that finds nothing costs a drainer, at a fraction
    of a claim's price (no lock, no target row, no shares; tests/integration/
    test_drainer_last_look.py). The claim's own conditions: what this finds not due,
    a claim made now would not take. Planned with sequential scans off."""
    row = await conn.fetchrow(_LAST_LOOK, target_id)
    assert row is not None  # one row, always
    due_in = row["due_in"]
    return LastLook(row["due"], None if due_in is None else float(due_in), row["open_until"])


async def targets_to_wake(conn: Queries, *, grace_s: float, limit: int) -> list[Wake]:
    """Targets with a due delivery nobody carries, marked as woken for ``grace_s``.

    One index probe per live, enabled target whose breaker lets work through
    (passing over its leased deliveries, at most its cap of them): the cost
    follows the number of targets, not of waiting deliveries.
    """
    rows = await conn.fetch(
        """
        WITH due AS (
            SELECT t.id, t.tenant_id FROM targets t
            LEFT JOIN target_health h ON h.target_id = t.id
            WHERE t.enabled AND t.deleted_at IS NULL
              AND (h.swept_until IS NULL OR h.swept_until < now())
              AND (h.open_until IS NULL OR h.open_until <= now())
              AND EXISTS (
                  SELECT 1 FROM deliveries d
                  WHERE d.target_id = t.id AND d.status IN ('pending', 'retrying')
                    AND d.enqueued_until < now()
                    -- a lease carries its delivery (a claim leaves enqueued_until as it was)
                    AND (d.locked_until IS NULL OR d.locked_until < now())
              )
            LIMIT $1
        ), marked AS (
            INSERT INTO target_health AS h (target_id, swept_until)
            SELECT id, now() + make_interval(secs => $2) FROM due
            ON CONFLICT (target_id) DO UPDATE SET swept_until = excluded.swept_until
        )
        SELECT id, tenant_id FROM due
        """,
        limit,
        grace_s,
    )
    return [Wake(r["id"], r["tenant_id"]) for r in rows]


async def target_of_delivery(conn: Queries, delivery_id: str) -> Wake | None:
    """The target (and tenant) a delivery goes to."""
    row = await conn.fetchrow(
        "SELECT target_id, tenant_id FROM deliveries WHERE id = $1", delivery_id
    )
    return None if row is None else Wake(row["target_id"], row["tenant_id"])
