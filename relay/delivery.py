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

from relay.signing import signature_header

JITTER = 0.2
#: A Retry-After is honoured up to a day; a larger value is a bug or an attack.
MAX_RETRY_AFTER_S = 86_400.0
SCHEDULED = "scheduled"
_DELTA_SECONDS = re.compile(r"[0-9]+", re.ASCII)


@dataclass(frozen=True)
class Outcome:
    """The delivery's next state after an attempt."""

    status: str  # succeeded | retrying | dead
    delay_s: float | None = None  # until the next attempt, when retrying
    disable_target: str | None = None  # reason, when the target must be disabled
    reason: str | None = None


#: The longest Retry-After honoured (seconds).
MAX_RETRY_AFTER_S = 86_400


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
