"""`relay dev` end to end on a bare machine: embedded services, a delivery, a clean stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import standardwebhooks

from tests.stack import Receiver, eventually

pytest.importorskip("pgserver")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in args and state != "Z":
            found.append(args)
    return found


async def test_relay_dev_delivers_a_signed_event_and_stops_cleanly(
    receiver: Receiver, tmp_path: Path
) -> None:
    port = _free_port()
    data_dir = tmp_path / "relay-data"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "RELAY_DATA_DIR": str(data_dir),
        "RELAY_WORKER_METRICS_PORT": "0",
    }  # no DATABASE_URL, no REDIS_URL
    log = (tmp_path / "dev.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "dev", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                try:
                    async with http.get(f"{base}/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(up, timeout=90, every=0.5)
            token = json.loads((data_dir / "dev-secrets.json").read_text())["RELAY_ADMIN_TOKEN"]
            admin = {"Authorization": f"Bearer {token}"}
            async with http.post(f"{base}/v1/tenants", json={"name": "Dev"}, headers=admin) as r:
                assert r.status == 201
                key = {"Authorization": f"Bearer {(await r.json())['api_key']}"}
            async with http.post(
                f"{base}/v1/sources", json={"name": "sl", "auth": {"type": "token"}}, headers=key
            ) as r:
                source = await r.json()
            assert source["ingest_url"] == f"{base}/in/{source['id']}"
            async with http.post(
                f"{base}/v1/targets", json={"url": receiver.url("/dev")}, headers=key
            ) as r:
                target = await r.json()
            async with http.post(
                f"{source['ingest_url']}?token={source['secret']}",
                json={"uuid": "dev-1", "objectType": "Bill", "action": "paid"},
            ) as r:
                assert r.status == 202
                [event_id] = (await r.json())["event_ids"]
            await eventually(lambda: asyncio.sleep(0, result=receiver.at("/dev")), timeout=30)
            [got] = receiver.at("/dev")
            standardwebhooks.Webhook(target["secret"]).verify(got.body, got.headers)
            assert got.headers["webhook-id"] == event_id
    finally:
        # Ctrl-C
        proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(proc.wait, 60)
        log.close()
    output = (tmp_path / "dev.log").read_text(errors="replace")
    assert code == 0, output[-3000:]
    # every process it started goes away (a deadline, not a pause)
    await eventually(
        lambda: asyncio.sleep(0, result=_processes_mentioning(str(data_dir)) == []), timeout=15
    )
    assert (data_dir / "postgres").is_dir() and (data_dir / "redis").is_dir()
