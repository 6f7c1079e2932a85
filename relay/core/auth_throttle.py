"""Failed credentials cost the guesser: a growing delay per client address, then 429.

Every failed credential (console sign-in, admin token, API key, a source's
credential) is counted in Redis per client address and door, so every gateway
process and replica shares the count. The n-th failure of a window is answered
after a delay that doubles with each failure (``delay_s``, twice that, four times…
up to 16 times ``delay_s``); the ``limit``-th is answered 429 with ``Retry-After``, and so is
every request from that address at that door until the window (counted from the
window's first failure) ends, a right credential included, so that a guess can
never be told right while the address is locked out.

A success is decided only after its credential was checked *and* the count was
read: a burst of guesses sent at once is evaluated, but those checked after the
failures that locked the address out are refused like any other. The reads of
the requests a process checks meanwhile go to Redis together, one call per
batch (like the group commit): a request waits for the read that starts after
its credential was checked, never for one already on its way.

Doors: the management API and the console share one (the admin token and API keys
are guessed alike); each source is its own, since one upstream (and its address)
serves many tenants and one tenant's wrong secret must not hold the others'.

Failures are counted in ``relay_auth_failures_total{kind}`` (no tenant label) and
logged once per window and address, never with the value tried. Redis being
unreachable lets requests through (as the rate limiter does), with the first delay.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
from typing import Any, Literal

import redis.exceptions

from relay.core import errors
from relay.core.metrics import AUTH_FAILURES, AUTH_THROTTLED

log = logging.getLogger(__name__)

Kind = Literal["console", "operator", "api_key", "source"]
#: The door the console, the admin token and API keys share.
MANAGEMENT = "management"
#: Delays stop doubling after this many failures (16 times the first).
_MAX_DOUBLINGS = 4
#: The longest a request waits for Redis here: a hung Redis must not slow every
#: authenticated request (the client's own socket timeout is 2 s).
REDIS_WAIT_S = 0.5
#: What a Redis that does not answer in time raises here.
_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, TimeoutError)

# KEYS[1]: the address's count at a door. ARGV[1]: the window in ms.
# Counts one failure; returns {failures in the window, ms until the window ends}.
_FAIL = """
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""

# KEYS: addresses' counts at doors. ARGV[1]: the limit. Returns, for each key, 0 or
# the ms until its lockout ends.
_LOCKED = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = tonumber(redis.call('GET', key) or '0')
  if n < tonumber(ARGV[1]) then
    out[i] = 0
  else
    out[i] = math.max(redis.call('PTTL', key), 1)
  end
end
return out
"""
#: The most keys one read of lockouts carries (the rest go in the next).
READ_BATCH = 256


@functools.lru_cache(maxsize=4096)  # asked on every authenticated request
def client_address(remote: str | None) -> str:
    """Who is guessing: the peer's IPv4 address, or its IPv6 /64 (one subscriber's block)."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class AuthThrottle:
    """Counts failed credentials per address and door in Redis; delays, then refuses."""

    def __init__(
        self,
        client: Any,
        *,
        limit: int,
        window_s: float,
        delay_s: float,
        namespace: str = "relay:authfail",
    ) -> None:
        self._client = client
        self._limit = limit
        self._window_ms = max(1, int(window_s * 1000))
        self._delay_s = delay_s
        self._namespace = namespace
        self._fail = client.register_script(_FAIL)
        self._locked = client.register_script(_LOCKED)
        #: keys whose lockout the next read asks for, with their waiters
        self._asked: dict[str, asyncio.Future[int]] = {}
        self._reader: asyncio.Future[None] | None = None

    def _key(self, door: str, address: str) -> str:
        return f"{self._namespace}:{door}:{address}"

    def delay_for(self, failures: int) -> float:
        """How long the ``failures``-th failure of a window waits for its answer."""
        doublings: int = min(max(failures - 1, 0), _MAX_DOUBLINGS)
        return self._delay_s * (1 << doublings)

    async def admit(self, kind: Kind, door: str, remote: str | None) -> None:
        """Raise 429 if ``remote`` is locked out of ``door``; else return at once."""
        wait_ms = await self._lockout_ms(self._key(door, client_address(remote)))
        if wait_ms > 0:
            AUTH_THROTTLED.labels(kind).inc()
            raise _refusal(wait_ms)

    async def _lockout_ms(self, key: str) -> int:
        """The ms until ``key``'s lockout ends (0: none), read after this call began."""
        asked = self._asked.get(key)
        if asked is None:
            asked = self._asked[key] = asyncio.get_running_loop().create_future()
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read_lockouts())
        # shielded: one caller that goes away must not cancel the others' answer
        return await asyncio.shield(asked)

    async def _read_lockouts(self) -> None:
        """Read what is asked, in batches, until nothing is; one Redis call a batch."""
        try:
            while self._asked:
                keys = list(self._asked)[:READ_BATCH]
                batch = {key: self._asked.pop(key) for key in keys}
                try:
                    async with asyncio.timeout(REDIS_WAIT_S):
                        read = await self._locked(keys=keys, args=[self._limit])
                    answers = [int(answer) for answer in read]
                except _UNAVAILABLE as exc:
                    log.warning(
                        "credential throttle unavailable, admitting: %s", type(exc).__name__
                    )
                    answers = [0] * len(keys)
                except Exception as exc:  # every waiter of the batch learns of it
                    for waiter in batch.values():
                        if not waiter.done():
                            waiter.set_exception(exc)
                    continue
                except BaseException:
                    for waiter in batch.values():
                        waiter.cancel()
                    raise
                for waiter, answer in zip(batch.values(), answers, strict=True):
                    if not waiter.done():
                        waiter.set_result(answer)
        finally:
            self._reader = None

    async def failed(self, kind: Kind, door: str, remote: str | None) -> None:
        """Count a failed credential: wait the failure's delay, or raise 429 at the limit.

        The caller answers 401 once this returns.
        """
        address = client_address(remote)
        AUTH_FAILURES.labels(kind).inc()
        try:
            async with asyncio.timeout(REDIS_WAIT_S):
                counted = await self._fail(keys=[self._key(door, address)], args=[self._window_ms])
            failures, ttl_ms = int(counted[0]), int(counted[1])
        except _UNAVAILABLE as exc:
            log.warning("credential throttle unavailable: %s", type(exc).__name__)
            failures, ttl_ms = 1, self._window_ms
        if failures == 1:
            # once per window and address; the value tried is never logged
            log.warning(
                "failed credential from %s (%s); failures from it are counted for %d s, "
                "failure %d and later are answered 429",
                address,
                kind,
                math.ceil(ttl_ms / 1000),
                self._limit,
            )
        if failures >= self._limit:
            AUTH_THROTTLED.labels(kind).inc()
            raise _refusal(ttl_ms)
        await asyncio.sleep(self.delay_for(failures))


def _refusal(wait_ms: int) -> errors.RateLimited:
    return errors.RateLimited(
        math.ceil(wait_ms / 1000),
        "too many failed credentials from this address; try again after Retry-After seconds",
    )
