"""What signed sources have sent lately, kept in Redis: shared by every gateway process.

A signed request is valid for the signature's tolerance (5 minutes either way),
so a captured one could be replayed that long. A standard-webhooks source's
``webhook-id``, and the signature of an hmac source with a timestamp header, are
remembered for twice the tolerance and a repeat is refused. Either is released
again when its request does not end in a 202 (the sender retries it). Redis
being unreachable lets the request through, like the rate limits.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import redis.exceptions

from relay.delivery.signing import TOLERANCE_S

log = logging.getLogger(__name__)

_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _key(source_id: str, webhook_id: str) -> str:
    digest = hashlib.sha256(webhook_id.encode("utf-8", "surrogateescape")).hexdigest()
    return f"relay:whid:{source_id}:{digest}"


def _signature_key(source_id: str, signature: bytes) -> str:
    return f"relay:hmacsig:{source_id}:{hashlib.sha256(signature).hexdigest()}"


async def _remember(client: Any, key: str) -> str | None:
    """Set ``key`` if absent: the key if it is new (or Redis is down: ""), None if seen."""
    try:
        fresh = await client.set(key, b"1", nx=True, ex=2 * TOLERANCE_S)
    except _REDIS_DOWN as exc:
        log.warning("replay memory unavailable, admitting: %s", type(exc).__name__)
        return ""
    return key if fresh else None


async def first_sighting(client: Any, source_id: str, webhook_id: str) -> str | None:
    """Remember ``webhook_id``: its key if it is new (or Redis is down: ""), None if seen."""
    return await _remember(client, _key(source_id, webhook_id))


async def first_signature(client: Any, source_id: str, signature: bytes) -> str | None:
    """Remember an accepted hmac ``signature`` (its digest bytes), like :func:`first_sighting`."""
    return await _remember(client, _signature_key(source_id, signature))


async def forget(client: Any, key: str) -> None:
    """Release an id or signature whose request was not accepted, so the sender's retry is."""
    if not key:
        return
    try:
        await client.delete(key)
    except _REDIS_DOWN as exc:
        log.warning("replay memory unavailable, not released: %s", type(exc).__name__)
