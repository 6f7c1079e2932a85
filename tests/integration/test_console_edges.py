"""The console at the edges of what people type: a page that says what is wrong, never a 500.

Times at the ends of the calendar with the viewer's zone offset (``tz``) once
overflowed in ``forms.moment``; a ``next=`` holding a control character was put
into a ``Location`` header that aiohttp refused to send, dropping the connection.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.conftest import ADMIN_TOKEN, Tenant
from tests.integration.test_console import csrf_of, sign_in, tenant_objects


def no_trace(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]


@pytest.mark.parametrize(
    ("path", "words"),
    [
        (
            "/console/dead-letters?since=0001-01-01%2000:00&tz=840",
            "From is out of range once in UTC",
        ),
        ("/console/dead-letters?until=9999-12-31T23:59&tz=-1", "Until is out of range once in UTC"),
        ("/console/events?until=9999-12-31T23:59&tz=-1", "Until is out of range once in UTC"),
        ("/console/events?since=0001-01-01T00:00&tz=840", "From is out of range once in UTC"),
        ("/console/events?since=0001-01-01T00:00:00%2B14:00", "From is out of range once in UTC"),
    ],
)
async def test_a_time_out_of_range_in_the_viewers_zone_is_a_422_page(
    client: Any, tenant: Tenant, caplog: pytest.LogCaptureFixture, path: str, words: str
) -> None:
    await sign_in(client, ADMIN_TOKEN)
    caplog.set_level(logging.DEBUG)
    resp = await client.get(path, allow_redirects=False)
    text = await resp.text()
    assert resp.status == 422, text[:2000]
    assert resp.content_type == "text/html"
    assert words in text
    no_trace(caplog)


async def test_a_purge_before_a_time_out_of_range_says_so(
    client: Any, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    await sign_in(client, ADMIN_TOKEN)
    csrf = await csrf_of(client, "/console/dead-letters")
    caplog.set_level(logging.DEBUG)
    for older_than, tz in (("0001-01-01 00:00", "840"), ("9999-12-31 23:59", "-1")):
        resp = await client.post(
            "/console/dead-letters/purge",
            data={"csrf_token": csrf, "older_than": older_than, "tz": tz},
            allow_redirects=False,
        )
        # as for every bad field of a console form: back to the list, the problem shown there
        assert resp.status == 303, (await resp.text())[:2000]
        page = await client.get(resp.headers["Location"], allow_redirects=False)
        assert "Made before is out of range once in UTC" in await page.text()
    no_trace(caplog)


CONTROLS = ["\r", "\n", "\x7f", "\x0b", "\t", "\x85", "\x00"]


@pytest.mark.parametrize("control", CONTROLS, ids=[f"{ord(c):#04x}" for c in CONTROLS])
async def test_a_next_with_a_control_character_gets_a_safe_redirect(
    client: Any, tenant: Tenant, caplog: pytest.LogCaptureFixture, control: str
) -> None:
    caplog.set_level(logging.DEBUG)
    evil = f"/console/events{control}Set-Cookie: x=1"
    csrf = await csrf_of(client, "/console/login")
    resp = await client.post(
        "/console/login",
        data={"token": ADMIN_TOKEN, "csrf_token": csrf, "next": evil},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == "/console/"
    assert "x" not in resp.cookies
    # signed in: the sign-in page sends the viewer on, to a safe place too
    resp = await client.get("/console/login", params={"next": evil}, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/console/"
    no_trace(caplog)


async def test_a_next_within_the_console_is_still_followed(client: Any, tenant: Tenant) -> None:
    await tenant_objects(client, tenant)
    csrf = await csrf_of(client, "/console/login")
    resp = await client.post(
        "/console/login",
        data={"token": ADMIN_TOKEN, "csrf_token": csrf, "next": "/console/events?object_type=Bill"},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/console/events?object_type=Bill"
