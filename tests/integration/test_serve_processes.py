"""`relay serve --processes N`: N gateways on one port, stopped together on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ADMIN_TOKEN, stack_env
from tests.services import GatewayProcess
from tests.stack import fetch


def children_of(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def listens_on(pid: int, port: int) -> bool:
    """True when ``pid`` holds a listening TCP socket on ``port`` (its own, not inherited)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                return True
    return False


async def wait_for(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_processes_share_the_port_serve_and_stop_together(
    database_url: str, clean_redis: str, tmp_path: Path
) -> None:
    # Given `relay serve --processes 2`
    gateway = GatewayProcess(
        stack_env(database_url, clean_redis), tmp_path / "serve.log", processes=2
    ).start()
    assert gateway.proc is not None
    try:
        parent = gateway.proc.pid
        # Then two gateway processes run, each listening on the one port
        await wait_for(lambda: len(children_of(parent)) == 2)
        children = children_of(parent)
        await wait_for(lambda: all(listens_on(pid, gateway.port) for pid in children))
        assert not listens_on(parent, gateway.port)

        # And through them a tenant is made and its events are committed
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession(gateway.url) as http:
            async with http.post("/v1/tenants", json={"name": "multi"}, headers=headers) as r:
                assert r.status == 201, await r.text()
                tenant = await r.json()
            auth = {"Authorization": f"Bearer {tenant['api_key']}"}
            body = {"name": "s", "auth": {"type": "token"}}
            async with http.post("/v1/sources", json=body, headers=auth) as r:
                assert r.status == 201, await r.text()
                source = await r.json()
            statuses = []
            for i in range(40):
                # a new connection each time: the kernel spreads them over the processes
                async with (
                    aiohttp.ClientSession(gateway.url) as one,
                    one.post(
                        f"/in/{source['id']}?token={source['secret']}",
                        json={"uuid": f"multi-{i}", "objectType": "Bill", "action": "paid"},
                    ) as r,
                ):
                    statuses.append(r.status)
        assert statuses == [202] * 40
        rows = await fetch(
            database_url, "SELECT count(*) AS n FROM events WHERE tenant_id = $1", tenant["id"]
        )
        assert rows[0]["n"] == 40

        # When the parent gets SIGTERM (as from Kubernetes or Docker)
        gateway.proc.send_signal(signal.SIGTERM)
        code = gateway.proc.wait(timeout=40)

        # Then it exits cleanly and no gateway process is left
        assert code == 0, gateway.log()[-3000:]
        assert not gateway.group_alive()
    finally:
        gateway.stop()
        if gateway.group_alive():
            os.killpg(parent, signal.SIGKILL)


async def test_a_gateway_process_that_dies_is_replaced(
    database_url: str, clean_redis: str, tmp_path: Path
) -> None:
    # Given `relay serve --processes 2`, past its start
    gateway = GatewayProcess(
        stack_env(database_url, clean_redis), tmp_path / "serve.log", processes=2
    ).start()
    assert gateway.proc is not None
    try:
        parent = gateway.proc.pid
        await wait_for(lambda: len(children_of(parent)) == 2)
        before = children_of(parent)
        await asyncio.sleep(10.5)  # relay.supervise.STARTUP_S: a death after it is a crash

        # When one gateway process is killed
        victim = min(before)
        os.kill(victim, signal.SIGKILL)

        # Then the parent starts another in its place, listening on the port
        await wait_for(lambda: len(children_of(parent) - {victim}) == 2)
        replacement = (children_of(parent) - before).pop()
        await wait_for(lambda: listens_on(replacement, gateway.port))
        assert "restarting it" in gateway.log()
    finally:
        assert gateway.stop() == 0
        assert not gateway.group_alive()


async def test_a_gateway_that_cannot_start_stops_the_others(
    database_url: str, clean_redis: str, tmp_path: Path
) -> None:
    # Given the port is taken by a socket without SO_REUSEPORT
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway = GatewayProcess(
            stack_env(database_url, clean_redis), tmp_path / "serve.log", processes=2, port=port
        )
        # When `relay serve --processes 2` starts on it
        super(GatewayProcess, gateway).start()
        assert gateway.proc is not None
        # Then it exits non-zero, leaving no process behind
        code = gateway.proc.wait(timeout=40)
        assert code != 0
        assert "while starting" in gateway.log()
        assert not gateway.group_alive()
