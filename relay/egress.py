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


def is_forbidden_address(address: IPAddress) -> bool:
    """Loopback, private, link-local, multicast, reserved, unspecified or metadata."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
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


def literal_address(host: str) -> IPAddress | None:
    """The address if ``host`` is an IP literal (brackets allowed), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def host_is_forbidden(host: str, *, resolve_timeout_s: float = 2.0) -> bool:
    """True when ``host`` is, or resolves to, a forbidden address.

    A name that does not resolve now is allowed: it is checked again at connect time.
    """
    if host.lower().rstrip(".") in ("localhost", "localhost.localdomain") or host.lower().endswith(
        ".localhost"
    ):
        return True
    literal = literal_address(host)
    if literal is not None:
        return is_forbidden_address(literal)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), resolve_timeout_s
        )
    except (OSError, TimeoutError):
        return False
    return any(is_forbidden_address(ipaddress.ip_address(info[4][0])) for info in infos)


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, refusing forbidden addresses."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host``; raise EgressRefused if any answer is forbidden."""
        results = await self._inner.resolve(host, port, family)
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
        limit_per_host: int = 32,
    ) -> None:
        self._allow_private = allow_private
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        connector = aiohttp.TCPConnector(
            limit=0,  # concurrency is bounded by the worker's threads
            limit_per_host=limit_per_host,
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
        literal = literal_address(parsed.host)
        # aiohttp does not consult the resolver for IP literals: check them here.
        if not self._allow_private and literal is not None and is_forbidden_address(literal):
            raise EgressRefused(f"{parsed.host} is a forbidden address")
        started = time.perf_counter()
        async with self._session.post(
            parsed, data=body, headers=headers, allow_redirects=False
        ) as response:
            content = await response.content.read(RESPONSE_CAP_BYTES)
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
