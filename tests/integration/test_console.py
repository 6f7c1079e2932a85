"""The web console over HTTP (no browser): sign-in, sessions, CSRF, CSP, isolation, replay.

Each test drives the console as a browser would, with form posts and the
session cookie, against a real gateway on a real database. Refusals are HTML
pages with the status code (the console's pages are HTML, never API JSON).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from relay.console.session import COOKIE
from relay.core.config import Settings
from relay.web.app import create_app
from tests.conftest import (
    ADMIN_TOKEN,
    OPERATOR,
    GatewayTestServer,
    Tenant,
    make_tenant,
)
from tests.stack import fetch

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


async def csrf_of(client: TestClient[Any, Any], path: str) -> str:
    """The CSRF token of the form on ``path``."""
    resp = await client.get(path, allow_redirects=False)
    assert resp.status == 200, (path, resp.status)
    match = CSRF.search(await resp.text())
    assert match, f"no CSRF field on {path}"
    return match.group(1)


async def sign_in(client: TestClient[Any, Any], token: str) -> Any:
    """Sign in through the form; the session cookie stays in the client's jar."""
    csrf = await csrf_of(client, "/console/login")
    resp = await client.post(
        "/console/login", data={"token": token, "csrf_token": csrf}, allow_redirects=False
    )
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == "/console/"
    return resp


async def signed_in_page(client: TestClient[Any, Any], path: str) -> bool:
    """True when ``path`` answers the page itself, False when it sends the viewer to sign in."""
    resp = await client.get(path, allow_redirects=False)
    if resp.status == 303:
        assert resp.headers["Location"].startswith("/console/login")
        return False
    assert resp.status == 200, (path, resp.status)
    return True


async def tenant_objects(client: TestClient[Any, Any], tenant: Tenant) -> dict[str, str]:
    """A source, a target, one event and its (pending: no worker runs) delivery."""
    source = await (
        await client.post(
            "/v1/sources", json={"name": "sl", "auth": {"type": "token"}}, headers=tenant.auth
        )
    ).json()
    target = await (
        await client.post(
            "/v1/targets", json={"url": "http://127.0.0.1:9/hooks"}, headers=tenant.auth
        )
    ).json()
    resp = await client.post(
        f"/in/{source['id']}?token={source['secret']}",
        json={"uuid": f"u-{tenant.id}", "objectType": "Bill", "action": "paid", "objectId": 4711},
    )
    assert resp.status == 202
    [event_id] = (await resp.json())["event_ids"]
    event = await (await client.get(f"/v1/events/{event_id}", headers=tenant.auth)).json()
    [delivery] = [d for d in event["deliveries"] if d["target_id"] == target["id"]]
    return {"target": target["id"], "event": event_id, "delivery": delivery["id"]}


async def make_dead(database_url: str, delivery_ids: list[str], code: int = 500) -> None:
    """Mark deliveries dead after ``code`` answers, as the engine would have."""
    await fetch(
        database_url,
        """
        UPDATE deliveries SET status = 'dead', next_attempt_at = NULL, enqueued_until = NULL,
               attempt_count = 3, last_status_code = $2, last_error = $3
        WHERE id = ANY($1::text[])
        """,
        delivery_ids,
        code,
        f"HTTP {code}",
    )


async def test_a_wrong_token_is_refused_and_opens_nothing(client: Any) -> None:
    csrf = await csrf_of(client, "/console/login")
    resp = await client.post(
        "/console/login",
        data={"token": "not-the-admin-token-at-all", "csrf_token": csrf},
        allow_redirects=False,
    )
    assert resp.status == 401
    assert "neither the admin token nor a live API key" in await resp.text()
    assert not await signed_in_page(client, "/console/")
    assert not await signed_in_page(client, "/console/dead-letters")


async def test_the_admin_token_and_an_api_key_sign_in(client: Any, tenant: Tenant) -> None:
    await sign_in(client, ADMIN_TOKEN)
    page = await (await client.get("/console/")).text()
    assert "Operator" in page and "By tenant" in page and "Tenant A" in page
    client.session.cookie_jar.clear()
    await sign_in(client, tenant.api_key)
    page = await (await client.get("/console/")).text()
    assert "Tenant A" in page and "By tenant" not in page


async def test_the_session_cookie_is_httponly_strict_and_holds_no_secret(
    client: Any, tenant: Tenant
) -> None:
    for token in (ADMIN_TOKEN, tenant.api_key):
        client.session.cookie_jar.clear()
        resp = await sign_in(client, token)
        [cookie] = [c for c in resp.headers.getall("Set-Cookie") if c.startswith(COOKIE + "=")]
        attributes = {a.strip().split("=")[0].lower(): a for a in cookie.split(";")[1:]}
        assert "httponly" in attributes
        assert attributes["samesite"].strip().lower() == "samesite=strict"
        assert attributes["path"].strip() == "Path=/console"
        assert "secure" not in attributes  # the public URL is http here
        assert token not in cookie


async def test_the_cookie_is_secure_behind_an_https_public_url(
    aiohttp_client: Any, settings: Settings
) -> None:
    https = settings.with_overrides(public_url="https://relay.example.com")
    client = await aiohttp_client(GatewayTestServer(create_app(https)))
    resp = await client.get("/console/login")
    [cookie] = [c for c in resp.headers.getall("Set-Cookie") if c.startswith(COOKIE + "=")]
    assert "Secure" in [a.strip() for a in cookie.split(";")]


async def test_console_pages_carry_a_strict_csp_and_the_api_does_not(
    client: Any, tenant: Tenant
) -> None:
    await tenant_objects(client, tenant)
    await sign_in(client, ADMIN_TOKEN)
    for path in ("/console/login", "/console/", "/console/dead-letters", "/console/events"):
        resp = await client.get(path)
        assert resp.status == 200, path
        csp = resp.headers["Content-Security-Policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'none'"
        host = f"http://{resp.url.host}:{resp.url.port}"
        for kind in ("script-src", "style-src", "img-src"):
            assert directives[kind] == f"{host}/console/static/", (kind, csp)
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert directives["frame-ancestors"] == "'none'"
        assert resp.headers["Cache-Control"] == "no-store"
        # what the policy would block is not in the page: no inline script or style
        page = await resp.text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", page), path
        assert " style=" not in page and "<style" not in page, path
        assert not re.search(r" on[a-z]+=", page), path
    for path in ("/healthz", "/v1/targets"):
        resp = await client.get(path, headers=tenant.auth)
        assert "Content-Security-Policy" not in resp.headers
    static = await client.get("/console/static/console.css")
    assert static.status == 200 and static.content_type == "text/css"
    assert (await client.get("/console/static/../app.py")).status == 404


async def test_a_form_post_without_its_csrf_token_is_refused(client: Any, tenant: Tenant) -> None:
    ids = await tenant_objects(client, tenant)
    await sign_in(client, ADMIN_TOKEN)
    path = f"/console/targets/{ids['target']}/disable"
    for data in ({}, {"csrf_token": "forged"}):
        resp = await client.post(path, data=data, allow_redirects=False)
        assert resp.status == 403
        assert resp.content_type == "text/html"
        assert "did not come from this console session" in await resp.text()
    target = await (await client.get(f"/v1/targets/{ids['target']}", headers=tenant.auth)).json()
    assert target["enabled"] is True
    # the same post with the page's token goes through
    csrf = await csrf_of(client, f"/console/targets/{ids['target']}")
    resp = await client.post(path, data={"csrf_token": csrf}, allow_redirects=False)
    assert resp.status == 303
    target = await (await client.get(f"/v1/targets/{ids['target']}", headers=tenant.auth)).json()
    assert target["enabled"] is False
    assert target["disabled_reason"] == "disabled in the console by an operator"


async def test_sign_in_itself_needs_the_csrf_token(client: Any) -> None:
    await client.get("/console/login")
    resp = await client.post("/console/login", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    assert resp.status == 403
    assert not await signed_in_page(client, "/console/")


async def assert_sees_only_its_own(
    client: TestClient[Any, Any], mine: dict[str, str], theirs: dict[str, str]
) -> None:
    """The signed-in tenant's pages of its delivery, event and target answer 200; the other
    tenant's (and a malformed id) a 404 page that does not say which it is."""
    for path in (
        f"/console/deliveries/{mine['delivery']}",
        f"/console/events/{mine['event']}",
        f"/console/targets/{mine['target']}",
    ):
        assert (await client.get(path)).status == 200, path
    for path in (
        f"/console/deliveries/{theirs['delivery']}",
        f"/console/deliveries/{theirs['delivery']}/live",
        f"/console/events/{theirs['event']}",
        f"/console/targets/{theirs['target']}",
        "/console/deliveries/dlv_not-an-id",
    ):
        resp = await client.get(path)
        assert resp.status == 404, path
        assert "nothing here, or it belongs to another tenant" in await resp.text()


async def test_a_tenant_gets_404_for_another_tenants_objects(
    client: Any, tenant: Tenant, other_tenant: Tenant, database_url: str
) -> None:
    mine = await tenant_objects(client, tenant)
    theirs = await tenant_objects(client, other_tenant)
    await make_dead(database_url, [theirs["delivery"]])
    await sign_in(client, tenant.api_key)
    await assert_sees_only_its_own(client, mine, theirs)
    csrf = await csrf_of(client, "/console/dead-letters")
    for path in (
        f"/console/targets/{theirs['target']}/disable",
        f"/console/deliveries/{theirs['delivery']}/retry",
        "/console/dead-letters/purge",
    ):
        resp = await client.post(path, data={"csrf_token": csrf}, allow_redirects=False)
        assert resp.status == 404, path
    # a replay of their dead letter by id replays nothing, even confirmed
    resp = await client.post(
        "/console/dead-letters/replay",
        data={"csrf_token": csrf, "scope": "selected", "ids": theirs["delivery"], "confirm": "yes"},
    )
    assert "Nothing was replayed" in await resp.text()
    [row] = await fetch(
        database_url, "SELECT status FROM deliveries WHERE id = $1", theirs["delivery"]
    )
    assert row["status"] == "dead"
    # their rows are in none of my lists, even asked for by their tenant id
    for path in (
        "/console/dead-letters",
        f"/console/dead-letters?tenant={other_tenant.id}",
        f"/console/events?tenant={other_tenant.id}&object_type=Bill",
        f"/console/targets?tenant={other_tenant.id}",
        "/console/",
    ):
        page = await (await client.get(path)).text()
        for their_id in theirs.values():
            assert their_id not in page, (path, their_id)
        assert other_tenant.id not in page and "Tenant B" not in page


async def test_an_idle_session_expires(
    aiohttp_client: Any, settings: Settings, tenant: Tenant
) -> None:
    client = await aiohttp_client(
        GatewayTestServer(create_app(settings.with_overrides(console_idle_s=1.0)))
    )
    await sign_in(client, tenant.api_key)
    assert await signed_in_page(client, "/console/events")
    await asyncio.sleep(1.3)
    resp = await client.get("/console/events", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/console/login?reason=expired&next=")
    page = await (await client.get(resp.headers["Location"])).text()
    assert "Your session ended after a while without activity" in page
    assert not await signed_in_page(client, "/console/events")


async def test_sign_out_ends_the_session_even_for_a_copy_of_the_cookie(client: Any) -> None:
    await sign_in(client, ADMIN_TOKEN)
    [copied] = [c for c in client.session.cookie_jar if c.key == COOKIE]
    csrf = await csrf_of(client, "/console/")
    resp = await client.post("/console/logout", data={"csrf_token": csrf}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/console/login?reason=signed_out"
    assert not await signed_in_page(client, "/console/")
    # someone who copied the cookie before the sign-out
    client.session.cookie_jar.clear()
    client.session.cookie_jar.update_cookies({COOKIE: copied.value}, client.make_url("/console/"))
    resp = await client.get("/console/", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/console/login?reason=ended")


async def test_revoking_the_key_ends_its_console_sessions(client: Any, tenant: Tenant) -> None:
    await sign_in(client, tenant.api_key)
    assert await signed_in_page(client, "/console/")
    resp = await client.delete(
        f"/v1/tenants/{tenant.id}/api-keys/{tenant.api_key_id}", headers=OPERATOR
    )
    assert resp.status == 204
    assert not await signed_in_page(client, "/console/")


async def test_replay_from_the_list_confirms_the_count_then_replays_through_the_api(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    dead = [await tenant_objects(client, tenant) for _ in range(3)]
    other = await make_tenant(client, "Tenant C")
    theirs = await tenant_objects(client, other)
    await make_dead(database_url, [d["delivery"] for d in dead[:2]], code=500)
    await make_dead(database_url, [dead[2]["delivery"], theirs["delivery"]], code=404)
    await sign_in(client, ADMIN_TOKEN)

    page = await (await client.get(f"/console/dead-letters?tenant={tenant.id}&status=500")).text()
    assert "<strong>2</strong> dead letters match" in page
    assert dead[0]["delivery"] in page and dead[2]["delivery"] not in page
    assert (await (await client.get("/console/dead-letters?error=timeout")).text()).count(
        "No dead letter matches this filter"
    ) == 1

    # Given the filter "tenant, status 500", When "replay all" is asked, Then the count is shown
    csrf = await csrf_of(client, "/console/dead-letters")
    form = {"csrf_token": csrf, "tenant": tenant.id, "status": "500", "scope": "all"}
    confirm = await client.post("/console/dead-letters/replay", data=form)
    text = await confirm.text()
    assert confirm.status == 200 and "Replay 2 dead letters?" in text
    rows = await fetch(
        database_url,
        "SELECT status FROM deliveries WHERE id = ANY($1::text[])",
        [d["delivery"] for d in dead],
    )
    assert [r["status"] for r in rows] == ["dead"] * 3  # nothing moved before the confirmation
    # And once confirmed, exactly those two go back to pending
    done = await client.post(
        "/console/dead-letters/replay", data={**form, "confirm": "yes"}, allow_redirects=False
    )
    assert done.status == 303
    page = await (await client.get(done.headers["Location"])).text()
    assert "Replayed 2 dead letters" in page
    rows = {
        r["id"]: r["status"] for r in await fetch(database_url, "SELECT id, status FROM deliveries")
    }
    assert rows[dead[0]["delivery"]] == rows[dead[1]["delivery"]] == "pending"
    assert rows[dead[2]["delivery"]] == rows[theirs["delivery"]] == "dead"

    # "All" of a tenant is the API's own selection: counted alike, replayed by a worker job
    form = {"csrf_token": csrf, "tenant": tenant.id, "scope": "all"}
    text = await (await client.post("/console/dead-letters/replay", data=form)).text()
    assert "Replay 1 dead letter?" in text and "A worker moves them back" in text
    done = await client.post("/console/dead-letters/replay", data={**form, "confirm": "yes"})
    assert "Replaying 1 dead letter: a worker puts them back" in await done.text()

    # A selection by checkbox counts only what is still dead
    form = {"csrf_token": csrf, "scope": "selected"}
    data = [*form.items(), ("ids", dead[0]["delivery"]), ("ids", dead[2]["delivery"])]
    text = await (await client.post("/console/dead-letters/replay", data=data)).text()
    assert "Replay 1 dead letter?" in text


async def test_a_rotated_secret_is_shown_once_and_signs_from_then_on(
    client: Any, tenant: Tenant
) -> None:
    ids = await tenant_objects(client, tenant)
    await sign_in(client, tenant.api_key)
    csrf = await csrf_of(client, f"/console/targets/{ids['target']}")
    resp = await client.post(
        f"/console/targets/{ids['target']}/rotate-secret", data={"csrf_token": csrf}
    )
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    shown = re.search(r'id="secret">(whsec_[A-Za-z0-9+/=]+)<', await resp.text())
    assert shown, "the new secret is on the page"
    api = await client.get(f"/v1/targets/{ids['target']}/secret", headers=tenant.auth)
    assert (await api.json())["secret"] == shown.group(1)
    # and never again: not on the target's page, not in the session cookie
    assert (
        shown.group(1) not in await (await client.get(f"/console/targets/{ids['target']}")).text()
    )
    assert all(shown.group(1) not in c.value for c in client.session.cookie_jar)


async def test_operators_purge_after_a_confirmation(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    ids = await tenant_objects(client, tenant)
    await make_dead(database_url, [ids["delivery"]])
    await sign_in(client, ADMIN_TOKEN)
    csrf = await csrf_of(client, "/console/dead-letters")
    form = {"csrf_token": csrf, "older_than": "2999-01-01T00:00", "tenant": tenant.id}
    text = await (await client.post("/console/dead-letters/purge", data=form)).text()
    assert "Purge 1 dead letter?" in text
    assert await fetch(database_url, "SELECT 1 FROM deliveries WHERE id = $1", ids["delivery"])
    await client.post("/console/dead-letters/purge", data={**form, "confirm": "yes"})
    assert not await fetch(database_url, "SELECT 1 FROM deliveries WHERE id = $1", ids["delivery"])


@pytest.mark.parametrize(
    "path",
    [
        "/console/dead-letters?since=yesterday",
        "/console/dead-letters?status=99",
        "/console/events?since=2026-13-45",
        "/console/events?cursor=nonsense",
    ],
)
async def test_bad_filters_say_what_is_wrong_instead_of_failing(client: Any, path: str) -> None:
    await sign_in(client, ADMIN_TOKEN)
    resp = await client.get(path)
    assert resp.status == 422
    page = await resp.text()
    assert 'role="alert"' in page


async def test_every_page_renders_for_an_operator_and_a_tenant(
    client: Any, tenant: Tenant, database_url: str
) -> None:
    ids = await tenant_objects(client, tenant)
    await make_dead(database_url, [ids["delivery"]])
    for token in (ADMIN_TOKEN, tenant.api_key):
        client.session.cookie_jar.clear()
        await sign_in(client, token)
        for path, expect in (
            ("/console/", "Dead letters"),
            ("/console/dead-letters", ids["delivery"]),
            (f"/console/deliveries/{ids['delivery']}", "webhook-signature"),
            (f"/console/deliveries/{ids['delivery']}/live", "Attempts"),
            (f"/console/targets?tenant={tenant.id}", "http://127.0.0.1:9/hooks"),
            (f"/console/targets/{ids['target']}", "Health, last hour"),
            ("/console/events?object_type=bill&object_id=4711", ids["event"]),
            (f"/console/events?uuid=u-{tenant.id}", ids["event"]),
            (f"/console/events/{ids['event']}", "&#34;objectType&#34;: &#34;Bill&#34;"),
        ):
            resp = await client.get(path)
            assert resp.status == 200, (token == ADMIN_TOKEN, path, await resp.text())
            assert expect in await resp.text(), path
    assert ids["event"] not in await (await client.get("/console/events?object_id=4712")).text()


async def test_an_operator_sees_every_tenants_targets_the_failing_first(
    client: Any, tenant: Tenant, other_tenant: Tenant, database_url: str
) -> None:
    # Given a target of each of two tenants, the second tenant's failing since an hour ago
    mine = await (
        await client.post("/v1/targets", json={"url": "https://a.example/h"}, headers=tenant.auth)
    ).json()
    theirs = await (
        await client.post(
            "/v1/targets", json={"url": "https://b.example/h"}, headers=other_tenant.auth
        )
    ).json()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE targets SET failing_since = now() - interval '1 hour' WHERE id = $1",
            theirs["id"],
        )
    finally:
        await conn.close()
    # When an operator opens the targets page without choosing a tenant
    await sign_in(client, ADMIN_TOKEN)
    page = await (await client.get("/console/targets")).text()
    # Then both are listed with their tenant, the failing one first
    assert "Every tenant&#39;s targets" in page or "Every tenant's targets" in page
    assert page.index(theirs["id"]) < page.index(mine["id"])
    # and a tenant sees only its own page, never the list across tenants
    client.session.cookie_jar.clear()
    await sign_in(client, tenant.api_key)
    own = await (await client.get("/console/targets")).text()
    assert theirs["id"] not in own and "Every tenant" not in own
