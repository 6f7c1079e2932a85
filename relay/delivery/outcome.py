"""What one attempt's answer means for its delivery: pure functions, tested by table.

The schedule is data (RELAY_RETRY_SCHEDULE): entry ``k`` is the wait before
attempt ``k + 1``, so N entries allow N attempts. A failure after the last
one makes the delivery dead.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, NamedTuple

from relay.delivery.signing import signature_header

JITTER = 0.2
#: A Retry-After is honoured up to a day; a larger value is a bug or an attack.
MAX_RETRY_AFTER_S = 86_400.0
SCHEDULED = "scheduled"
_DELTA_SECONDS = re.compile(r"[0-9]+", re.ASCII)


BreakerState = Literal["closed", "open", "half_open"]


class Breaker(NamedTuple):
    """A target's circuit breaker."""

    state: BreakerState
    consecutive_failures: int
    opened_count: int
    reason: str | None
    #: set when the breaker (re)opens now: how long it stays open
    open_for_s: float | None = None


CLOSED = Breaker("closed", 0, 0, None)


def trips_breaker(status_code: int | None, error: str | None) -> bool | None:
    """What an attempt says of its target's health.

    False: the target answered below 500 (healthy, whatever it thought of the
    event). True: a timeout, a connection error or a 5xx (the kind that ties up
    workers). None: neither (refused by the egress policy before any traffic).
    """
    if status_code is not None:
        return status_code >= 500
    if error is not None and error.startswith("refused by egress policy"):
        return None
    return True


def next_breaker(
    breaker: Breaker,
    failures: Sequence[tuple[bool | None, str]],
    *,
    threshold: int,
    open_s: float,
    max_open_s: float,
) -> Breaker:
    """The breaker after some attempts, in the order they ended: (trips, what happened).

    Closed, it opens after ``threshold`` failures in a row. Open, it stays so
    for ``open_s``, doubled at each reopening up to ``max_open_s``; then one
    probe goes through (half_open): a success closes it, a failure reopens it.
    Failures of attempts sent before it opened only count.
    """
    state, failed, opened, reason = (
        breaker.state,
        breaker.consecutive_failures,
        breaker.opened_count,
        breaker.reason,
    )
    open_for: float | None = None
    for trips, what in failures:
        if trips is None:
            continue
        if not trips:
            state, failed, opened, reason, open_for = "closed", 0, 0, None, None
            continue
        failed += 1
        if state == "half_open" or (state == "closed" and failed >= threshold):
            opened += 1
            open_for = min(open_s * 2 ** min(opened - 1, 30), max_open_s)
            reason = (
                f"the probe failed ({what})"
                if state == "half_open"
                else f"{failed} failures in a row (last: {what})"
            )
            state = "open"
    return Breaker(state, failed, opened, reason, open_for)


@dataclass(frozen=True)
class Outcome:
    """The delivery's next state after an attempt."""

    status: str  # succeeded | retrying | dead
    delay_s: float | None = None  # until the next attempt, when retrying
    disable_target: str | None = None  # reason, when the target must be disabled
    reason: str | None = None


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent or bad.

    Delta-seconds are ASCII digits only: ``str.isdigit`` also accepts "²" or
    "٣", which are not HTTP and which ``float`` may refuse.
    """
    if value is None:
        return None
    value = value.strip(" \t")
    if _DELTA_SECONDS.fullmatch(value):
        # a longer wait than a day is not honoured (and 400 digits would be infinity)
        return float(
            min(int(value[:12]) if len(value) <= 12 else MAX_RETRY_AFTER_S, MAX_RETRY_AFTER_S)
        )
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, (when - now).total_seconds()), MAX_RETRY_AFTER_S)


def jittered(seconds: float, rand: Callable[[], float] = random.random) -> float:
    """``seconds`` ± 20 %."""
    return seconds * (1 - JITTER + 2 * JITTER * rand())


def decide(
    *,
    status_code: int | None,
    attempt_number: int,
    schedule: Sequence[float],
    retry_after_s: float | None = None,
    rand: Callable[[], float] = random.random,
) -> Outcome:
    """The outcome of attempt ``attempt_number`` (1-based) that got ``status_code`` (None: none)."""
    if status_code is not None and 200 <= status_code < 300:
        return Outcome("succeeded")
    if status_code == 410:
        return Outcome("dead", disable_target="the target answered 410 Gone", reason="410 Gone")
    if attempt_number >= len(schedule):
        return Outcome("dead", reason=f"no success after {attempt_number} attempts")
    delay = jittered(schedule[attempt_number], rand)
    if status_code in (429, 503) and retry_after_s is not None and math.isfinite(retry_after_s):
        delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
    return Outcome("retrying", delay_s=delay)


def delivery_headers(
    *,
    event_id: str,
    body: bytes,
    secrets: Sequence[str],
    timestamp: int,
    target_headers: dict[str, str],
) -> dict[str, str]:
    """The headers of one attempt: the target's own, then the signature and content type."""
    headers = dict(target_headers)
    headers["content-type"] = "application/json"
    headers["webhook-id"] = event_id
    headers["webhook-timestamp"] = str(timestamp)
    headers["webhook-signature"] = signature_header(secrets, event_id, timestamp, body)
    return headers
