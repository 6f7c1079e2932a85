"""Rate limits shared by every process, kept in Redis: a fixed one-second window.

A request of ``n`` units is admitted while the window's count stays within the
limit; a single request larger than the whole limit is admitted into an empty
window (so a batch is never refused forever). Redis being unreachable admits
the request: losing an event costs more than exceeding a limit for a moment.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis.exceptions

log = logging.getLogger(__name__)

_SCRIPT = """
local n = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local current = redis.call('INCRBY', KEYS[1], n)
if current == n then
  redis.call('PEXPIRE', KEYS[1], 2000)
  return 1
end
if current > limit then
  redis.call('DECRBY', KEYS[1], n)
  return 0
end
return 1
"""


class RateLimiter:
    """Admits or refuses units of work against per-key limits per second."""

    def __init__(self, client: Any, namespace: str = "relay:rl") -> None:
        self._client = client
        self._namespace = namespace
        self._script = client.register_script(_SCRIPT)

    async def admit(self, key: str, limit: int, units: int = 1) -> float:
        """0 if admitted, else the seconds to wait before the next window."""
        now = time.time()
        window = int(now)
        try:
            ok = await self._script(keys=[f"{self._namespace}:{key}:{window}"], args=[units, limit])
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("rate limiter unavailable, admitting: %s", type(exc).__name__)
            return 0.0
        return 0.0 if ok else (window + 1) - now
