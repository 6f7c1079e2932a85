"""How ``POST /in/{source_id}`` is authenticated, per source auth type. Pure functions.

Every comparison of a secret is constant-time. During a rotation's overlap the
previous secret is accepted too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

from relay.core.crypto import constant_time_equals
from relay.delivery.signing import TOLERANCE_S, SignatureError, verify
from relay.ingest.routes import SourceEntry

#: Types whose credential can be checked before the body is read.
PRE_BODY_TYPES = frozenset({"token", "basic"})


def candidate_secrets(source: SourceEntry, now: float) -> list[str]:
    """The current secret, and the previous one while its overlap lasts."""
    secrets = [source.secret]
    if (
        source.previous_secret is not None
        and source.previous_valid_until is not None
        and now < source.previous_valid_until
    ):
        secrets.append(source.previous_secret)
    return secrets


def _any_equal(given: str, secrets: list[str]) -> bool:
    # Compare against every candidate so timing does not reveal which matched.
    matched = False
    for secret in secrets:
        matched |= constant_time_equals(given, secret)
    return matched


def _bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def check_before_body(
    source: SourceEntry, headers: Mapping[str, str], query: Mapping[str, str], now: float
) -> bool:
    """token and basic: True if the request carries a valid credential."""
    secrets = candidate_secrets(source, now)
    if source.auth_type == "token":
        given = query.get("token") or _bearer(headers)
        return given is not None and _any_equal(given, secrets)
    if source.auth_type == "basic":
        scheme, _, encoded = headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, ValueError):
            return False
        username, sep, password = decoded.partition(":")
        if not sep:
            return False
        user_ok = constant_time_equals(username, source.auth_config.get("username", ""))
        return _any_equal(password, secrets) & user_ok
    raise ValueError(f"{source.auth_type} is checked with the body")


def hmac_digests(secret: str, body: bytes) -> tuple[str, str]:
    """(hex, base64) of HMAC-SHA256(secret, body)."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return digest.hex(), base64.b64encode(digest).decode()


def timestamped_signature(source: SourceEntry, headers: Mapping[str, str]) -> bytes | None:
    """The digest an hmac source's timestamped signature carries, to remember; else None.

    Call it once :func:`check_with_body` accepted the request. The digest is read
    from the hex or base64 form the sender chose, so the same signature written
    another way is the same. Without a timestamp header there is nothing to
    remember: a replay cannot be told from a resend (API.md).
    """
    if source.auth_type != "hmac" or not source.auth_config.get("timestamp_header"):
        return None
    value = headers.get(source.auth_config.get("header", "X-Signature"), "")
    given = value[len(source.auth_config.get("prefix", "")) :].strip()
    try:
        # a verified signature is 64 hex digits or 44 base64 characters
        return bytes.fromhex(given) if len(given) == 64 else base64.b64decode(given)
    except (ValueError, binascii.Error):
        return given.encode("utf-8", "surrogateescape")


def check_with_body(
    source: SourceEntry, headers: Mapping[str, str], body: bytes, now: float
) -> bool:
    """hmac and standard-webhooks: True if the body's signature verifies."""
    secrets = candidate_secrets(source, now)
    if source.auth_type == "hmac":
        header = source.auth_config.get("header", "X-Signature")
        prefix = source.auth_config.get("prefix", "")
        value = headers.get(header)
        if value is None or not value.startswith(prefix):
            return False
        given = value[len(prefix) :].strip()
        signed = body
        if timestamp_header := source.auth_config.get("timestamp_header"):
            stamp = headers.get(timestamp_header, "").strip()
            if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
                return False
            if abs(now - int(stamp)) > TOLERANCE_S:
                return False
            signed = stamp.encode() + b"." + body
        matched = False
        for secret in secrets:
            hex_digest, b64_digest = hmac_digests(secret, signed)
            matched |= constant_time_equals(given.lower(), hex_digest)
            matched |= constant_time_equals(given, b64_digest)
        return matched
    if source.auth_type == "standard-webhooks":
        msg_id = headers.get("webhook-id")
        timestamp = headers.get("webhook-timestamp")
        signature = headers.get("webhook-signature")
        if not msg_id or not timestamp or not signature:
            return False
        for secret in secrets:
            try:
                verify(secret, msg_id, timestamp, signature, body, now=now)
                return True
            except (SignatureError, ValueError):
                continue
        return False
    raise ValueError(f"{source.auth_type} is checked before the body")
