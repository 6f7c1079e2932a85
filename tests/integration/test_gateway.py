"""The gateway itself: error shape for unknown routes and methods, health, OpenAPI."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from relay.core.config import Settings
from relay.web.app import create_app
from tests.conftest import OPERATOR, assert_error


async def test_unknown_route_is_404_json(client: Any) -> None:
    await assert_error(await client.get("/v1/nothing-here"), 404, "not_found")


async def test_wrong_method_is_405_json(client: Any) -> None:
    resp = await client.put("/v1/tenants", headers=OPERATOR)
    await assert_error(resp, 405, "method_not_allowed")
    assert "GET" in resp.headers["Allow"] and "POST" in resp.headers["Allow"]


async def test_body_over_the_limit_is_413(aiohttp_client: Any, settings: Settings) -> None:
    small = await aiohttp_client(create_app(settings.with_overrides(max_body_bytes=1024)))
    resp = await small.post(
        "/v1/tenants",
        data=b'{"name": "' + b"x" * 2000 + b'"}',
        headers={**OPERATOR, "Content-Type": "application/json"},
    )
    await assert_error(resp, 413, "payload_too_large")


async def test_unexpected_error_is_500_with_an_error_id_and_no_traceback(
    aiohttp_client: Any, settings: Settings, caplog: Any
) -> None:
    app = create_app(settings)

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    app.router.add_get("/boom", boom)
    test_client = await aiohttp_client(app)
    resp = await test_client.get("/boom")
    error = await assert_error(resp, 500, "internal_error")
    text = str(error)
    assert "secret internals" not in text and "Traceback" not in text
    error_id = error["details"]["error_id"]
    assert re.fullmatch(r"err_[0-9A-Z]{26}", error_id)
    assert any(error_id in r.getMessage() for r in caplog.records)


async def test_health_and_readiness(client: Any) -> None:
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["checks"] == {"postgres": "ok", "redis": "ok", "broker": "ok"}


async def test_readiness_stays_ready_when_redis_is_unreachable(
    aiohttp_client: Any, settings: Settings
) -> None:
    # Ingest keeps committing while Redis (rate limits and broker) is down: the
    # gateway stays in the load balancer and says what is down in the body.
    broken = await aiohttp_client(
        create_app(
            settings.with_overrides(
                redis_url="redis://127.0.0.1:1/0", broker_url="redis://127.0.0.1:1/0"
            )
        )
    )
    resp = await broken.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body["checks"] == {"postgres": "ok", "redis": "unreachable", "broker": "unreachable"}
    metrics = await (await broken.get("/metrics")).text()
    assert 'relay_dependency_up{dependency="broker"} 0.0' in metrics
    assert 'relay_dependency_up{dependency="postgres"} 1.0' in metrics


async def test_readiness_names_a_separate_broker(aiohttp_client: Any, settings: Settings) -> None:
    # the broker stays on the working Redis: only the rate-limit Redis is down
    broken = await aiohttp_client(
        create_app(settings.with_overrides(redis_url="redis://127.0.0.1:1/0"))
    )
    resp = await broken.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body["checks"] == {"postgres": "ok", "redis": "unreachable", "broker": "ok"}


async def test_openapi_describes_exactly_the_routes(client: Any) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    app = client.server.app
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method not in ("HEAD", "*")
    }
    assert documented == served
    # Every $ref resolves
    refs = set(re.findall(r'"\$ref": ?"#/components/schemas/([^"]+)"', await resp.text()))
    assert refs <= set(doc["components"]["schemas"])
    create_target = doc["paths"]["/v1/targets"]["post"]
    assert create_target["security"] == [{"tenantKey": []}]
    schema = doc["components"]["schemas"]["TargetCreate"]
    assert "url" in schema["required"]
