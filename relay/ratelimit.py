"""Rate limits shared by every process, kept in Redis: GCRA, one second of burst.

A limit of ``r`` per second admits ``r`` units at once and then one every
``1/r`` seconds (the generic cell rate algorithm, one Lua script, Redis's own
clock). A request of ``n`` units is admitted only if all ``n`` fit: a batch
counts as its number of events and is never let into an empty window whole.
A request larger than the limit itself can never fit, and says so. Redis being
unreachable admits the request: losing an event costs more than exceeding a
limit for a moment.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis.exceptions

log = logging.getLogger(__name__)

# KEYS[1]: the key's theoretical arrival time (ms); ARGV: units, limit per second.
# Returns 0 when admitted (and spends the units), else the milliseconds to wait.
_SCRIPT = """
local n = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = 1000 / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + n * interval
local allow_at = new_tat - 1000
if allow_at > now then
  return math.ceil(allow_at - now)
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return 0
"""


class RateLimiter:
    """Admits or refuses units of work against per-key limits per second."""

    def __init__(self, client: Any, namespace: str = "relay:gcra") -> None:
        self._client = client
        self._namespace = namespace
        self._script = client.register_script(_SCRIPT)

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
