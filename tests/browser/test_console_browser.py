"""The console in a real browser, against a real gateway, `relay worker` and receiver.

The story an operator lives through: a receiver fails, its delivery dies, the
operator finds the dead letter, reads its attempts, fixes the receiver, replays
it from the page and sees it succeed. Then what must not work: a tenant
opening another tenant's delivery by URL, a form posted without its CSRF token,
a page after sign-out.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.conftest import Screenshots
from tests.conftest import ADMIN_TOKEN, Tenant, make_tenant
from tests.stack import Receiver, eventually, status

pytestmark = pytest.mark.slow

DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


async def tenant_with_source(gateway: Any, name: str) -> tuple[Tenant, dict[str, Any]]:
    tenant = await make_tenant(gateway, name)
    resp = await gateway.post(
        "/v1/sources", json={"name": "SoftLedger", "auth": {"type": "token"}}, headers=tenant.auth
    )
    assert resp.status == 201
    return tenant, await resp.json()


async def add_target(gateway: Any, tenant: Tenant, url: str, **extra: Any) -> str:
    resp = await gateway.post("/v1/targets", json={"url": url, **extra}, headers=tenant.auth)
    assert resp.status == 201, await resp.text()
    target_id: str = (await resp.json())["id"]
    return target_id


async def ingest(gateway: Any, source: dict[str, Any], **event: Any) -> str:
    resp = await gateway.post(f"/in/{source['id']}?token={source['secret']}", json=event)
    assert resp.status == 202, await resp.text()
    [event_id] = (await resp.json())["event_ids"]
    return str(event_id)


async def sign_in(page: Any, base: str, token: str) -> None:
    await page.goto(f"{base}/console/")
    assert "/console/login" in page.url  # not signed in yet: sent to sign in
    await page.fill("#token", token)
    await page.click("button:has-text('Sign in')")
    await page.wait_for_url(f"{base}/console/")


async def test_operator_finds_a_dead_letter_fixes_the_receiver_and_replays_it(
    gateway: Any, worker: Any, receiver: Receiver, browser: Any, shots: Screenshots
) -> None:
    from playwright.async_api import expect

    base = str(gateway.make_url("")).rstrip("/")
    # Given a tenant whose bills go to a receiver that fails, and a healthy one for the rest
    tenant, source = await tenant_with_source(gateway, "Acme Books")
    receiver.on("/bills", status(500, text="ledger database unavailable"))
    bills = await add_target(
        gateway,
        tenant,
        receiver.url("/bills"),
        description="Paid bills to the ledger",
        filter={"objectType": ["Bill"], "action": ["paid"]},
    )
    await add_target(gateway, tenant, receiver.url("/audit"), description="Audit log")
    # and customers go to a CRM that is not listening at all (connection refused)
    await add_target(
        gateway,
        tenant,
        "http://127.0.0.1:9/crm/webhooks",
        description="CRM",
        filter={"objectType": ["Customer"]},
    )
    await ingest(
        gateway, source, uuid="cust-1", objectType="Customer", action="updated", objectId=7
    )
    event_id = await ingest(
        gateway,
        source,
        uuid="6b1f6f2e-0c1d-4c55-9d1e-6f1c1a2b3c4d",
        date="2026-11-28T12:00:00Z",
        objectType="Bill",
        action="paid",
        objectId=4711,
        tenantId=42,
    )
    for n in range(3):
        await ingest(gateway, source, uuid=f"inv-{n}", objectType="Invoice", action="created")
    event = await (await gateway.get(f"/v1/events/{event_id}", headers=tenant.auth)).json()
    [delivery_id] = [d["id"] for d in event["deliveries"] if d["target_id"] == bills]

    async def dead() -> bool:
        resp = await gateway.get("/v1/dead-letters", headers=tenant.auth)
        return len((await resp.json())["data"]) == 2

    await eventually(dead, timeout=30)

    context = await browser.new_context(viewport=DESKTOP, timezone_id="Europe/Berlin")
    page = await context.new_page()
    try:
        # When the operator signs in, the overview counts the dead letter
        await sign_in(page, base, ADMIN_TOKEN)
        await expect(page.locator(".tile-bad .tile-value")).to_have_text("2")
        await expect(page.locator("svg.chart")).to_be_visible()
        await shots.take(page, "story-01-overview")
        await page.set_viewport_size(PHONE)
        await shots.take(page, "story-01-overview-phone")
        await page.set_viewport_size(DESKTOP)

        # and the dead-letter page lists it, with its last status
        await page.click("nav >> text=Dead letters")
        row = page.locator("tr", has=page.locator(f"a:has-text('{delivery_id}')"))
        await expect(row).to_contain_text("500")
        await expect(row).to_contain_text("Acme Books")
        crm = page.locator("tr", has_text="127.0.0.1:9/crm/webhooks")
        await expect(crm).to_contain_text("connection")
        # times are the viewer's (Berlin), UTC on hover
        died = row.locator("time")
        assert "UTC" not in (await died.inner_text())
        assert (await died.get_attribute("title") or "").endswith("UTC")
        await shots.take(page, "story-02-dead-letters")
        await page.set_viewport_size(PHONE)
        await shots.take(page, "story-03-dead-letters-phone")
        # on a phone each id stays on one line, and each row's checkbox comes before it
        for i in range(await page.locator("table.stack a.id").count()):
            link = page.locator("table.stack a.id").nth(i)
            box = await link.bounding_box()
            line = await link.evaluate("e => parseFloat(getComputedStyle(e).lineHeight) || 20")
            assert box is not None and box["height"] < 1.5 * line, (await link.inner_text(), box)
            pick = page.locator("table.stack td.pick input").nth(i)
            pick_box = await pick.bounding_box()
            assert pick_box is not None and pick_box["y"] + pick_box["height"] <= box["y"] + 1
        await page.set_viewport_size(DESKTOP)

        # Its story: three attempts, each a 500 with the receiver's answer
        await row.locator(f"a:has-text('{delivery_id}')").click()
        await expect(page.locator(".attempt")).to_have_count(3)
        for i in range(3):
            await expect(page.locator(".attempt").nth(i)).to_contain_text("status 500")
        await page.locator(".attempt summary").first.click()
        await expect(page.locator(".attempt pre").first).to_have_text("ledger database unavailable")
        await expect(page.locator("#payload")).to_contain_text('"objectId": 4711')
        await expect(page.locator("table.kv")).to_contain_text(f"{event_id}.<webhook-timestamp>")
        await shots.take(page, "story-04-delivery-dead")

        # When the receiver is fixed and the operator replays from the page
        receiver.on("/bills", status(200, text="booked"))
        await page.click("button:has-text('Replay this dead letter')")
        await expect(page.locator("h1")).to_have_text("Replay 1 dead letter?")
        await shots.take(page, "story-05-confirm-replay")
        await page.click("button:has-text('Replay 1')")

        # Then the page follows it until it succeeds
        await expect(page.locator(".status-card .badge")).to_contain_text(
            "succeeded", timeout=20_000
        )
        await expect(page.locator(".attempt").last).to_contain_text("status 200")
        await shots.take(page, "story-06-delivery-succeeded")
        assert [r.path for r in receiver.at("/bills")] == ["/bills"] * 4

        # The other pages, for a person to look at
        await page.click("nav >> text=Targets")
        # an operator first sees every tenant's targets, the failing ones first
        across = page.locator("table.across tbody tr")
        await expect(across).to_have_count(3)
        await expect(across.first).to_contain_text("Acme Books")
        await expect(across.first).to_contain_text("127.0.0.1:9/crm/webhooks")
        await shots.take(page, "story-07-targets-every-tenant")
        await page.click("a:has-text('circuit open')")
        await expect(page.locator("strong[aria-current]")).to_have_text("circuit open")
        await page.click("table.across tbody tr >> nth=0 >> a:has-text('Acme Books')")
        await expect(page.locator(".target-card")).to_have_count(3)
        await shots.take(page, "story-07-targets")
        await page.click(f"a:has-text('{receiver.url('/bills')}')")
        await expect(page.locator("h2:has-text('Health, last hour')")).to_be_visible()
        await shots.take(page, "story-08-target")
        # a test event, followed on its delivery's page until it arrives
        await page.click("button:has-text('Send a test event')")
        await expect(page.locator(".flash")).to_contain_text("Test event sent")
        await expect(page.locator(".status-card .badge")).to_contain_text(
            "succeeded", timeout=20_000
        )
        await expect(page.locator("#payload")).to_contain_text('"objectType": "Test"')
        await shots.take(page, "story-08-test-event-arrived")
        assert len(receiver.at("/bills")) == 5
        await page.click("nav >> text=Events")
        await page.fill("input[name=object_id]", "4711")
        await page.click("button:has-text('Search')")
        await expect(page.locator("tbody tr")).to_have_count(1)
        await shots.take(page, "story-09-events")
        await page.click(f"a:has-text('{event_id}')")
        await expect(page.locator("tbody tr")).to_have_count(2)
        await shots.take(page, "story-10-event")

        # Sign-out ends the session: the pages send to sign in again
        await page.click("button:has-text('Sign out')")
        await expect(page.locator(".notice")).to_have_text("You are signed out.")
        await page.goto(f"{base}/console/deliveries/{delivery_id}")
        assert "/console/login" in page.url
        await shots.take(page, "story-11-signed-out")
    finally:
        await context.close()


async def test_a_tenant_cannot_reach_another_tenants_delivery_even_without_javascript(
    gateway: Any, browser: Any, shots: Screenshots
) -> None:
    from playwright.async_api import expect

    base = str(gateway.make_url("")).rstrip("/")
    tenant_a, _ = await tenant_with_source(gateway, "Tenant A")
    tenant_b, source_b = await tenant_with_source(gateway, "Tenant B")
    await add_target(gateway, tenant_b, "http://127.0.0.1:9/b")
    event_id = await ingest(gateway, source_b, uuid="b-1", objectType="Bill", action="paid")
    event = await (await gateway.get(f"/v1/events/{event_id}", headers=tenant_b.auth)).json()
    [delivery] = event["deliveries"]

    # plain HTML: sign-in is a form post and pages read without any script
    context = await browser.new_context(viewport=DESKTOP, java_script_enabled=False)
    page = await context.new_page()
    try:
        await sign_in(page, base, tenant_a.api_key)
        await expect(page.locator(".role-tenant")).to_have_text("Tenant A")
        # without script, times read in UTC
        for path in (f"/console/deliveries/{delivery['id']}", f"/console/events/{event_id}"):
            resp = await page.goto(base + path)
            assert resp is not None and resp.status == 404
            await expect(page.locator("h1")).to_have_text("Not found")
            await expect(page.locator("main")).not_to_contain_text("Tenant B")
            # the tenant is still signed in, and can sign out from here
            await expect(page.locator("header button:has-text('Sign out')")).to_be_visible()
        await shots.take(page, "isolation-01-other-tenants-delivery-404")
        await page.goto(f"{base}/console/events")
        await expect(page.locator(".empty h2")).to_have_text("No events yet")
        await shots.take(page, "isolation-02-events-empty-no-js")
    finally:
        await context.close()


async def test_a_form_posted_without_its_csrf_token_is_refused(
    gateway: Any, browser: Any, shots: Screenshots
) -> None:
    from playwright.async_api import expect

    base = str(gateway.make_url("")).rstrip("/")
    tenant, _ = await tenant_with_source(gateway, "Acme Books")
    target_id = await add_target(gateway, tenant, "http://127.0.0.1:9/hooks")
    context = await browser.new_context(viewport=DESKTOP)
    page = await context.new_page()
    try:
        await sign_in(page, base, tenant.api_key)
        await page.goto(f"{base}/console/targets/{target_id}")
        form = page.locator(f"form[action='/console/targets/{target_id}/disable']")
        # a forged form: the same post without the token
        await form.locator("input[name=csrf_token]").evaluate("input => input.remove()")
        await form.locator("button").click()
        await expect(page.locator("h1")).to_have_text("Refused")
        await expect(page.locator("main")).to_contain_text("did not come from this console")
        await shots.take(page, "csrf-01-refused")
        target = await (await gateway.get(f"/v1/targets/{target_id}", headers=tenant.auth)).json()
        assert target["enabled"] is True
        # the real form still works
        await page.goto(f"{base}/console/targets/{target_id}")
        await page.click("button:has-text('Disable')")
        await expect(page.locator(".flash")).to_contain_text("Disabled")
        target = await (await gateway.get(f"/v1/targets/{target_id}", headers=tenant.auth)).json()
        assert target["enabled"] is False
    finally:
        await context.close()


async def test_a_held_delivery_says_what_holds_it(
    gateway: Any, browser: Any, shots: Screenshots, database_url: str
) -> None:
    import asyncpg
    from playwright.async_api import expect

    # Given a due delivery whose target's breaker is open for ten more minutes
    base = str(gateway.make_url("")).rstrip("/")
    tenant, source = await tenant_with_source(gateway, "Held Books")
    target_id = await add_target(gateway, tenant, "http://127.0.0.1:9/held")
    event_id = await ingest(gateway, source, uuid="held-1", objectType="Bill", action="paid")
    event = await (await gateway.get(f"/v1/events/{event_id}", headers=tenant.auth)).json()
    [delivery] = event["deliveries"]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO target_health (target_id, breaker, consecutive_failures, opened_count,"
            " reason, open_until, changed_at)"
            " VALUES ($1, 'open', 5, 1, 'HTTP 503 five times in a row',"
            " now() + interval '10 minutes', now())",
            target_id,
        )
    finally:
        await conn.close()
    context = await browser.new_context(viewport=DESKTOP, timezone_id="Europe/Berlin")
    page = await context.new_page()
    try:
        # When the tenant opens the delivery's page
        await sign_in(page, base, tenant.api_key)
        await page.goto(f"{base}/console/deliveries/{delivery['id']}")
        # Then it says what holds it and until when, not that it goes within seconds
        held = page.locator("p.held")
        await expect(held).to_contain_text("circuit breaker is open until")
        await expect(page.locator("main")).not_to_contain_text("within seconds")
        await shots.take(page, "held-01-delivery-behind-open-breaker")
        # and the overview says why the due backlog does not move
        await page.goto(f"{base}/console/")
        await expect(page.locator(".held")).to_contain_text("1 held by 1 open breaker")
        await shots.take(page, "held-02-overview")
    finally:
        await context.close()
