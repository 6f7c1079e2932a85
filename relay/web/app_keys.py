"""Typed keys for what the application and its requests carry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from relay.core.auth_throttle import AuthThrottle
    from relay.core.config import Settings
    from relay.core.crypto import SecretBox
    from relay.core.ratelimit import RateLimiter
    from relay.delivery.wakeups import Enqueuer
    from relay.ingest.group_commit import GroupCommit
    from relay.ingest.routes import RoutingCache
    from relay.store.db import Pool

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
POOL: web.AppKey[Pool] = web.AppKey("pool")
REDIS: web.AppKey[Any] = web.AppKey("redis")  # redis.asyncio.Redis
SECRETS: web.AppKey[SecretBox] = web.AppKey("secrets")
CACHE: web.AppKey[RoutingCache] = web.AppKey("cache")
ENQUEUER: web.AppKey[Enqueuer] = web.AppKey("enqueuer")
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter")
THROTTLE: web.AppKey[AuthThrottle] = web.AppKey("auth_throttle")
GROUP_COMMIT: web.AppKey[GroupCommit] = web.AppKey("group_commit")
#: The OpenAPI document, built once from the route table.
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")

#: Set on a request by tenant authentication.
TENANT_ID: web.RequestKey[str] = web.RequestKey("tenant_id", str)
