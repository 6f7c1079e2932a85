"""Name resolution for deliveries: its own bounded pool, a timeout, a cache, isolation per host.

DNS is stubbed (no lookup leaves the machine): ``socket.getaddrinfo`` is
replaced by a table of names in the ``.test`` zone, each answering at once,
failing, or hanging until the test lets it go; numeric hosts are read as the
addresses they are (``AI_NUMERICHOST``). Everything else is real: the egress
client, its connector, and an HTTP receiver on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from relay.delivery.egress import (
    DeliveryResolver,
    EgressClient,
    EgressRefused,
    describe_error,
    dns_zone,
)
from relay.delivery.outcome import trips_breaker
from tests.stack import Receiver

#: As many slow lookups as asyncio's default executor has threads on 2 cores
#: (min(32, cores + 4)): enough to fill it, where lookups shared that pool.
SLOW_LOOKUPS = 6


class StubDns:
    """``socket.getaddrinfo`` for the ``.test`` zone; counts the lookups of each name."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.answers: dict[str, str] = {}  # name -> IPv4 address
        self.slow: set[str] = set()  # names whose lookups hang until released
        self.released = threading.Event()
        self.lookups: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.stuck = 0  # slow lookups in flight now
        self.most_stuck = 0  # and at most

    def __call__(
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if not name.endswith(".test"):
            # numeric hosts only: nothing here may reach a real resolver
            return list(self.real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST))
        self.lookups[name] += 1
        if name in self.slow or any(name.endswith("." + zone) for zone in self.slow):
            with self._lock:
                self.stuck += 1
                self.most_stuck = max(self.most_stuck, self.stuck)
            self.released.wait(30)
            with self._lock:
                self.stuck -= 1
        if name in self.answers:
            return list(self.real(self.answers[name], port, family, type, proto, flags))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = await Receiver().start()
    yield server
    await server.close()


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Any:
    stub = StubDns(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", stub)
    yield stub
    stub.released.set()  # no thread stays parked in a lookup


def port_of(receiver: Receiver) -> int:
    assert receiver.server is not None and receiver.server.port is not None
    return receiver.server.port


@contextlib.asynccontextmanager
async def egress(**kwargs: Any) -> AsyncIterator[EgressClient]:
    client = EgressClient(user_agent="test", **{"timeout_s": 10, "allow_private": True, **kwargs})
    try:
        yield client
    finally:
        await client.close()


async def failure(coro: Any) -> BaseException:
    try:
        await coro
    except BaseException as exc:
        return exc
    raise AssertionError("the request succeeded")


@pytest.mark.parametrize("slow_hosts", ["one host", "one zone"])
async def test_slow_lookups_do_not_hold_another_hosts_delivery(
    dns: StubDns, receiver: Receiver, slow_hosts: str
) -> None:
    # Given a tenant's name (or zone) whose lookups hang, and another tenant's target
    dns.slow.add("slow.test")
    dns.answers["fast.test"] = "127.0.0.1"
    async with egress() as client:
        if slow_hosts == "one host":  # one name, on as many ports (one connection key each)
            urls = [f"http://slow.test:{8000 + n}/" for n in range(SLOW_LOOKUPS)]
        else:
            urls = [f"http://h{n}.slow.test/" for n in range(SLOW_LOOKUPS)]
        # When deliveries to the slow names are in flight, stuck in their lookups
        stuck = [asyncio.ensure_future(client.post(url, b"{}", {})) for url in urls]
        await asyncio.sleep(0.2)
        assert not any(task.done() for task in stuck)
        # Then the other tenant's delivery is sent while they are still stuck
        url = f"http://fast.test:{port_of(receiver)}/hook"
        response = await asyncio.wait_for(client.post(url, b"{}", {}), 3)
        assert response.status == 200
        assert len(receiver.at("/hook")) == 1
        # and the slow names hold one thread (one lookup per name), or two (per zone)
        assert dns.most_stuck == (1 if slow_hosts == "one host" else 2)
        dns.released.set()
        await asyncio.gather(*stuck, return_exceptions=True)


async def test_a_lookup_past_its_timeout_fails_the_attempt_as_a_connection_error(
    dns: StubDns,
) -> None:
    # Given a name whose lookup hangs, and a delivery timeout of 2 s
    dns.slow.add("slow.test")
    async with egress(timeout_s=2) as client:
        # When a delivery to it is attempted
        exc = await failure(client.post("http://slow.test/hook", b"{}", {}))
    # Then the attempt fails on the lookup's own timeout (at most half the
    # delivery's), recorded as a connection error that counts for the breaker
    assert isinstance(exc, aiohttp.ClientConnectorError), repr(exc)
    error = describe_error(exc)
    assert error == "connection error: DNS lookup of slow.test timed out after 1 s", error
    assert trips_breaker(None, error) is True


async def test_lookups_are_cached_failures_and_refusals_briefly(
    dns: StubDns, receiver: Receiver
) -> None:
    dns.answers["hooks.test"] = "127.0.0.1"
    dns.answers["inside.test"] = "10.0.0.1"
    async with egress() as client:
        # a name that resolves: looked up once for several deliveries
        url = f"http://hooks.test:{port_of(receiver)}/hook"
        for _ in range(3):
            assert (await client.post(url, b"{}", {})).status == 200
        assert dns.lookups["hooks.test"] == 1
        # a name that does not: the failure is kept too, and every delivery says why
        for _ in range(3):
            exc = await failure(client.post("http://missing.test/hook", b"{}", {}))
            assert describe_error(exc) == "connection error: Name or service not known"
        assert dns.lookups["missing.test"] == 1
    async with egress(allow_private=False) as client:
        # an answer in a private range: refused every time, from the cache too
        for _ in range(3):
            exc = await failure(client.post("http://inside.test/hook", b"{}", {}))
            assert isinstance(exc, EgressRefused), repr(exc)
        assert dns.lookups["inside.test"] == 1


async def test_a_delivery_by_name_reaches_a_receiver_on_loopback(
    dns: StubDns, receiver: Receiver
) -> None:
    dns.answers["hooks.test"] = "127.0.0.1"
    async with egress() as client:
        response = await client.post(
            f"http://hooks.test:{port_of(receiver)}/hook", b'{"n": 1}', {"X-Test": "1"}
        )
    assert response.status == 200
    [got] = receiver.at("/hook")
    assert got.body == b'{"n": 1}' and got.headers["X-Test"] == "1"


async def test_a_cached_failure_is_kept_briefly_and_an_answer_for_a_bounded_time(
    dns: StubDns,
) -> None:
    # the resolver on its own, with short lives for what it caches
    resolver = DeliveryResolver(
        timeout_s=1, guard=False, getaddrinfo=dns, positive_ttl_s=0.6, negative_ttl_s=0.3
    )
    try:
        with pytest.raises(OSError):
            await resolver.resolve("later.test", 443)
        # the name appears: the failure is still served for its short life, then forgotten
        dns.answers["later.test"] = "192.0.2.7"
        with pytest.raises(OSError):
            await resolver.resolve("later.test", 443)
        assert dns.lookups["later.test"] == 1
        await asyncio.sleep(0.4)
        [answer] = await resolver.resolve("later.test", 443)
        assert (answer["host"], answer["port"]) == ("192.0.2.7", 443)
        # the answer is reused (for any port) until its life ends, then looked up again
        [answer] = await resolver.resolve("later.test", 80)
        assert (answer["host"], answer["port"], dns.lookups["later.test"]) == ("192.0.2.7", 80, 2)
        await asyncio.sleep(0.7)
        await resolver.resolve("later.test", 80)
        assert dns.lookups["later.test"] == 3
    finally:
        await resolver.close()


def test_zones_group_the_names_a_tenant_can_make_up() -> None:
    assert dns_zone("hooks.example.com") == "example.com"
    assert dns_zone("a.b.c.example.com.") == "example.com"
    assert dns_zone("example.com") == "example.com"
    assert dns_zone("a.example.co.uk") == "example.co.uk"
    assert dns_zone("x.evil.de") == "evil.de"
    assert dns_zone("localhost") == "localhost"
