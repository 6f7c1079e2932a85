"""Every form of a forbidden address is refused, by the one reading of a host both checks use."""

from __future__ import annotations

import ipaddress

import pytest

from relay.delivery.egress import (
    EgressClient,
    EgressRefused,
    host_is_forbidden,
    is_forbidden_address,
    parse_host,
)

FORBIDDEN_FORMS = [
    "127.0.0.1.",  # trailing dot
    "127.0.0.1..",
    "2130706433",  # decimal
    "0177.0.0.1",  # octal
    "0x7f.1",  # hex, short
    "0x7f000001",
    "127.1",  # short
    "10.1",
    "[::1]",
    "[::ffff:127.0.0.1]",  # IPv4-mapped
    "[::ffff:7f00:1]",
    "[::127.0.0.1]",  # IPv4-compatible
    "[2002:7f00:1::]",  # 6to4 of 127.0.0.1
    "[2002:a9fe:a9fe::1]",  # 6to4 of 169.254.169.254 (metadata)
    "[2001:0:4136:e378:8000:63bf:80ff:fffe]",  # Teredo, client 127.0.0.1 (obfuscated)
    "[2001:0:7f00:1::1]",  # Teredo, server 127.0.0.1
    "[64:ff9b::7f00:1]",  # NAT64 of 127.0.0.1
    "[64:ff9b::a00:1]",  # NAT64 of 10.0.0.1
    "[64:ff9b:1::1]",  # local-use NAT64
    "169.254.169.254",
    "0.0.0.0",
    "0",
    "LOCALHOST.",
    "foo.localhost",
]
PUBLIC_FORMS = [
    "93.184.216.34",
    "1572395042",  # decimal of 93.184.216.34
    "[2606:2800:220:1:248:1893:25c8:1946]",
    "[2002:5db8:d822::1]",  # 6to4 of 93.184.216.34
    "[64:ff9b::5db8:d822]",  # NAT64 of 93.184.216.34
]
INVALID_HOSTS = ["a" * 64 + ".example", "a..b", "1.2.3.4.5", "0x", ".a"]


@pytest.mark.parametrize("host", FORBIDDEN_FORMS)
async def test_forbidden_forms_are_refused(host: str) -> None:
    assert await host_is_forbidden(host)


@pytest.mark.parametrize("host", PUBLIC_FORMS)
async def test_public_forms_are_allowed(host: str) -> None:
    assert not await host_is_forbidden(host)


@pytest.mark.parametrize("host", INVALID_HOSTS)
async def test_invalid_hosts_are_refused_not_crashed(host: str) -> None:
    with pytest.raises(EgressRefused):
        await host_is_forbidden(host)


def test_numeric_forms_read_as_the_address_they_are() -> None:
    for host in ("2130706433", "0177.0.0.1", "0x7f.1", "127.1", "127.0.0.1."):
        assert parse_host(host) == ipaddress.ip_address("127.0.0.1")
    assert parse_host("Example.COM.") == "example.com"
    assert parse_host("bücher.example") == "xn--bcher-kva.example"


def test_embedded_public_addresses_stay_public() -> None:
    assert not is_forbidden_address(ipaddress.ip_address("2002:5db8:d822::1"))
    assert is_forbidden_address(ipaddress.ip_address("2002:c0a8:0101::1"))  # 192.168.1.1


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1.:9/",
        "http://2130706433:9/",
        "http://[64:ff9b::7f00:1]:9/",
        "http://[2002:7f00:1::]:9/",
        "http://" + "a" * 64 + ".example/",
        "http://a..b/",
    ],
)
async def test_connect_time_refuses_the_same_forms(url: str) -> None:
    client = EgressClient(timeout_s=2, allow_private=False, user_agent="test")
    try:
        with pytest.raises(EgressRefused):
            await client.post(url, b"{}", {})
    finally:
        await client.close()
