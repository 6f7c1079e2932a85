"""Typed keys for what the application and its requests carry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from relay.cache import RoutingCache
    from relay.config import Settings
    from relay.crypto import SecretBox
    from relay.enqueue import Enqueuer
    from relay.group_commit import GroupCommit
    from relay.ratelimit import RateLimiter

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
POOL: web.AppKey[Any] = web.AppKey("pool")  # asyncpg.Pool
REDIS: web.AppKey[Any] = web.AppKey("redis")  # redis.asyncio.Redis
SECRETS: web.AppKey[SecretBox] = web.AppKey("secrets")
CACHE: web.AppKey[RoutingCache] = web.AppKey("cache")
ENQUEUER: web.AppKey[Enqueuer] = web.AppKey("enqueuer")
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter")
GROUP_COMMIT: web.AppKey[GroupCommit] = web.AppKey("group_commit")

#: Set on a request by tenant authentication.
TENANT_ID: web.RequestKey[str] = web.RequestKey("tenant_id", str)
