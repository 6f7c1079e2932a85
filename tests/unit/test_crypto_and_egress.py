"""Secrets at rest, ids, and the egress address policy."""

from __future__ import annotations

import ipaddress
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ulid import ULID

from relay.core.crypto import SecretBox, hash_api_key, new_api_key, new_id, new_ids
from relay.delivery.egress import is_forbidden_address


@given(st.text(max_size=200))
def test_secret_box_round_trips_and_binds_to_the_row(secret: str) -> None:
    box = SecretBox(b"k" * 32)
    sealed = box.seal(secret, bound_to="tgt_1")
    if len(secret.encode()) >= 8:  # shorter byte strings can occur in random ciphertext
        assert secret.encode() not in sealed
    assert box.open(sealed, bound_to="tgt_1") == secret
    with pytest.raises(ValueError):
        box.open(sealed, bound_to="tgt_2")
    with pytest.raises(ValueError):
        SecretBox(b"x" * 32).open(sealed, bound_to="tgt_1")


def test_ids_are_prefixed_and_time_sortable() -> None:
    ids = [new_id("evt") for _ in range(50)]
    assert all(re.fullmatch(r"evt_[0-9A-Z]{26}", i) for i in ids)
    assert len(set(ids)) == 50


def test_ids_are_ulids_of_now_strictly_increasing_in_one_process() -> None:
    before = time.time()
    ids = [new_id("dlv") for _ in range(2000)] + new_ids("dlv", 5000) + [new_id("dlv")]
    after = time.time()
    # each is a ULID (Crockford base32) whose time is now, in the order made, none twice
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for i in ids[:50] + ids[-50:]:
        parsed = ULID.from_str(i.removeprefix("dlv_"))
        assert str(parsed) == i[4:]
        assert before - 0.001 <= parsed.timestamp <= after + 0.001
    assert new_ids("evt", 0) == []


def test_api_keys_are_long_random_and_hashed() -> None:
    keys = {new_api_key() for _ in range(100)}
    assert len(keys) == 100
    key = keys.pop()
    assert len(key) >= 4 + 43  # 256 bits of base64url
    assert hash_api_key(key) != key.encode() and len(hash_api_key(key)) == 32


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.1",
        "10.0.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.1.1",
        "0.0.0.0",
        "224.0.0.1",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
        "fd00:ec2::254",
        "ff02::1",
        "::",
    ],
)
def test_forbidden_addresses(address: str) -> None:
    assert is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700::1111"])
def test_public_addresses(address: str) -> None:
    assert not is_forbidden_address(ipaddress.ip_address(address))
