"""Request bodies: inflated only when a route reads one, never while it arrives.

aiohttp inflates a ``Content-Encoding: gzip`` body as its bytes arrive, before and
whether or not the route asks for it, and each chunk it inflates copies what is
still to inflate: a flood of gzip bombs on ``GET /healthz`` cost the gateway twice
the CPU of the same bytes sent plain. The gateway's connections do not decode
(``auto_decompress=False``, :class:`relay.web.server.GatewayRunner`), and
:class:`GatewayRequest` inflates in :meth:`~GatewayRequest.read`, the one door
every body goes through (``text()``, ``json()`` and ``post()`` read there), up to
the app's ``client_max_size`` *inflated* (413) as well as on the wire.
"""

from __future__ import annotations

import zlib

from aiohttp import MultipartReader, web

from relay.core import errors

#: Content-Encodings a body may have (one, no list): what aiohttp decoded before.
ENCODINGS = frozenset({"gzip", "deflate"})
#: The same, meaning the bytes are as sent.
PLAIN = frozenset({"", "identity"})
UNDECODABLE = "the body could not be read: it is truncated or not in its Content-Encoding"
#: Concatenated gzip members one body may have: each member's rest is copied once, so
#: a megabyte of empty members (52,000) cost 0.7 s of CPU before the bound.
MAX_GZIP_MEMBERS = 16


def encoding_of(request: web.BaseRequest) -> str:
    """The request's Content-Encoding, lower-cased ("" when there is none)."""
    return request.headers.get("Content-Encoding", "").strip().lower()


def inflate(raw: bytes, encoding: str, limit: int) -> bytes:
    """``raw`` decoded from ``encoding`` (gzip or deflate), at most ``limit`` bytes of it.

    Past ``limit`` it is a 413 (only ``limit + 1`` bytes are ever inflated); a body
    that is not in its encoding, or is cut short, is a 400. Concatenated gzip members
    are one body (at most MAX_GZIP_MEMBERS), and a deflate body may come with or without
    its zlib header, as aiohttp read them.
    """
    if encoding not in ENCODINGS:
        raise errors.InvalidRequest(
            "unsupported Content-Encoding (send gzip, deflate or none); the body was not read"
        )
    if encoding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    else:  # a zlib header's first byte says "deflate" in its low four bits
        wbits = zlib.MAX_WBITS if raw[:1] and raw[0] & 0x0F == 8 else -zlib.MAX_WBITS
    body, rest, members = bytearray(), raw, 0
    while rest:
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise errors.InvalidRequest(
                f"a gzip body of more than {MAX_GZIP_MEMBERS} concatenated members is refused"
            )
        decoder = zlib.decompressobj(wbits)
        try:
            body += decoder.decompress(rest, limit + 1 - len(body))
        except zlib.error:
            raise errors.InvalidRequest(UNDECODABLE) from None
        if len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
        if not decoder.eof:
            raise errors.InvalidRequest(UNDECODABLE)
        rest = decoder.unused_data if encoding == "gzip" else b""
    return bytes(body)


class GatewayRequest(web.Request):
    """A request whose body is inflated when, and only when, it is read."""

    __slots__ = ("_inflated",)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._inflated: bytes | None = None

    async def read(self) -> bytes:
        """The body, inflated per its Content-Encoding, at most ``client_max_size``."""
        if self._inflated is None:
            raw = await super().read()  # on the wire: 413 past client_max_size
            encoding = encoding_of(self)
            self._inflated = (
                raw if encoding in PLAIN else inflate(raw, encoding, self._client_max_size)
            )
        return self._inflated

    async def multipart(self) -> MultipartReader:
        """A multipart body as it was sent: one with a Content-Encoding is a 400 (it
        would be read raw, not inflated; no browser sends one)."""
        if encoding_of(self) not in PLAIN:
            raise errors.InvalidRequest("a multipart body cannot have a Content-Encoding")
        return await super().multipart()
