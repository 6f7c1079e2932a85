"""The one guarded outbound HTTP client, and the address policy it enforces.

Every request to a tenant's target goes through :class:`EgressClient`:
http/https only, redirects never followed, a total timeout, the response
read up to a cap, and every address the host resolves to checked *at
connect time* (by the connector's resolver, so a DNS answer that changes
between validation and delivery cannot reach a forbidden address).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Cloud metadata endpoints that are not inside a private range already.
_METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("100.100.100.200"),
}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
RESPONSE_CAP_BYTES = 4096


class EgressRefused(Exception):
    """The target's address is not one the relay may call."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: Local-use NAT64 (RFC 8215): where the IPv4 sits depends on the operator's prefix.
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: mapped, 6to4, Teredo."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)  # (server, client)
    return found


def is_forbidden_address(address: IPAddress) -> bool:
    """Loopback, private, link-local, multicast, reserved, unspecified or metadata.

    An IPv6 address that embeds an IPv4 one (mapped, 6to4, Teredo, NAT64) is
    forbidden when the IPv4 address is.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            return True
        if address in _NAT64:  # reserved as IPv6; what matters is the IPv4 it reaches
            return is_forbidden_address(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(is_forbidden_address(inner) for inner in _embedded_ipv4(address)):
            return True
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address in _METADATA
        or (isinstance(address, ipaddress.IPv4Address) and address in _CGNAT)
    )


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


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, refusing forbidden addresses."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host``; raise EgressRefused if any answer is forbidden."""
        try:
            results = await self._inner.resolve(host, port, family)
        except (UnicodeError, ValueError) as exc:
            raise EgressRefused(f"{host!r} is not a valid host name") from exc
        for result in results:
            if is_forbidden_address(ipaddress.ip_address(result["host"])):
                raise EgressRefused(f"{host} resolves to a forbidden address")
        return results

    async def close(self) -> None:
        """Release the inner resolver."""
        await self._inner.close()


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
    ) -> None:
        self._allow_private = allow_private
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        connector = aiohttp.TCPConnector(
            # no pool limit: the engine bounds attempts per process and per target
            # (max_in_flight), and a shared pool limit would let one target's
            # hanging connections hold up every other target's attempts
            limit=0,
            limit_per_host=0,
            resolver=None if allow_private else GuardedResolver(),
            ttl_dns_cache=60,
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
