"""Operational events in a real browser: the overview and a target's page say what happened.

A real gateway, `relay worker` and receiver: one target answers 410 (disabled,
its delivery dead), another fails every attempt (its delivery dies after the
schedule). The tenant's operational target receives those events as signed
webhooks, and the tenant, signed in with its API key, reads them on the
overview and on the target's page; another tenant's never show.
"""

from __future__ import annotations

from typing import Any

import pytest
import standardwebhooks

from tests.browser.conftest import Screenshots
from tests.browser.test_console_browser import (
    DESKTOP,
    PHONE,
    add_target,
    ingest,
    sign_in,
    tenant_with_source,
)
from tests.stack import Receiver, eventually, status

pytestmark = pytest.mark.slow


async def test_a_tenant_reads_its_operational_events_on_the_overview_and_the_targets_page(
    gateway: Any, worker: Any, receiver: Receiver, browser: Any, shots: Screenshots
) -> None:
    from playwright.async_api import expect

    base = str(gateway.make_url("")).rstrip("/")
    # Given a tenant with an operational target, a receiver that is gone and one that fails
    tenant, source = await tenant_with_source(gateway, "Acme Books")
    resp = await gateway.post(
        "/v1/targets",
        json={"url": receiver.url("/ops"), "kind": "operational", "description": "On-call"},
        headers=tenant.auth,
    )
    assert resp.status == 201
    ops = await resp.json()
    gone = await add_target(
        gateway, tenant, receiver.on("/gone", status(410)), description="Old ERP"
    )
    await add_target(
        gateway,
        tenant,
        receiver.on("/ledger", status(500, text="ledger database unavailable")),
        description="Ledger",
        filter={"objectType": ["Bill"]},
    )
    # and another tenant whose target dies too
    other, other_source = await tenant_with_source(gateway, "Globex")
    other_gone = await add_target(gateway, other, receiver.on("/globex", status(410)))
    await ingest(gateway, other_source, uuid="g-1", objectType="Bill", action="paid")
    # When a bill is paid
    await ingest(gateway, source, uuid="bill-1", objectType="Bill", action="paid", objectId=4711)

    async def told() -> list[dict[str, Any]]:
        bodies = [
            standardwebhooks.Webhook(ops["secret"]).verify(r.body, r.headers)
            for r in receiver.at("/ops")
        ]
        dead = [b for b in bodies if b["action"] == "dead"]
        return bodies if len(dead) == 2 else []

    bodies = await eventually(told, timeout=30)
    assert {(b["objectType"], b["action"]) for b in bodies} == {
        ("Target", "disabled"),
        ("Delivery", "dead"),
    }

    context = await browser.new_context(viewport=DESKTOP, timezone_id="Europe/Berlin")
    page = await context.new_page()
    try:
        # Then the tenant's overview lists them, newest first, and nothing of Globex
        await sign_in(page, base, tenant.api_key)
        section = page.locator("#operational-events")
        await expect(section).to_be_visible()
        rows = section.locator("tbody tr")
        await expect(rows).to_have_count(3)
        await expect(section).to_contain_text("Target disabled")
        await expect(section).to_contain_text("disabled: the target answered 410 Gone")
        await expect(section).to_contain_text("dead after 3 attempts (HTTP 500)")
        await expect(section).not_to_contain_text(other_gone)
        await section.scroll_into_view_if_needed()
        await shots.take(page, "operational-01-overview")
        await page.set_viewport_size(PHONE)
        await shots.take(page, "operational-01-overview-phone")
        await page.set_viewport_size(DESKTOP)

        # and the disabled target's page shows what was said about it
        await section.locator(f"a:has-text('{gone}')").first.click()
        await page.wait_for_url(f"{base}/console/targets/{gone}")
        own = page.locator("#operational-events")
        await expect(own.locator("tbody tr")).to_have_count(2)
        await expect(own).to_contain_text("Target disabled")
        await expect(own).to_contain_text("Delivery dead")
        await expect(own).not_to_contain_text("HTTP 500")
        await shots.take(page, "operational-02-target")

        # and the operational target's own page says what it is, with nothing about itself
        await page.goto(f"{base}/console/targets/{ops['id']}")
        await expect(page.locator("dl.facts").nth(1)).to_contain_text("operational: receives")
        await expect(page.locator("#operational-events")).to_contain_text("no loops")
        await shots.take(page, "operational-03-operational-target")
    finally:
        await context.close()
