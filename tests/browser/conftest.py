"""Browser fixtures: Debian's Chromium driven by Playwright, and screenshots a person can look at.

No browser is downloaded: Playwright drives ``/usr/bin/chromium`` (``apt-get install -y
chromium``). Without it (or without the ``playwright`` package) the browser tests are
skipped with the reason, unless ``RELAY_REQUIRE_BROWSER=1`` (CI sets it): then they fail.

Every screenshot is saved under ``tests/browser/screenshots/`` (or ``RELAY_SCREENSHOT_DIR``)
and its path is printed at the end of the run, so CI's log says where to look.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("RELAY_CHROMIUM", "/usr/bin/chromium"))
#: What Chromium needs to run headless as root in a container, with no traffic of its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(os.environ.get("RELAY_SCREENSHOT_DIR") or Path(__file__).parent / "screenshots")
_saved: list[Path] = []


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: apt-get install -y chromium"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[dev]'"
    return None


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    """A headless Chromium for this module's tests."""
    reason = _missing()
    if reason is not None:
        if os.environ.get("RELAY_REQUIRE_BROWSER") == "1":
            pytest.fail(f"RELAY_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        await chromium.close()


class Screenshots:
    """Saves full-page screenshots, named by the test (``story-03-dead-letters.png``)."""

    def __init__(self) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    async def take(self, page: Any, name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        _saved.append(path)
        return path


@pytest.fixture
def shots() -> Screenshots:
    """Where a test saves what the browser shows."""
    return Screenshots()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Where the screenshots are, for a person to look at."""
    if _saved:
        terminalreporter.section("console screenshots")
        for path in _saved:
            terminalreporter.write_line(str(path.resolve()))
