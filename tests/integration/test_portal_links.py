"""Portal links (API.md, Portal links): one-time, expiring, optionally read-only console sign-ins.

A tenant key (``POST /v1/portal-links``) or the operator (``POST
/v1/tenants/{id}/portal-links``) mints a link; opening it signs that browser
into the console as the tenant, once. Each test drives the console as a
browser would (a GET that shows a button, a form post with the page's CSRF
token, the session cookie) against a real gateway on a real database; the
race between two openings runs on two `relay serve` processes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from relay.console.portal import loggable
from relay.core.config import Settings
from relay.web.app import create_app
from tests.conftest import OPERATOR, GatewayTestServer, Tenant, assert_error, stack_env
from tests.integration.test_console import (
    CSRF,
    assert_sees_only_its_own,
    make_dead,
    tenant_objects,
)
from tests.services import GatewayProcess
from tests.stack import eventually, fetch


async def mint(
    client: TestClient[Any, Any], tenant: Tenant, body: Any = None, *, operator: bool = False
) -> dict[str, Any]:
    """A portal link for ``tenant``, minted with its key (or by the operator)."""
    if operator:
        resp = await client.post(
            f"/v1/tenants/{tenant.id}/portal-links", json=body, headers=OPERATOR
        )
    else:
        resp = await client.post("/v1/portal-links", json=body, headers=tenant.auth)
    assert resp.status == 201, await resp.text()
    link: dict[str, Any] = await resp.json()
    return link


def path_of(link: dict[str, Any]) -> str:
    return urlparse(link["url"]).path


async def open_link(client: TestClient[Any, Any], path: str) -> aiohttp.ClientResponse:
    """What a person does: open the link (a page with a button), then press the button."""
    shown = await client.get(path, allow_redirects=False)
    assert shown.status == 200, (shown.status, await shown.text())
    match = CSRF.search(await shown.text())
    assert match, "no form on the portal page"
    resp: aiohttp.ClientResponse = await client.post(
        path, data={"csrf_token": match.group(1)}, allow_redirects=False
    )
    return resp


async def signed_in_as(client: TestClient[Any, Any]) -> str | None:
    """The console's overview as the cookie jar sees it (None: sent away, not signed in)."""
    resp = await client.get("/console/", allow_redirects=False)
    if resp.status != 200:
        assert resp.status == 303, resp.status
        return None
    return await resp.text()


def forms_posting_to(page: str) -> list[str]:
    return re.findall(r'<form method="post" action="([^"]+)"', page)


# --- minting ------------------------------------------------------------------------------


async def test_a_tenant_key_mints_a_link_of_15_minutes_on_the_public_url(
    client: Any, tenant: Tenant, settings: Settings
) -> None:
    before = datetime.now(UTC)
    resp = await client.post("/v1/portal-links", headers=tenant.auth)
    assert resp.status == 201, await resp.text()
    link = await resp.json()
    assert link["url"].startswith(f"{settings.public_url}/console/portal/")
    expires_at = datetime.fromisoformat(link["expires_at"].replace("Z", "+00:00"))
    assert before + timedelta(seconds=890) < expires_at < before + timedelta(seconds=910)
    assert link["read_only"] is False
    # the token is in the URL only: what is stored is its hash
    token = path_of(link).rsplit("/", 1)[1]
    rows = await fetch(settings.database_url, "SELECT * FROM portal_links")
    assert len(rows) == 1
    assert token.encode() not in b"".join(
        v if isinstance(v, bytes) else str(v).encode() for v in rows[0].values()
    )
    assert rows[0]["tenant_id"] == tenant.id and rows[0]["used_at"] is None


async def test_the_operator_mints_a_link_for_any_tenant(client: Any, tenant: Tenant) -> None:
    link = await mint(client, tenant, {"expires_in": 60, "read_only": True}, operator=True)
    assert link["read_only"] is True
    expires_at = datetime.fromisoformat(link["expires_at"].replace("Z", "+00:00"))
    assert expires_at < datetime.now(UTC) + timedelta(seconds=70)
    missing = "ten_01JD0000000000000000000000"
    resp = await client.post(f"/v1/tenants/{missing}/portal-links", json={}, headers=OPERATOR)
    await assert_error(resp, 404, "not_found")


async def test_who_may_mint_a_link(client: Any, tenant: Tenant) -> None:
    # a tenant key is not the operator, and the operator token is not a tenant key
    resp = await client.post(f"/v1/tenants/{tenant.id}/portal-links", headers=tenant.auth)
    await assert_error(resp, 401, "unauthorized")
    resp = await client.post("/v1/portal-links", headers=OPERATOR)
    await assert_error(resp, 401, "unauthorized")
    resp = await client.post("/v1/portal-links")
    await assert_error(resp, 401, "unauthorized")


@pytest.mark.parametrize(
    "body",
    [
        {"expires_in": 59},
        {"expires_in": 86401},
        {"expires_in": "900"},
        {"expires_in": 90.5},
        {"read_only": "yes"},
        {"tenant_id": "ten_01JD0000000000000000000000"},
    ],
)
async def test_a_bad_body_is_422_naming_the_field_and_mints_nothing(
    client: Any, tenant: Tenant, body: dict[str, Any], database_url: str
) -> None:
    resp = await client.post("/v1/portal-links", json=body, headers=tenant.auth)
    error = await assert_error(resp, 422, "validation_error")
    assert {d["field"] for d in error["details"]} == set(body)
    minted = await fetch(database_url, "SELECT 1 FROM portal_links WHERE tenant_id = $1", tenant.id)
    assert minted == []


async def test_the_bounds_of_expires_in_are_accepted(client: Any, tenant: Tenant) -> None:
    for seconds in (60, 86400):
        link = await mint(client, tenant, {"expires_in": seconds})
        expires_at = datetime.fromisoformat(link["expires_at"].replace("Z", "+00:00"))
        left = (expires_at - datetime.now(UTC)).total_seconds()
        assert seconds - 10 < left <= seconds


async def test_the_openapi_document_describes_both_routes(client: Any) -> None:
    doc = await (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    for path, security in (
        ("/v1/portal-links", "tenantKey"),
        ("/v1/tenants/{tenant_id}/portal-links", "operatorToken"),
    ):
        op = doc["paths"][path]["post"]
        assert op["security"] == [{security: []}]
        assert op["requestBody"]["required"] is False
        created = op["responses"]["201"]["content"]["application/json"]["schema"]["$ref"]
        assert {"url", "expires_at"} <= set(schemas[created.rsplit("/", 1)[1]]["required"])
    expires_in = schemas["PortalLinkCreate"]["properties"]["expires_in"]
    assert (expires_in["minimum"], expires_in["maximum"], expires_in["default"]) == (60, 86400, 900)


# --- opening ------------------------------------------------------------------------------


async def test_a_link_signs_in_as_the_tenant_once(
    client: Any, tenant: Tenant, aiohttp_client: Any, settings: Settings
) -> None:
    link = await mint(client, tenant)
    path = path_of(link)
    # Given a page that says whose console it opens; showing it (a link preview) uses nothing
    for _ in range(2):
        shown = await client.get(path, allow_redirects=False)
        assert shown.status == 200
        assert "Open the console as Tenant A" in await shown.text()
    # When the person presses the button
    resp = await open_link(client, path)
    # Then they are in the console as the tenant, in a portal session
    assert resp.status == 303 and resp.headers["Location"] == "/console/"
    page = await signed_in_as(client)
    assert page is not None
    assert "Tenant A" in page and "Portal session" in page
    assert "By tenant" not in page  # not an operator
    # and nobody else can open it again, with or without the first browser's cookie
    for again in (client, await aiohttp_client(GatewayTestServer(create_app(settings)))):
        shown = await again.get(path, allow_redirects=False)
        assert shown.status == 410
        text = await shown.text()
        assert "already been used" in text
        assert 'method="post"' not in text.replace('action="/console/logout"', "")
    stranger = await aiohttp_client(GatewayTestServer(create_app(settings)))
    await stranger.get("/console/login")  # a session, for the CSRF token
    csrf = CSRF.search(await (await stranger.get("/console/login")).text())
    assert csrf
    resp = await stranger.post(path, data={"csrf_token": csrf.group(1)}, allow_redirects=False)
    assert resp.status == 410
    assert "already been used" in await resp.text()
    assert await signed_in_as(stranger) is None


async def test_opening_needs_the_pages_csrf_token(client: Any, tenant: Tenant) -> None:
    path = path_of(await mint(client, tenant))
    await client.get(path)
    resp = await client.post(path, data={}, allow_redirects=False)
    assert resp.status == 403
    assert await signed_in_as(client) is None
    # the link was not used up by the refused post
    resp = await open_link(client, path)
    assert resp.status == 303


async def test_an_expired_link_is_refused_with_a_page_that_says_so(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    link = await mint(client, tenant, {"expires_in": 60})
    path = path_of(link)
    csrf = CSRF.search(await (await client.get(path)).text())
    assert csrf
    await fetch(
        database_url,
        "UPDATE portal_links SET expires_at = now() - interval '1 second' WHERE tenant_id = $1",
        tenant.id,
    )
    shown = await client.get(path, allow_redirects=False)
    assert shown.status == 410
    assert "expired" in await shown.text()
    resp = await client.post(path, data={"csrf_token": csrf.group(1)}, allow_redirects=False)
    assert resp.status == 410
    assert "expired" in await resp.text()
    assert await signed_in_as(client) is None


@pytest.mark.parametrize(
    "path",
    [
        "/console/portal/not-a-link",
        "/console/portal/" + "A" * 43,
        "/console/portal/" + "x" * 300,
        "/console/portal/%00",
    ],
)
async def test_an_unknown_link_is_a_page_that_says_so(client: Any, path: str) -> None:
    resp = await client.get(path, allow_redirects=False)
    assert resp.status == 404
    assert resp.content_type == "text/html"
    assert "not a valid portal link" in await resp.text()
    assert await signed_in_as(client) is None


async def test_a_portal_session_sees_only_its_tenant(
    client: Any, tenant: Tenant, other_tenant: Tenant, database_url: str
) -> None:
    mine = await tenant_objects(client, tenant)
    theirs = await tenant_objects(client, other_tenant)
    await make_dead(database_url, [theirs["delivery"], mine["delivery"]])
    assert (await open_link(client, path_of(await mint(client, tenant)))).status == 303
    await assert_sees_only_its_own(client, mine, theirs)
    for path in (
        "/console/",
        "/console/dead-letters",
        f"/console/dead-letters?tenant={other_tenant.id}",
        f"/console/events?tenant={other_tenant.id}",
        f"/console/targets?tenant={other_tenant.id}",
    ):
        page = await (await client.get(path)).text()
        for their_id in theirs.values():
            assert their_id not in page, (path, their_id)
        assert "Tenant B" not in page  # (a tenant id typed into the query is only echoed back)


def test_a_links_token_never_reaches_a_log_line() -> None:
    # the console's error middleware logs the path of a failed request through this
    token = "rpl_" + "A" * 43
    assert token not in loggable(f"/console/portal/{token}")
    assert loggable("/console/targets/tgt_1") == "/console/targets/tgt_1"


# --- read-only ----------------------------------------------------------------------------


async def test_a_full_portal_session_has_the_controls(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    ids = await tenant_objects(client, tenant)
    await make_dead(database_url, [ids["delivery"]])
    assert (await open_link(client, path_of(await mint(client, tenant)))).status == 303
    target_page = await (await client.get(f"/console/targets/{ids['target']}")).text()
    for action in ("test", "disable", "rotate-secret"):
        assert f"/console/targets/{ids['target']}/{action}" in forms_posting_to(target_page)
    dead_page = await (await client.get("/console/dead-letters")).text()
    assert "/console/dead-letters/replay" in forms_posting_to(dead_page)


async def test_a_read_only_session_shows_no_control_and_refuses_a_forged_post(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    ids = await tenant_objects(client, tenant)
    done = await tenant_objects(client, tenant)
    await make_dead(database_url, [ids["delivery"]])
    await fetch(
        database_url,
        """
        UPDATE deliveries SET status = 'succeeded', next_attempt_at = NULL, enqueued_until = NULL,
               attempt_count = 1, last_status_code = 200
        WHERE id = $1
        """,
        done["delivery"],
    )
    deliveries_before = await fetch(
        database_url, "SELECT id FROM deliveries WHERE tenant_id = $1", tenant.id
    )
    link = await mint(client, tenant, {"read_only": True})
    assert (await open_link(client, path_of(link))).status == 303
    # Then the pages show no control: only the sign-out form posts
    for path in (
        "/console/",
        "/console/dead-letters",
        f"/console/deliveries/{ids['delivery']}",
        f"/console/deliveries/{done['delivery']}",
        f"/console/targets/{ids['target']}",
        "/console/targets",
        f"/console/events/{ids['event']}",
    ):
        resp = await client.get(path)
        assert resp.status == 200, path
        page = await resp.text()
        assert forms_posting_to(page) == ["/console/logout"], path
        assert "Read-only" in page, path
    # and a post made anyway, with the session's own CSRF token, is refused and changes nothing
    csrf = CSRF.search(await (await client.get("/console/")).text())
    assert csrf
    token = csrf.group(1)
    for path, data in (
        ("/console/dead-letters/replay", {"scope": "selected", "ids": ids["delivery"]}),
        (
            "/console/dead-letters/replay",
            {"scope": "selected", "ids": ids["delivery"], "confirm": "yes"},
        ),
        ("/console/dead-letters/purge", {"older_than": "2100-01-01T00:00", "confirm": "yes"}),
        (f"/console/deliveries/{done['delivery']}/retry", {}),
        (f"/console/targets/{ids['target']}/disable", {}),
        (f"/console/targets/{ids['target']}/enable", {}),
        (f"/console/targets/{ids['target']}/rotate-secret", {}),
        (f"/console/targets/{ids['target']}/test", {}),
    ):
        resp = await client.post(path, data={"csrf_token": token, **data}, allow_redirects=False)
        assert resp.status == 403, path
        assert resp.content_type == "text/html"
        text = await resp.text()
        # the whole reason, not its first line only
        assert "read-only portal session" in text and "or test event)" in text, path
    statuses = {
        r["id"]: r["status"]
        for r in await fetch(
            database_url,
            "SELECT id, status FROM deliveries WHERE tenant_id = $1",
            tenant.id,
        )
    }
    assert statuses[ids["delivery"]] == "dead" and statuses[done["delivery"]] == "succeeded"
    assert len(statuses) == len(deliveries_before)  # no test event was sent
    [target] = await fetch(
        database_url,
        "SELECT enabled, secret_rotated_at FROM targets WHERE id = $1",
        ids["target"],
    )
    assert target["enabled"] is True and target["secret_rotated_at"] is None
    # signing out still works
    resp = await client.post("/console/logout", data={"csrf_token": token}, allow_redirects=False)
    assert resp.status == 303
    assert await signed_in_as(client) is None


# --- the session's end --------------------------------------------------------------------


async def test_the_session_ends_at_expires_at_whatever_the_idle_setting(
    aiohttp_client: Any, settings: Settings, tenant: Tenant, database_url: str
) -> None:
    client = await aiohttp_client(
        GatewayTestServer(create_app(settings.with_overrides(console_idle_s=3600.0)))
    )
    link = await mint(client, tenant, {"expires_in": 60})
    [row] = await fetch(
        database_url,
        """
        UPDATE portal_links SET expires_at = now() + interval '2 seconds'
        WHERE tenant_id = $1 RETURNING expires_at
        """,
        tenant.id,
    )
    assert (await open_link(client, path_of(link))).status == 303
    page = await signed_in_as(client)
    assert page is not None
    # the header says when it ends
    iso = row["expires_at"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert "Portal session" in page and iso in page
    await asyncio.sleep((row["expires_at"] - datetime.now(UTC)).total_seconds() + 0.3)
    resp = await client.get("/console/events", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/console/portal-ended"
    ended = await client.get(resp.headers["Location"], allow_redirects=False)
    assert ended.status == 200
    assert "portal session has ended" in await ended.text()
    assert await signed_in_as(client) is None


# --- two gateway processes ----------------------------------------------------------------


@pytest.fixture
def two_gateways(database_url: str, clean_redis: str, tmp_path: Path) -> Iterator[list[str]]:
    """Two `relay serve` processes on one database, each on its own port."""
    env = stack_env(database_url, clean_redis)
    started = [
        GatewayProcess(env, tmp_path / f"gateway-{n}.log", processes=1).start() for n in (1, 2)
    ]
    yield [g.url for g in started]
    for gateway in started:
        gateway.stop()
        print(gateway.log()[-5000:])


@pytest.mark.slow
async def test_two_processes_opening_one_link_at_once_sign_in_one_browser(
    two_gateways: list[str], database_url: str
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{two_gateways[0]}/v1/tenants", json={"name": "Acme"}, headers=OPERATOR
        ) as resp:
            key = (await resp.json())["api_key"]
        async with http.post(
            f"{two_gateways[0]}/v1/portal-links", headers={"Authorization": f"Bearer {key}"}
        ) as resp:
            assert resp.status == 201
            path = path_of(await resp.json())
    # Given two browsers, each on the link's page served by its own gateway process
    # (cookies of an IP address host are kept only by an "unsafe" jar)
    browsers = [
        aiohttp.ClientSession(base, cookie_jar=aiohttp.CookieJar(unsafe=True))
        for base in two_gateways
    ]
    try:
        tokens = []
        for browser in browsers:
            async with browser.get(path) as resp:
                assert resp.status == 200
                match = CSRF.search(await resp.text())
                assert match
                tokens.append(match.group(1))
        # When both press the button while the link's row is locked, so both wait on it
        holder = await asyncpg.connect(database_url)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT 1 FROM portal_links FOR UPDATE")
            presses = [
                asyncio.ensure_future(
                    browser.post(path, data={"csrf_token": token}, allow_redirects=False)
                )
                for browser, token in zip(browsers, tokens, strict=True)
            ]

            async def both_wait() -> bool:
                # (read from another connection: a transaction sees one snapshot of the stats)
                rows = await fetch(
                    database_url,
                    """
                    SELECT count(*) AS n FROM pg_stat_activity
                    WHERE datname = current_database() AND wait_event_type = 'Lock'
                      AND query ILIKE '%portal_links%'
                    """,
                )
                return bool(rows[0]["n"] == 2)

            await eventually(both_wait, timeout=20)
            await tx.commit()
        finally:
            await holder.close()
        answers = [await press for press in presses]
        # Then exactly one is signed in, and the other is told the link was used
        assert sorted(a.status for a in answers) == [303, 410]
        for answer in answers:
            answer.release()
        signed_in = []
        for browser in browsers:
            async with browser.get("/console/", allow_redirects=False) as resp:
                signed_in.append(resp.status == 200)
        assert sorted(signed_in) == [False, True]
    finally:
        for browser in browsers:
            await browser.close()


async def test_guessing_portal_links_is_throttled_like_sign_in(
    aiohttp_client: Any, settings: Settings
) -> None:
    # Given a gateway whose failed sign-ins wait only a moment
    client = await aiohttp_client(
        GatewayTestServer(create_app(settings.with_overrides(auth_failure_delay_s=0.01)))
    )
    # When one address opens links that do not exist, again and again
    statuses = []
    for n in range(10):
        resp = await client.get(f"/console/portal/{'B' * 42}{n}", allow_redirects=False)
        statuses.append(resp.status)
    # Then each costs it like a failed sign-in, and the tenth is refused 429 with Retry-After
    assert statuses[:9] == [404] * 9
    assert statuses[9] == 429 and resp.headers.get("Retry-After")
