"""The egress guard's "private" is one table of IANA's special-purpose and reserved ranges."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.delivery.egress import (
    EMBEDS_IPV4,
    SPECIAL_PURPOSE,
    EgressClient,
    EgressRefused,
    IPAddress,
    is_forbidden_address,
)

RELAY = Path(__file__).resolve().parents[2] / "relay"


@pytest.mark.parametrize(
    "address",
    [
        "fec0::1",  # site-local: Python's ipaddress does not call it private
        "feff:ffff::1",
        "3fff::1",  # documentation (RFC 9637)
        "5f00::1",  # SRv6 SIDs
        "100:0:0:1::1",  # dummy prefix
        "2001:2::1",  # benchmarking
        "2001:20::1",  # ORCHIDv2
        "2620:4f:8000::1",  # AS112
        "::ffff:8.8.8.8",  # IPv4-mapped
        "::8.8.8.8",  # IPv4-compatible (deprecated)
        "4000::1",  # outside global unicast
        "192.0.0.9",  # PCP anycast
        "192.88.99.1",  # 6to4 relay anycast
        "192.31.196.1",  # AS112
        "198.19.255.255",  # benchmarking
        "233.252.0.1",  # multicast
        "255.255.255.255",
    ],
)
def test_special_purpose_addresses_are_forbidden(address: str) -> None:
    assert is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "93.184.215.14", "2606:4700::1111", "2a00:1450:4001::1"]
)
def test_public_addresses_stay_allowed(address: str) -> None:
    assert not is_forbidden_address(ipaddress.ip_address(address))


def test_every_range_of_the_table_is_forbidden_end_to_end() -> None:
    for cidr, _name in SPECIAL_PURPOSE:
        network = ipaddress.ip_network(cidr)
        for address in (network.network_address, network.broadcast_address):
            assert is_forbidden_address(address), (cidr, address)


def _python_says_not_public(address: IPAddress) -> bool:
    flags = (
        address.is_private,
        address.is_loopback,
        address.is_link_local,
        address.is_multicast,
        address.is_reserved,
        address.is_unspecified,
        not address.is_global,
        isinstance(address, ipaddress.IPv6Address) and address.is_site_local,
    )
    return any(flags)


def _decided_by_embedded_ipv4(address: IPAddress) -> bool:
    return any(address in ipaddress.ip_network(cidr) for cidr in EMBEDS_IPV4)


@settings(max_examples=2000)
@given(st.ip_addresses())
def test_the_table_covers_everything_python_calls_not_public(address: IPAddress) -> None:
    if _python_says_not_public(address) and not _decided_by_embedded_ipv4(address):
        assert is_forbidden_address(address)


@settings(max_examples=500)
@given(st.ip_addresses(v=6, network="2000::/3"))
def test_global_unicast_outside_the_table_is_allowed(address: ipaddress.IPv6Address) -> None:
    in_table = any(
        address in ipaddress.ip_network(cidr)
        for cidr, _ in SPECIAL_PURPOSE
        if ipaddress.ip_network(cidr).version == 6
    )
    if not in_table:
        assert not is_forbidden_address(address)


def test_the_table_is_the_only_idea_of_private_in_the_code() -> None:
    flags = ("is_private", "is_reserved", "is_link_local", "is_site_local", "is_global")
    for path in RELAY.rglob("*.py"):
        text = path.read_text()
        assert not [f for f in flags if "." + f in text], path


async def test_connect_time_refuses_a_site_local_literal() -> None:
    client = EgressClient(timeout_s=2, allow_private=False, user_agent="test")
    try:
        with pytest.raises(EgressRefused):
            await client.post("http://[fec0::1]:9/", b"{}", {})
    finally:
        await client.close()
