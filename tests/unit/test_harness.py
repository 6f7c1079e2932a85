"""The test harness itself: a failing test must not break the next one."""

from __future__ import annotations

import gc
import warnings
from typing import Any

from aiohttp import web


async def test_an_app_that_fails_to_start_leaves_no_open_session(aiohttp_client: Any) -> None:
    # pytest-aiohttp's factory leaks the client's session when the app's startup
    # raises; under filterwarnings=error that surfaced as the NEXT test's error.
    async def fail(app: web.Application) -> None:
        raise RuntimeError("startup failed")

    app = web.Application()
    app.on_startup.append(fail)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            await aiohttp_client(app)
        except RuntimeError:
            pass
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []
