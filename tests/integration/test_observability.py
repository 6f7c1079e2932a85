"""Metrics move when work is done; readiness fails with a dependency and recovers by itself."""

from __future__ import annotations

import re
import socket
from typing import Any

import aiohttp

from relay.core.config import Settings
from relay.web.app import create_app
from tests.conftest import make_tenant, stack_env
from tests.integration.test_ingest import make_source, make_target, post_token
from tests.stack import Receiver, TcpProxy, WorkerProcess, eventually, fetch


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", line)
        if match is None:
            continue
        got = ",".join(sorted((match.group(1) or "").split(","))) if match.group(1) else ""
        if not labels or all(f'{k}="{v}"' in got for k, v in labels.items()) or got == wanted:
            total += float(match.group(2))
    return total


async def test_gateway_metrics_count_ingest(client: Any, tenant: Any) -> None:
    source = await make_source(client, tenant)
    before = await (await client.get("/metrics")).text()
    for i in range(3):
        assert (await post_token(client, source, {"uuid": f"m-{i}"})).status == 202
    assert (await post_token(client, source, [{"a": 1}, {"b": 2}])).status == 202
    await client.post(f"/in/{source['id']}?token=wrong", json={})
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type.startswith("text/plain")
    after = await resp.text()
    assert (
        metric(after, "relay_events_ingested_total", outcome="accepted")
        - metric(before, "relay_events_ingested_total", outcome="accepted")
        == 5
    )
    assert metric(after, "relay_events_ingested_total", outcome="401") >= 1
    assert (
        metric(after, "relay_ingest_duration_seconds_count")
        - metric(before, "relay_ingest_duration_seconds_count")
        == 5
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_worker_metrics_count_deliveries_and_sweeps(
    gateway: Any, receiver: Receiver, database_url: str, clean_redis: str, tmp_path: Any
) -> None:
    port = _free_port()
    worker = WorkerProcess(
        stack_env(database_url, clean_redis, RELAY_WORKER_METRICS_PORT=str(port)),
        tmp_path / "w.log",
        processes=2,
    ).start()
    try:
        tenant = await make_tenant(gateway)
        source = await make_source(gateway, tenant)
        await make_target(gateway, tenant, url=receiver.url("/m"))
        ids = (
            await (
                await post_token(gateway, source, [{"uuid": f"w-{i}"} for i in range(10)])
            ).json()
        )["event_ids"]

        async def delivered() -> bool:
            rows = await fetch(
                database_url,
                "SELECT count(*) AS n FROM deliveries "
                "WHERE event_id = ANY($1) AND status = 'succeeded'",
                ids,
            )
            return bool(rows[0]["n"] == 10)

        await eventually(delivered)

        async def scraped() -> str | None:
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{port}/metrics") as resp,
                ):
                    text = await resp.text()
            except aiohttp.ClientError:
                return None
            # both processes' counts are aggregated
            ok = metric(text, "relay_deliveries_total", outcome="succeeded") >= 10
            return text if ok and metric(text, "relay_sweeper_runs_total") > 0 else None

        text = await eventually(scraped, timeout=20)
        assert metric(text, "relay_attempt_duration_seconds_count", status_class="2xx") >= 10
    finally:
        worker.stop()


async def test_readiness_follows_postgres_and_reports_redis(
    aiohttp_client: Any, settings: Settings
) -> None:
    # Works on the machine's services and on the embedded ones (Postgres on a Unix socket).
    pg_proxy, pg_url = await TcpProxy.in_front_of(settings.database_url, 5432)
    rd_proxy, rd_url = await TcpProxy.in_front_of(settings.redis_url, 6379)
    try:
        app = create_app(
            settings.with_overrides(database_url=pg_url, redis_url=rd_url, broker_url=rd_url)
        )
        client = await aiohttp_client(app)

        async def checks() -> tuple[int, dict[str, str]]:
            resp = await client.get("/readyz")
            body = await resp.json()
            found = body["checks"] if resp.status == 200 else body["error"]["details"]["checks"]
            return resp.status, found

        assert await checks() == (200, {"postgres": "ok", "redis": "ok", "broker": "ok"})
        # When Redis goes away, ingest still commits: ready, with the broker's state in the body
        await rd_proxy.cut()
        assert await checks() == (
            200,
            {"postgres": "ok", "redis": "unreachable", "broker": "unreachable"},
        )
        # When Postgres goes away too, not ready
        await pg_proxy.cut()
        assert await checks() == (
            503,
            {"postgres": "unreachable", "redis": "unreachable", "broker": "unreachable"},
        )
        # Postgres alone back (same port): ready again without a restart
        await pg_proxy.start()

        async def ready_without_redis() -> bool:
            return await checks() == (
                200,
                {"postgres": "ok", "redis": "unreachable", "broker": "unreachable"},
            )

        await eventually(ready_without_redis, timeout=20, every=0.5)
        # And Redis back: all ok
        await rd_proxy.start()

        async def all_ok() -> bool:
            return await checks() == (200, {"postgres": "ok", "redis": "ok", "broker": "ok"})

        await eventually(all_ok, timeout=20, every=0.5)
    finally:
        await pg_proxy.cut()
        await rd_proxy.cut()
