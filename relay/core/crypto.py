"""Secrets at rest, identifiers and API keys.

Source and target secrets, and targets' custom headers, are stored as
AES-256-GCM ciphertexts under RELAY_SECRET_KEY, each bound to its row id
by the associated data, so a
ciphertext copied onto another row does not decrypt. Tenant API keys are
random 256-bit strings stored only as their SHA-256: they are unguessable,
so a slow password hash would buy nothing and cost every request. Portal
links' tokens are kept the same way.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_NONCE_BYTES = 12
API_KEY_PREFIX = "rly_"
PORTAL_TOKEN_PREFIX = "rpl_"


class SecretBox:
    """Encrypts and decrypts secrets with AES-GCM under one key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, *, bound_to: str) -> bytes:
        """Encrypt ``plaintext`` for the row ``bound_to``: nonce || ciphertext."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext.encode(), bound_to.encode())

    def open(self, sealed: bytes, *, bound_to: str) -> str:
        """Decrypt what :meth:`seal` made; raise ValueError if key or row do not match."""
        try:
            nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
            return self._aead.decrypt(nonce, ciphertext, bound_to.encode()).decode()
        except (InvalidTag, ValueError) as exc:
            raise ValueError("secret does not decrypt under RELAY_SECRET_KEY") from exc


#: Crockford's base 32, as ULIDs are written; every pair of its digits, by 10-bit value.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)
_RANDOM_BITS = 80
_MAX_RANDOM = (1 << _RANDOM_BITS) - 1


class _Ulids:
    """ULIDs, strictly increasing in this process (as python-ulid's ``ULID()``: within one
    millisecond the random part counts up), written out with a table of digit pairs.

    python-ulid builds a ``ULID`` object and encodes it a digit at a time, ~6 µs an id:
    a batch of 1,000 events to 10 targets (11,000 ids) held the gateway's event loop
    for ~70 ms. A batch's ids share their millisecond: its time is written once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ms = 0
        self._random = 0

    def take(self, count: int) -> tuple[int, int]:
        """A millisecond and the first of ``count`` consecutive random parts, all unused."""
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms <= self._ms:  # the same millisecond (or the clock stepped back)
                ms, first = self._ms, self._random + 1
            else:
                first = int.from_bytes(os.urandom(10), "big")
            if first + count - 1 > _MAX_RANDOM:  # no room left: the next millisecond
                ms, first = ms + 1, int.from_bytes(os.urandom(10), "big") >> 1
            self._ms, self._random = ms, first + count - 1
            return ms, first


_ULIDS = _Ulids()


def _time_part(ms: int, pairs: tuple[str, ...] = _PAIRS) -> str:
    """The 48-bit millisecond as 10 digits."""
    return (
        pairs[ms >> 40]
        + pairs[ms >> 30 & 1023]
        + pairs[ms >> 20 & 1023]
        + pairs[ms >> 10 & 1023]
        + pairs[ms & 1023]
    )


def _random_part(r: int, pairs: tuple[str, ...] = _PAIRS) -> str:
    """The 80 random bits as 16 digits."""
    return (
        pairs[r >> 70]
        + pairs[r >> 60 & 1023]
        + pairs[r >> 50 & 1023]
        + pairs[r >> 40 & 1023]
        + pairs[r >> 30 & 1023]
        + pairs[r >> 20 & 1023]
        + pairs[r >> 10 & 1023]
        + pairs[r & 1023]
    )


def new_id(prefix: str) -> str:
    """A time-sortable identifier such as ``tgt_01JD…`` (ULID)."""
    ms, r = _ULIDS.take(1)
    return f"{prefix}_{_time_part(ms)}{_random_part(r)}"


def new_ids(prefix: str, count: int) -> list[str]:
    """``count`` identifiers as :func:`new_id` makes them, in increasing order."""
    if count <= 0:
        return []
    ms, first = _ULIDS.take(count)
    head = f"{prefix}_{_time_part(ms)}"
    return [head + _random_part(r) for r in range(first, first + count)]


def new_api_key() -> str:
    """A tenant API key: 256 random bits, URL-safe."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> bytes:
    """What is stored for an API key."""
    return hashlib.sha256(key.encode()).digest()


def new_portal_token() -> str:
    """The secret of a portal link (the last part of its URL): 256 random bits, URL-safe."""
    return PORTAL_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_portal_token(token: str) -> bytes:
    """What is stored for a portal link's token (its SHA-256, as for API keys)."""
    return hashlib.sha256(token.encode()).digest()


def new_webhook_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def new_source_secret() -> str:
    """A secret for token, basic or hmac sources."""
    return secrets.token_urlsafe(32)


def constant_time_equals(a: str | bytes, b: str | bytes) -> bool:
    """Compare secrets without leaking where they differ."""
    a_bytes = a.encode() if isinstance(a, str) else a
    b_bytes = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a_bytes, b_bytes)


def _headers_context(target_id: str) -> str:
    # Bound to the target like its secret, and to the purpose, so neither
    # ciphertext decrypts in the other's column.
    return f"{target_id}/headers"


def seal_headers(box: SecretBox, target_id: str, headers: dict[str, str]) -> bytes | None:
    """A target's custom headers as stored: one ciphertext of their JSON, None when none."""
    if not headers:
        return None
    return box.seal(json.dumps(headers), bound_to=_headers_context(target_id))


def open_headers(box: SecretBox, target_id: str, sealed: bytes | None) -> dict[str, str]:
    """What :func:`seal_headers` stored; raise ValueError if key or row do not match."""
    if sealed is None:
        return {}
    headers: dict[str, str] = json.loads(box.open(sealed, bound_to=_headers_context(target_id)))
    return headers
