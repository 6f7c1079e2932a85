"""Who is looking: console sessions, sign-in, sign-out, idle expiry and CSRF tokens.

A session lives in an encrypted cookie (aiohttp-session, Fernet under a key
derived from RELAY_SECRET_KEY, so every gateway process reads every session).
It never holds a token or a key: an operator's session holds a fingerprint of
the admin token (changing the token ends every operator session), a tenant's
the id of the API key it signed in with (revoking the key ends its sessions).
Sign-out also writes the session's id to Redis for as long as the cookie could
otherwise live, so a copy of the cookie taken before sign-out is refused too.
A portal session (opened with a portal link, ``relay/console/portal.py``) holds
the link's id: it is a tenant's session, read-only if the link was, and it
ends at the link's ``expires_at`` at the latest, whatever the idle setting.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import redis.exceptions
from aiohttp import web
from aiohttp_session import Session, get_session, new_session
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relay.core.config import Settings
from relay.core.crypto import constant_time_equals, hash_api_key
from relay.store import console as store
from relay.store import portal_links
from relay.store.portal_links import PortalGrant
from relay.web.app_keys import POOL, REDIS, SETTINGS

log = logging.getLogger(__name__)

COOKIE = "relay_console"
#: The form field every console form carries.
CSRF_FIELD = "csrf_token"
#: How often a session's last-seen time is written again (each write re-sends the cookie).
_SEEN_RESOLUTION_S = 5.0


@dataclass(frozen=True, slots=True)
class Viewer:
    """A signed-in person: an operator (every tenant) or one tenant."""

    kind: Literal["operator", "tenant"]
    tenant_id: str | None = None
    tenant_name: str | None = None
    #: Signed in with a portal link rather than an API key.
    portal: bool = False
    #: Sees everything, changes nothing (a read-only portal link).
    read_only: bool = False
    #: When the session ends whatever happens (a portal session: its link's expires_at).
    ends_at: datetime | None = None

    @property
    def is_operator(self) -> bool:
        """True for the operator, who sees every tenant."""
        return self.kind == "operator"

    @property
    def scope(self) -> str | None:
        """The tenant every query is filtered by (None: every tenant)."""
        return self.tenant_id


OPERATOR = Viewer("operator")
#: Set on a request by the console's authentication: who is looking.
VIEWER: web.RequestKey[Viewer] = web.RequestKey("console_viewer", Viewer)


def session_storage(settings: Settings) -> EncryptedCookieStorage:
    """The encrypted cookie: HttpOnly, SameSite=Strict, Secure behind an https public URL."""
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"relay console session"
    ).derive(settings.secret_key)
    return EncryptedCookieStorage(
        key,
        cookie_name=COOKIE,
        path="/console",
        httponly=True,
        samesite="Strict",
        secure=settings.public_url.startswith("https://"),
    )


def _admin_fingerprint(token: str) -> str:
    """What an operator's session keeps of the admin token: a keyed hash, never the token."""
    return hmac.new(b"relay console operator", token.encode(), hashlib.sha256).hexdigest()[:32]


def _signed_out_key(sid: str) -> str:
    return f"relay:console:signed-out:{sid}"


async def csrf_token(request: web.Request) -> str:
    """The session's CSRF token, made on first use (a session exists before sign-in too)."""
    session = await get_session(request)
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


async def csrf_ok(request: web.Request) -> bool:
    """True when the posted form carries the session's CSRF token."""
    session = await get_session(request)
    expected = session.get("csrf")
    form = await request.post()
    sent = form.get(CSRF_FIELD)
    return (
        isinstance(expected, str) and isinstance(sent, str) and constant_time_equals(sent, expected)
    )


@dataclass(frozen=True, slots=True)
class Identity:
    """Whom a token names, and what their session will hold (never the token)."""

    viewer: Viewer
    data: dict[str, str]


async def identify(request: web.Request, token: str) -> Identity | None:
    """The admin token or a live API key's owner; None if ``token`` is neither."""
    settings = request.app[SETTINGS]
    if settings.admin_token and constant_time_equals(token, settings.admin_token):
        return Identity(OPERATOR, {"who": "operator", "admin": _admin_fingerprint(token)})
    owner = await store.key_owner_by_hash(request.app[POOL], hash_api_key(token))
    if owner is None:
        return None
    return Identity(
        Viewer("tenant", owner.tenant_id, owner.tenant_name),
        {"who": "tenant", "key": owner.key_id, "tenant": owner.tenant_id},
    )


async def sign_in(request: web.Request, identity: Identity) -> Viewer:
    """Start a session for ``identity`` (see :func:`identify`)."""
    viewer, data = identity.viewer, identity.data
    # a fresh session (new id, new CSRF token): nothing of the signed-out one carries over
    session = await new_session(request)
    session.update(
        {**data, "sid": secrets.token_urlsafe(16), "seen": time.time()},
    )
    session["csrf"] = secrets.token_urlsafe(32)
    return viewer


def portal_viewer(grant: PortalGrant) -> Viewer:
    """The tenant a portal link signs in as, flagged as a portal session."""
    return Viewer(
        "tenant",
        grant.tenant_id,
        grant.tenant_name,
        portal=True,
        read_only=grant.read_only,
        ends_at=grant.expires_at,
    )


async def sign_in_portal(request: web.Request, grant: PortalGrant) -> Viewer:
    """Start a portal session for a link just used (``portal_links.use_portal_link``)."""
    session = await new_session(request)
    session.update(
        {
            "who": "portal",
            "link": grant.id,
            "tenant": grant.tenant_id,
            "ends": grant.expires_at.timestamp(),
            "sid": secrets.token_urlsafe(16),
            "seen": time.time(),
        }
    )
    session["csrf"] = secrets.token_urlsafe(32)
    return portal_viewer(grant)


async def sign_out(request: web.Request) -> None:
    """End the session here and for any copy of its cookie."""
    session = await get_session(request)
    sid = session.get("sid")
    if isinstance(sid, str):
        ttl = int(request.app[SETTINGS].console_idle_s) + 60
        try:
            await request.app[REDIS].set(_signed_out_key(sid), b"1", ex=ttl)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            log.warning("console sign-out not recorded in Redis; the idle timeout still ends it")
    session.invalidate()


#: Why there is no viewer: never signed in, idle, ended (signed out, key revoked), or a
#: portal session that ended (its link expired, or idle).
SessionState = Literal["none", "expired", "ended", "portal_ended"]


async def current_viewer(request: web.Request) -> Viewer | SessionState:
    """The viewer of a live session; else why there is none (never signed in, idle, ended)."""
    session = await get_session(request)
    who = session.get("who")
    if who not in ("operator", "tenant", "portal"):
        return "none"
    settings = request.app[SETTINGS]
    now = time.time()
    seen = session.get("seen")
    ends = session.get("ends") if who == "portal" else None
    if who == "portal" and (not isinstance(ends, int | float) or now >= ends):
        session.invalidate()
        return "portal_ended"
    if not isinstance(seen, int | float) or now - seen > settings.console_idle_s:
        session.invalidate()
        return "portal_ended" if who == "portal" else "expired"
    viewer = await _still_valid(request, session)
    if viewer is None or await _signed_out(request, session.get("sid")):
        session.invalidate()
        return "portal_ended" if who == "portal" else "ended"
    if now - seen >= _SEEN_RESOLUTION_S:
        session["seen"] = now
    return viewer


async def _still_valid(request: web.Request, session: Session) -> Viewer | None:
    settings = request.app[SETTINGS]
    if session.get("who") == "operator":
        admin = session.get("admin")
        current = _admin_fingerprint(settings.admin_token) if settings.admin_token else None
        ok = isinstance(admin, str) and current is not None and constant_time_equals(admin, current)
        return OPERATOR if ok else None
    if session.get("who") == "portal":
        link_id = session.get("link")
        if not isinstance(link_id, str):
            return None
        grant = await portal_links.portal_session_grant(request.app[POOL], link_id)
        if grant is None or grant.tenant_id != session.get("tenant"):
            return None
        return portal_viewer(grant)
    key_id = session.get("key")
    if not isinstance(key_id, str):
        return None
    owner = await store.key_owner_by_id(request.app[POOL], key_id)
    if owner is None or owner.tenant_id != session.get("tenant"):
        return None
    return Viewer("tenant", owner.tenant_id, owner.tenant_name)


async def _signed_out(request: web.Request, sid: object) -> bool:
    if not isinstance(sid, str):
        return True
    try:
        return bool(await request.app[REDIS].exists(_signed_out_key(sid)))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        # Redis down must not lock operators out while they look into an incident:
        # the idle timeout still bounds a signed-out cookie's life.
        log.warning("console could not check sign-outs in Redis; allowing the session")
        return False


async def flash(request: web.Request, text: str, kind: Literal["ok", "error"] = "ok") -> None:
    """A message for the next page this session sees (never a secret: it rides in the cookie)."""
    session = await get_session(request)
    session["flash"] = {"kind": kind, "text": text}


async def take_flash(request: web.Request) -> dict[str, str] | None:
    """The pending message, once."""
    session = await get_session(request)
    message = session.pop("flash", None)
    return message if isinstance(message, dict) else None
