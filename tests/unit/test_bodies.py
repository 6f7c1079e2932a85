"""A compressed body, inflated when read: whole, to its cap, or refused clearly."""

from __future__ import annotations

import gzip
import zlib

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from relay.core import errors
from relay.web.bodies import inflate


def deflate_raw(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


ENCODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,  # with its zlib header, as RFC 9110 says
    "deflate-raw": deflate_raw,  # without, as some clients send it
}


@given(body=st.binary(max_size=5000), how=st.sampled_from(sorted(ENCODERS)))
def test_a_body_within_the_cap_comes_back_whole(body: bytes, how: str) -> None:
    encoding = how.split("-")[0]
    assert inflate(ENCODERS[how](body), encoding, len(body)) == body


@given(body=st.binary(min_size=1, max_size=5000), how=st.sampled_from(sorted(ENCODERS)))
def test_a_body_one_byte_past_the_cap_is_413(body: bytes, how: str) -> None:
    with pytest.raises(web.HTTPRequestEntityTooLarge):
        inflate(ENCODERS[how](body), how.split("-")[0], len(body) - 1)


def test_a_bomb_is_inflated_only_to_the_cap() -> None:
    bomb = gzip.compress(b"A" * (200 << 20))  # 200 MiB from about 200 KB
    with pytest.raises(web.HTTPRequestEntityTooLarge) as refused:
        inflate(bomb, "gzip", 1 << 20)
    assert refused.value.text == "Maximum request body size 1048576 exceeded."


def test_concatenated_gzip_members_are_one_body() -> None:
    assert inflate(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 10) == b"abcd"


@pytest.mark.parametrize(
    ("raw", "encoding"),
    [
        (b'{"not": "gzip"}', "gzip"),
        (gzip.compress(b'{"a": 1}')[:-6], "gzip"),  # cut short
        (zlib.compress(b'{"a": 1}')[:-3], "deflate"),
        (b"abc", "br"),
        (b"abc", "compress"),
    ],
    ids=["not-gzip", "gzip-cut-short", "deflate-cut-short", "brotli", "unknown"],
)
def test_what_does_not_decode_is_a_clear_400(raw: bytes, encoding: str) -> None:
    with pytest.raises(errors.InvalidRequest) as refused:
        inflate(raw, encoding, 1 << 20)
    assert refused.value.status == 400


def test_an_empty_body_stays_empty() -> None:
    assert inflate(b"", "gzip", 100) == b""


def test_many_concatenated_gzip_members_are_refused_at_once() -> None:
    # a megabyte of empty members (52,000 of them) cost 0.7 s of CPU to inflate
    many = gzip.compress(b"") * 52_000
    with pytest.raises(errors.InvalidRequest) as refused:
        inflate(many, "gzip", 1 << 20)
    assert "more than 16 concatenated members" in refused.value.message
    assert inflate(gzip.compress(b"a") * 16, "gzip", 100) == b"a" * 16
