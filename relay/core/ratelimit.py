"""Rate limits shared by every process, kept in Redis: a sliding one-second window.

No one-second window, wherever it starts, holds more than the limit: counts
are kept in 100 ms slots, and a request is checked against the last 11 slots
(a little over a second, so the check never undercounts). A request of ``n``
units is admitted only if all ``n`` fit: a batch counts as its number of events
and is never let into an empty window whole. A request larger than the limit
itself can never fit, and says so. One Lua script on Redis's own clock, so every
gateway and worker shares it. Redis being unreachable admits the request:
losing an event costs more than exceeding a limit for a moment.

A tenant's budget (:meth:`RateLimiter.spend`) is a rate with a burst instead: a
body of up to the largest size must fit a budget of fewer bytes per second, once
it has recovered. It is the generic cell rate algorithm, one timestamp per key.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis.exceptions

from relay.core import errors
from relay.core.metrics import TENANT_BUDGET_REFUSED

log = logging.getLogger(__name__)

# The window: KEYS[1] is a hash of slot (100 ms) -> units; ARGV[2] the limit per
# second. Sets `now`, `slot`, `counts` (the last 11 slots) and their `sum`.
_WINDOW = """
local limit = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot = math.floor(now / 100)
local fields = {}
for i = 0, 10 do fields[i + 1] = tostring(slot - 10 + i) end
local counts = redis.call('HMGET', KEYS[1], unpack(fields))
local sum = 0
for i = 1, 11 do sum = sum + (tonumber(counts[i]) or 0) end
local function count(n)
  redis.call('HINCRBY', KEYS[1], tostring(slot), n)
  local old = {}
  for i = 11, 30 do old[i - 10] = tostring(slot - i) end
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('PEXPIRE', KEYS[1], 2000)
end
local function wait_for(n)
  local excess = sum + n - limit
  local freed = 0
  for i = 1, 11 do
    freed = freed + (tonumber(counts[i]) or 0)
    if freed >= excess then
      return (slot - 10 + i - 1 + 11) * 100 - now
    end
  end
  return 1000
end
"""

# ARGV[1]: units. Returns 0 when all are admitted (and counted), else the
# milliseconds until they would fit.
_SCRIPT = (
    _WINDOW
    + """
local n = tonumber(ARGV[1])
if sum + n <= limit then
  count(n)
  return 0
end
return wait_for(n)
"""
)

# ARGV[1]: units wanted. Takes as many as fit, up to those wanted: returns
# {taken, milliseconds until one more fits (0 if any were taken)}.
_TAKE = (
    _WINDOW
    + """
local n = math.min(tonumber(ARGV[1]), limit - sum)
if n > 0 then
  count(n)
  return {n, 0}
end
return {0, wait_for(1)}
"""
)

# A budget: ARGV[1] units per second, ARGV[2] the burst (units that may go at once
# after a quiet spell), ARGV[3] the units wanted. The generic cell rate algorithm:
# KEYS[1] holds the moment (whole microseconds, Redis's clock) when everything spent so
# far will have been paid back at the rate. A spend costs its units' time, and at least
# a microsecond: a double holds today's time in microseconds to a quarter of one, so a
# smaller cost would be lost (at 1e9 bytes/s, a 400-byte request was free). Storing
# whole microseconds is off by half of one at most, hence the half a microsecond the
# check allows. Returns 0 if the units fit now (and spends them), else the
# milliseconds until they would.
_BUDGET = """
local rate, burst, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stored = redis.call('GET', KEYS[1])
local paid = now
if stored then paid = math.max(tonumber(stored), now) end
local after = paid + math.max(n * 1000000 / rate, 1)
local wait = after - burst * 1000000 / rate - now
if wait > 0.5 then
  return math.max(1, math.ceil(wait / 1000))
end
local ttl_ms = math.ceil((after - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', ttl_ms)
return 0
"""


def budget_of(own: int | None, default: int | None) -> int | None:
    """A tenant's budget per second: its own (0: none), else the relay's default."""
    rate = default if own is None else own
    return rate or None


async def spend_budget(
    limiter: RateLimiter,
    budget: str,
    tenant_id: str,
    *,
    rate: int,
    burst: int,
    units: int,
    unit: str,
) -> None:
    """Spend ``units`` of the tenant's ``budget`` (ingest_bytes, deliveries, api_requests);
    a 429 with Retry-After if they do not fit, counted by budget, never by tenant."""
    wait = await limiter.spend(f"tenant-{budget}:{tenant_id}", rate, burst, units)
    if wait <= 0:
        return
    TENANT_BUDGET_REFUSED.labels(budget).inc()
    if math.isinf(wait):
        raise errors.RateLimited(
            math.ceil(units / rate),
            f"this request would create {units} {unit}, more than this tenant's "
            f"budget of {rate} {unit}/s; send smaller batches",
        )
    raise errors.RateLimited(math.ceil(wait), f"over this tenant's budget of {rate} {unit}/s")


class RateLimiter:
    """Admits or refuses units of work against per-key limits per second."""

    def __init__(self, client: Any, namespace: str = "relay:rate") -> None:
        self._client = client
        self._namespace = namespace
        self._script = client.register_script(_SCRIPT)
        self._take = client.register_script(_TAKE)
        self._budget = client.register_script(_BUDGET)

    async def admit(self, key: str, limit: int, units: int = 1) -> float:
        """0 if admitted, else the seconds to wait (``inf``: ``units`` exceeds ``limit``)."""
        if units > limit:
            return math.inf
        try:
            wait_ms = await self._script(keys=[f"{self._namespace}:{key}"], args=[units, limit])
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("rate limiter unavailable, admitting: %s", type(exc).__name__)
            return 0.0
        return int(wait_ms) / 1000

    async def take(self, key: str, limit: int, want: int) -> tuple[int, float]:
        """Take as many of ``want`` units as fit now: (taken, seconds until one more fits)."""
        try:
            taken, wait_ms = await self._take(keys=[f"{self._namespace}:{key}"], args=[want, limit])
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("rate limiter unavailable, admitting: %s", type(exc).__name__)
            return want, 0.0
        return int(taken), int(wait_ms) / 1000

    async def spend(self, key: str, rate: int, burst: int, units: int) -> float:
        """Spend ``units`` of a budget of ``rate`` per second that lets ``burst`` go at once.

        0 if they fit (and were spent), else the seconds until they would (``inf``:
        ``units`` exceeds ``burst``, they never will). The key names the rate and the
        burst: a budget changed starts afresh, owing nothing run up at the old rate.
        Unreachable Redis admits, as :meth:`admit` does.
        """
        if units > burst:
            return math.inf
        if units <= 0:
            return 0.0
        try:
            wait_ms = await self._budget(
                keys=[f"{self._namespace}:{key}:{rate}:{burst}"], args=[rate, burst, units]
            )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("rate limiter unavailable, admitting: %s", type(exc).__name__)
            return 0.0
        return int(wait_ms) / 1000
