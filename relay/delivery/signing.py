"""Standard Webhooks signatures: what targets verify and what `standard-webhooks` sources send.

The signed content is ``{id}.{timestamp}.{body}``, HMAC-SHA256 keyed with the
base64-decoded part of a ``whsec_`` secret, sent as ``v1,<base64>``; several
signatures are separated by spaces (during a secret rotation).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from collections.abc import Iterable

SECRET_PREFIX = "whsec_"
TOLERANCE_S = 5 * 60


class SignatureError(ValueError):
    """A Standard Webhooks signature did not verify."""


@functools.lru_cache(maxsize=1024)  # decoded once per secret, not on every attempt
def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret (prefix optional, as in the reference libraries)."""
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a webhook secret is whsec_ followed by base64") from exc


def sign_payload(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``body``."""
    mac = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)  # not copied into one buffer first; the GIL is let go over a large body
    return "v1," + base64.b64encode(mac.digest()).decode()


def signature_header(secrets: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per secret, space-separated."""
    return " ".join(sign_payload(s, msg_id, timestamp, body) for s in secrets)


def verify(
    secret: str,
    msg_id: str,
    timestamp: str,
    signature_header_value: str,
    body: bytes,
    *,
    now: float,
    tolerance_s: int = TOLERANCE_S,
) -> None:
    """Raise SignatureError unless one ``v1`` signature matches and the timestamp is fresh."""
    try:
        ts = int(timestamp)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer") from None
    if abs(now - ts) > tolerance_s:
        raise SignatureError("webhook-timestamp is outside the tolerance")
    expected = sign_payload(secret, msg_id, ts, body).encode()
    for candidate in signature_header_value.split():
        version, _, _ = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(candidate.encode(), expected):
            return
    raise SignatureError("no matching signature")
