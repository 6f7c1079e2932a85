"""What the gateway uses of aiohttp's internals: present, checked at import and at start."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from packaging.requirements import Requirement
from packaging.version import Version

from relay.core.config import Settings
from relay.web.app_keys import SETTINGS
from relay.web.server import GatewayRunner, GatewayServer, check_aiohttp_internals

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_aiohttp_has_what_the_gateway_uses() -> None:
    check_aiohttp_internals()


def test_an_aiohttp_without_the_runner_hook_is_refused_at_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given an aiohttp whose AppRunner no longer has the hook the gateway overrides
    monkeypatch.delattr(web.AppRunner, "_make_server")
    # Then the check `relay.web.server` runs at import fails, naming it
    with pytest.raises(ImportError, match=r"AppRunner\._make_server"):
        check_aiohttp_internals()


def test_an_aiohttp_without_a_public_name_the_gateway_uses_is_refused_at_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(web.BaseRequest, "protocol")
    with pytest.raises(ImportError, match=r"BaseRequest\.protocol"):
        check_aiohttp_internals()


async def test_a_server_built_without_the_hook_fails_at_start() -> None:
    # Given a runner whose server is aiohttp's own, as when aiohttp stops calling the hook
    class Bypassed(GatewayRunner):
        async def _make_server(self) -> web.Server:
            return await web.AppRunner._make_server(self)

    app = web.Application()
    app[SETTINGS] = Settings.from_env({})
    runner = Bypassed(app)
    # Then setup fails loudly, instead of serving without the head deadline and the cap
    with pytest.raises(RuntimeError, match="head deadline and connection cap"):
        await runner.setup()


async def test_the_gateway_runner_serves_gateway_connections_with_its_options() -> None:
    app = web.Application()
    app[SETTINGS] = Settings.from_env({})
    runner = GatewayRunner(app, max_line_size=1000, shutdown_timeout=1)
    await runner.setup()
    try:
        server = runner.server
        assert isinstance(server, GatewayServer)
        connection: Any = server()
        assert connection.max_line_size == 1000
        assert connection.keepalive_timeout == 75
    finally:
        await runner.cleanup()


def test_aiohttp_is_pinned_below_its_next_minor_version() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (spec,) = [
        r for r in map(Requirement, pyproject["project"]["dependencies"]) if r.name == "aiohttp"
    ]
    installed = Version(aiohttp.__version__)
    assert installed in spec.specifier, (installed, spec)
    next_minor = Version(f"{installed.major}.{installed.minor + 1}")
    assert next_minor not in spec.specifier, f"{spec} allows aiohttp {next_minor}"
    assert Version("3.14") in spec.specifier  # the lower bound is kept


def test_an_aiohttp_whose_apps_cannot_choose_the_request_class_is_refused_at_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given an aiohttp whose Application._make_request no longer takes the request class
    def make_request(self: web.Application, *args: Any) -> web.Request:
        raise AssertionError("not called")

    monkeypatch.setattr(web.Application, "_make_request", make_request)
    # Then the check fails, naming it: requests would be inflated as they arrive
    with pytest.raises(ImportError, match=r"_make_request"):
        check_aiohttp_internals()
