"""The one guarded outbound HTTP client, and the address policy it enforces.

Every request to a tenant's target goes through :class:`EgressClient`:
http/https only, redirects never followed, a total timeout, the response
read up to a cap, and every address the host resolves to checked *at
connect time* (by the connector's resolver, so a DNS answer that changes
between validation and delivery cannot reach a forbidden address).

Names are resolved by :class:`DeliveryResolver`, on threads of its own (not
asyncio's default executor, which the rest of the process shares), with a
timeout per lookup shorter than the delivery's, answers and failures cached
for a while, one lookup at a time per name and a few per zone: a tenant whose
zone answers slowly ties up its own deliveries, not other tenants' lookups.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
RESPONSE_CAP_BYTES = 4096


class EgressRefused(Exception):
    """The target's address is not one the relay may call."""


#: Every range a delivery never goes to, in one place: IANA's IPv4 and IPv6
#: Special-Purpose Address Registries (every entry, globally reachable or not: no
#: receiver lives in an anycast relay or a documentation prefix), IPv4 multicast,
#: and all of the IPv6 space that is not global unicast (2000::/3) per IANA's IPv6
#: Address Space registry, so a range Python's ``ipaddress`` does not call private
#: (``fec0::/10`` site-local, for one) is in it. An address is forbidden when any
#: range holds it, except that an address in a range of ``EMBEDS_IPV4`` is decided
#: by the IPv4 address it carries (NAT64 and 6to4 reach that address).
SPECIAL_PURPOSE: tuple[tuple[str, str], ...] = (
    # IPv4 (RFC 6890 and successors)
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private use"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link local"),
    ("172.16.0.0/12", "private use"),
    ("192.0.0.0/24", "IETF protocol assignments (DS-Lite, PCP, TURN, NAT64 discovery)"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.31.196.0/24", "AS112-v4"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast"),
    ("192.168.0.0/16", "private use"),
    ("192.175.48.0/24", "direct delegation AS112"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "limited broadcast"),
    ("169.254.169.254/32", "cloud metadata"),
    ("100.100.100.200/32", "cloud metadata (Alibaba)"),
    # IPv6 special purpose (RFC 6890 and successors)
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("64:ff9b::/96", "IPv4/IPv6 translation (NAT64)"),
    ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation"),
    ("100::/64", "discard only"),
    ("100:0:0:1::/64", "dummy prefix"),
    ("2001::/23", "IETF protocol assignments (Teredo, ORCHID, AMT, AS112, benchmarking…)"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("2620:4f:8000::/48", "direct delegation AS112"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing SIDs"),
    ("fc00::/7", "unique local"),
    ("fe80::/10", "link-local unicast"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
    ("fd00:ec2::254/128", "cloud metadata (AWS)"),
    # IPv6 outside global unicast 2000::/3, reserved by the IETF (IPv4-compatible ::/96 too)
    ("::/8", "reserved"),
    ("100::/8", "reserved"),
    ("200::/7", "reserved"),
    ("400::/6", "reserved"),
    ("800::/5", "reserved"),
    ("1000::/4", "reserved"),
    ("4000::/3", "reserved"),
    ("6000::/3", "reserved"),
    ("8000::/3", "reserved"),
    ("a000::/3", "reserved"),
    ("c000::/3", "reserved"),
    ("e000::/4", "reserved"),
    ("f000::/5", "reserved"),
    ("f800::/6", "reserved"),
    ("fe00::/9", "reserved"),
)
#: Ranges whose addresses carry an IPv4 address that decides (RFC 6052 NAT64, RFC 3056 6to4).
EMBEDS_IPV4 = ("64:ff9b::/96", "2002::/16")

_FORBIDDEN: dict[int, tuple[IPNetwork, ...]] = {
    version: tuple(
        network
        for cidr, _ in SPECIAL_PURPOSE
        if cidr not in EMBEDS_IPV4 and (network := ipaddress.ip_network(cidr)).version == version
    )
    for version in (4, 6)
}
_NAT64, _SIXTOFOUR = (ipaddress.IPv6Network(cidr) for cidr in EMBEDS_IPV4)
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


@functools.lru_cache(maxsize=4096)  # asked on every attempt to an address literal
def is_forbidden_address(address: IPAddress) -> bool:
    """True when ``address`` is in a range of ``SPECIAL_PURPOSE`` (see there for NAT64, 6to4)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64:
            return is_forbidden_address(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address in _SIXTOFOUR and address.sixtofour is not None:
            return is_forbidden_address(address.sixtofour)
    return any(address in network for network in _FORBIDDEN[address.version])


@functools.lru_cache(maxsize=4096)  # asked on every attempt (a refusal is not kept)
def parse_host(host: str) -> IPAddress | str:
    """The address a URL's host names, or its normalised name; EgressRefused if it is neither.

    One reading of a host for the check at creation and the one at connect time:
    brackets and trailing dots go, every numeric IPv4 form (``2130706433``,
    ``0177.0.0.1``, ``127.1``, ``0x7f.1``) is read as the address it is, and a
    name must be valid for DNS (labels of 1 to 63 characters, IDNA).
    """
    name = host.strip().strip("[]").rstrip(".").lower()
    if not name:
        raise EgressRefused("the URL has no host")
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    labels = name.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            raise EgressRefused(f"{host!r} is not a valid address") from None
    try:
        # IDNA refuses an empty label or one over 63 characters (the resolver would too)
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        raise EgressRefused(f"{host!r} is not a valid host name") from None


def literal_address(host: str) -> IPAddress | None:
    """The address if ``host`` is an IP address in any form, else None (or EgressRefused)."""
    parsed = parse_host(host)
    return parsed if not isinstance(parsed, str) else None


async def host_is_forbidden(host: str, *, resolve_timeout_s: float = 2.0) -> bool:
    """True when ``host`` is, or resolves to, a forbidden address (EgressRefused if invalid).

    A name that does not resolve now is allowed: it is checked again at connect time.
    """
    parsed = parse_host(host)
    if not isinstance(parsed, str):
        return is_forbidden_address(parsed)
    if parsed in ("localhost", "localhost.localdomain") or parsed.endswith(".localhost"):
        return True
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(parsed, None, type=socket.SOCK_STREAM), resolve_timeout_s
        )
    except (OSError, TimeoutError):
        return False
    except (UnicodeError, ValueError):
        raise EgressRefused(f"{host!r} is not a valid host name") from None
    return any(is_forbidden_address(ipaddress.ip_address(info[4][0])) for info in infos)


#: Threads that run lookups for deliveries, per worker process. A lookup blocks
#: its thread until the system resolver gives up, whatever our timeout says.
DNS_THREADS = 8
#: Lookups in flight at once for the names of one zone (below).
DNS_PER_ZONE = 2
#: How long an answer, and a failure (no such name, a timeout), is reused.
DNS_POSITIVE_TTL_S = 60.0
DNS_NEGATIVE_TTL_S = 5.0
#: Names whose answer is kept at most; the oldest go first.
DNS_CACHE_ENTRIES = 10_000
#: Second-level labels under which, in a two-letter country domain, names are
#: registered (``example.co.uk``): a zone is then three labels, not two.
_COUNTRY_SECOND_LEVELS = frozenset(
    "ac co com edu gov gob go govt ltd mil ne net nic nom or org plc sch".split()
)
_NUMERIC_FLAGS = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
_ADDRCONFIG = getattr(socket, "AI_ADDRCONFIG", 0)

_Key = tuple[str, int]
#: What a lookup gave: the addresses (host, family, proto), or the error to raise.
_Answer = list[tuple[str, int, int]] | OSError | EgressRefused


def dns_zone(name: str) -> str:
    """The zone a name belongs to, for the per-zone limit: its registrable part, roughly.

    The last two labels (``hooks.example.com`` → ``example.com``), three under
    a country's second level (``a.example.co.uk`` → ``example.co.uk``), so the
    names a tenant can make up in its own zone all count as one.
    """
    labels = name.rstrip(".").split(".")
    keep = 2
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _COUNTRY_SECOND_LEVELS:
        keep = 3
    return ".".join(labels[-keep:])


def _copy(error: OSError | EgressRefused) -> OSError | EgressRefused:
    """A fresh exception like a cached one (raising one object again chains tracebacks)."""
    return type(error)(*error.args)


class DeliveryResolver(AbstractResolver):
    """Resolves target names for deliveries, bounded, cached, one zone kept from another.

    - its own pool of :data:`DNS_THREADS` threads, so lookups never wait behind
      other work of the process (and other work never behind them);
    - each caller waits at most ``timeout_s``, then the attempt fails with a
      connection error naming the lookup (the thread goes on until the system
      resolver gives up, and its answer is still cached);
    - one lookup per name at a time (concurrent callers share it), at most
      :data:`DNS_PER_ZONE` per zone: a slow zone holds that many threads;
    - answers are reused for :data:`DNS_POSITIVE_TTL_S`, failures (a timeout
      included) for :data:`DNS_NEGATIVE_TTL_S`;
    - with ``guard``, every address of an answer, cached or not, is checked
      against the forbidden ranges (EgressRefused).

    ``getaddrinfo`` is the blocking lookup (default: ``socket.getaddrinfo``, read
    at each call); tests give a stub.
    """

    def __init__(
        self,
        *,
        timeout_s: float,
        guard: bool,
        getaddrinfo: Callable[..., Any] | None = None,
        threads: int = DNS_THREADS,
        per_zone: int = DNS_PER_ZONE,
        positive_ttl_s: float = DNS_POSITIVE_TTL_S,
        negative_ttl_s: float = DNS_NEGATIVE_TTL_S,
    ) -> None:
        self._timeout_s = timeout_s
        self._guard = guard
        self._getaddrinfo = getaddrinfo
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="relay-dns")
        self._per_zone = per_zone
        self._positive_ttl_s = positive_ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._cache: dict[_Key, tuple[float, _Answer]] = {}
        self._lookups: dict[_Key, asyncio.Task[_Answer]] = {}
        self._zones: dict[str, tuple[asyncio.Semaphore, int]] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host``; raise EgressRefused if any answer is forbidden, OSError on failure."""
        parsed = parse_host(host)  # EgressRefused for a name no resolver would take
        name = parsed if isinstance(parsed, str) else str(parsed)
        key = (name, int(family))
        answer = self._cached(key)
        if answer is None:
            lookup = self._lookups.get(key)
            if lookup is None:
                lookup = asyncio.get_running_loop().create_task(self._lookup(key))
                self._lookups[key] = lookup
            try:
                # the lookup is shared: a caller that gives up does not cancel it
                answer = await asyncio.wait_for(asyncio.shield(lookup), self._timeout_s)
            except TimeoutError:
                answer = OSError(
                    errno.ETIMEDOUT, f"DNS lookup of {name} timed out after {self._timeout_s:g} s"
                )
                self._store(key, answer, replace=False)
        if isinstance(answer, OSError | EgressRefused):
            raise _copy(answer)
        results: list[ResolveResult] = []
        for address, fam, proto in answer:
            if self._guard and is_forbidden_address(ipaddress.ip_address(address.split("%")[0])):
                raise EgressRefused(f"{host} resolves to a forbidden address")
            results.append(
                ResolveResult(
                    hostname=host,
                    host=address,
                    port=port,
                    family=fam,
                    proto=proto,
                    flags=_NUMERIC_FLAGS,
                )
            )
        return results

    def _cached(self, key: _Key) -> _Answer | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._cache[key]
            return None
        return entry[1]

    def _store(self, key: _Key, answer: _Answer, *, replace: bool = True) -> None:
        if not replace and self._cached(key) is not None:
            return
        ttl = self._positive_ttl_s if isinstance(answer, list) else self._negative_ttl_s
        self._cache.pop(key, None)  # re-inserted last: the oldest entries go first
        self._cache[key] = (time.monotonic() + ttl, answer)
        while len(self._cache) > DNS_CACHE_ENTRIES:
            del self._cache[next(iter(self._cache))]

    async def _lookup(self, key: _Key) -> _Answer:
        """One lookup of a name on the pool, within its zone's limit; cached."""
        name, family = key
        zone = dns_zone(name)
        semaphore, users = self._zones.get(zone) or (asyncio.Semaphore(self._per_zone), 0)
        self._zones[zone] = (semaphore, users + 1)
        try:
            async with semaphore:  # held until the thread is done, not until callers give up
                answer = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._blocking_lookup, name, family
                )
            self._store(key, answer)
            return answer
        finally:
            semaphore, users = self._zones[zone]
            if users == 1:
                del self._zones[zone]
            else:
                self._zones[zone] = (semaphore, users - 1)
            self._lookups.pop(key, None)

    def _blocking_lookup(self, name: str, family: int) -> _Answer:
        """On a pool thread: the system resolver's answer, as addresses, or the error."""
        getaddrinfo: Callable[..., Any] = self._getaddrinfo or socket.getaddrinfo
        try:
            infos = getaddrinfo(name, 0, family, socket.SOCK_STREAM, 0, _ADDRCONFIG)
        except OSError as exc:
            return exc
        except (UnicodeError, ValueError):
            return EgressRefused(f"{name!r} is not a valid host name")
        found: list[tuple[str, int, int]] = []
        for fam, _, proto, _, address in infos:
            if fam == socket.AF_INET6:
                if len(address) < 3:  # no IPv6 in this Python or host
                    continue
                # a scope id (link-local) must stay with the address
                host = socket.getnameinfo(address, _NUMERIC_FLAGS)[0] if address[3] else address[0]
            else:
                host = address[0]
            found.append((str(host), int(fam), int(proto)))
        if not found:
            return OSError(errno.EHOSTUNREACH, f"{name} has no usable address")
        return found

    async def close(self) -> None:
        """Stop the pool (a lookup still running ends on its own)."""
        for lookup in self._lookups.values():
            lookup.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Response:
    """What came back from one outbound request."""

    status: int
    headers: dict[str, str]
    body: bytes
    duration_ms: int


class EgressClient:
    """One pooled aiohttp session with the egress policy applied to every request."""

    def __init__(
        self,
        *,
        timeout_s: float,
        allow_private: bool,
        user_agent: str,
        dns_timeout_s: float = 2.0,
        getaddrinfo: Callable[..., Any] | None = None,
    ) -> None:
        self._allow_private = allow_private
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        connector = aiohttp.TCPConnector(
            # no pool limit: the engine bounds attempts per process and per target
            # (max_in_flight), and a shared pool limit would let one target's
            # hanging connections hold up every other target's attempts
            limit=0,
            limit_per_host=0,
            # a lookup takes at most half the attempt's time, so a slow zone's
            # failure is told apart from a slow receiver's
            resolver=DeliveryResolver(
                timeout_s=min(dns_timeout_s, timeout_s / 2),
                guard=not allow_private,
                getaddrinfo=getaddrinfo,
            ),
            # the resolver caches (answers and failures); the connector's cache
            # would keep answers only, per port
            use_dns_cache=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers={"User-Agent": user_agent},
            auto_decompress=True,
            trust_env=False,
        )

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST ``body``; raise EgressRefused, aiohttp.ClientError or TimeoutError on failure."""
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise EgressRefused("only absolute http(s) URLs are allowed")
        # aiohttp does not consult the resolver for IP literals: check them here,
        # with the same reading of the host as at creation.
        literal = literal_address(parsed.host)
        if not self._allow_private and literal is not None and is_forbidden_address(literal):
            raise EgressRefused(f"{parsed.host} is a forbidden address")
        started = time.perf_counter()
        async with self._session.post(
            parsed, data=body, headers=headers, allow_redirects=False
        ) as response:
            # one read may return less than asked: read up to the cap or the end
            content = b""
            while len(content) < RESPONSE_CAP_BYTES:
                chunk = await response.content.read(RESPONSE_CAP_BYTES - len(content))
                if not chunk:
                    break
                content += chunk
            return Response(
                status=response.status,
                headers=dict(response.headers),
                body=content,
                duration_ms=int((time.perf_counter() - started) * 1000),
            )

    async def close(self) -> None:
        """Close the pooled connections."""
        await self._session.close()

    def __repr__(self) -> str:
        return f"EgressClient(allow_private={self._allow_private})"


def describe_error(exc: BaseException) -> str:
    """A short, secret-free text for an attempt's ``error`` column."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, EgressRefused):
        return f"refused by egress policy: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection error: {exc.os_error.strerror or exc.os_error}"
    text: Any = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]
