"""A portal link in a real browser, against a real gateway, `relay worker` and a failing target.

The story of a SaaS's customer: the SaaS mints a read-only link with its tenant
key and hands it over; the customer opens it, presses the button, and is in
the console as the tenant, with a header saying it is a portal session and
when it ends; the pages show the dead letter and no control; a post forged
anyway is refused; the link opened a second time is refused with a page.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import pytest

from tests.browser.conftest import Screenshots
from tests.browser.test_console_browser import (
    DESKTOP,
    PHONE,
    add_target,
    ingest,
    tenant_with_source,
)
from tests.stack import eventually

pytestmark = pytest.mark.slow


async def test_a_customer_opens_a_read_only_portal_link_once(
    gateway: Any, worker: Any, browser: Any, shots: Screenshots
) -> None:
    from playwright.async_api import expect

    base = str(gateway.make_url("")).rstrip("/")
    # Given a tenant whose CRM does not listen (its delivery dies) and a read-only link
    tenant, source = await tenant_with_source(gateway, "Acme Books")
    target_id = await add_target(
        gateway, tenant, "http://127.0.0.1:9/crm/webhooks", description="CRM"
    )
    await ingest(gateway, source, uuid="bill-1", objectType="Bill", action="paid", objectId=4711)

    async def dead() -> bool:
        resp = await gateway.get("/v1/dead-letters", headers=tenant.auth)
        return len((await resp.json())["data"]) == 1

    await eventually(dead, timeout=30)
    resp = await gateway.post(
        "/v1/portal-links", json={"read_only": True, "expires_in": 3600}, headers=tenant.auth
    )
    assert resp.status == 201
    link = base + urlparse((await resp.json())["url"]).path

    context = await browser.new_context(viewport=DESKTOP, timezone_id="Europe/Berlin")
    page = await context.new_page()
    try:
        # When the customer opens the link: a page says whose console, and a button opens it
        await page.goto(link)
        await expect(page.locator("h1")).to_have_text("Open the console as Acme Books")
        await expect(page.locator("main")).to_contain_text("read-only")
        await shots.take(page, "portal-01-open-the-console")
        await page.click("button:has-text('Open the console')")
        await page.wait_for_url(f"{base}/console/")

        # Then the header says it is a read-only portal session and when it ends
        badge = page.locator(".role-portal")
        await expect(badge).to_contain_text("Portal session")
        await expect(badge).to_contain_text("Read-only")
        ends = badge.locator("time")
        assert (await ends.get_attribute("title") or "").endswith("UTC")  # the viewer's zone shown
        await expect(page.locator(".role-tenant")).to_have_text("Acme Books")
        await expect(page.locator(".tile-bad .tile-value")).to_have_text("1")
        await shots.take(page, "portal-02-overview")
        await page.set_viewport_size(PHONE)
        await shots.take(page, "portal-02-overview-phone")
        await page.set_viewport_size(DESKTOP)

        # and the pages show the dead letter, with no control
        await page.click("nav >> text=Dead letters")
        await expect(page.locator("tbody tr")).to_have_count(1)
        await expect(page.locator("button:has-text('Replay')")).to_have_count(0)
        await shots.take(page, "portal-03-dead-letters-read-only")
        await page.goto(f"{base}/console/targets/{target_id}")
        await expect(page.locator("h2:has-text('Health, last hour')")).to_be_visible()
        for control in ("Send a test event", "Disable", "Rotate secret"):
            await expect(page.locator(f"button:has-text('{control}')")).to_have_count(0)
        await shots.take(page, "portal-04-target-read-only")

        # A post forged anyway, with the session's own CSRF token, is refused
        await page.evaluate(
            """target => {
                const token = document.querySelector("input[name=csrf_token]").value;
                const form = document.createElement("form");
                form.method = "post";
                form.action = `/console/targets/${target}/disable`;
                const field = document.createElement("input");
                field.type = "hidden"; field.name = "csrf_token"; field.value = token;
                form.appendChild(field);
                document.body.appendChild(form);
                form.submit();
            }""",
            target_id,
        )
        await expect(page.locator("h1")).to_have_text("Refused")
        await expect(page.locator("main")).to_contain_text("read-only portal session")
        await shots.take(page, "portal-05-forged-post-refused")
        target = await (await gateway.get(f"/v1/targets/{target_id}", headers=tenant.auth)).json()
        assert target["enabled"] is True
    finally:
        await context.close()

    # The link opened again, in another browser, is refused with a page that says so
    context = await browser.new_context(viewport=DESKTOP)
    page = await context.new_page()
    try:
        answer = await page.goto(link)
        assert answer is not None and answer.status == 410
        await expect(page.locator("h1")).to_have_text("Link already used")
        await expect(page.locator("button:has-text('Open the console')")).to_have_count(0)
        await shots.take(page, "portal-06-used-link-refused")
    finally:
        await context.close()
