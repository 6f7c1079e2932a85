"""`relay serve --processes N`: N gateway processes on one port, supervised.

Kept apart from the server (no aiohttp import), so the supervising process
stays small: it only starts, watches and stops its children.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

#: A gateway process that exits sooner than this after its start failed to start:
#: the others are stopped rather than restarted in a loop.
STARTUP_S = 10.0
#: How long SIGTERM'd gateway processes get to finish their requests.
STOP_TIMEOUT_S = 30.0


def supervise(
    argv: list[str], count: int, announce: Callable[[str], None], poll_s: float = 0.2
) -> int:
    """Run ``count`` copies of ``argv`` (gateways sharing a port); SIGTERM/SIGINT stops all.

    A copy that dies after it started is started again; one that dies while
    starting (a taken port, a bad configuration) stops the others, and its exit
    status is returned.
    """
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    children: list[tuple[subprocess.Popen[bytes], float]] = [
        (subprocess.Popen(argv), time.monotonic()) for _ in range(count)
    ]
    status = 0
    try:
        while not stopping:
            time.sleep(poll_s)
            for i, (child, started) in enumerate(children):
                code = child.poll()
                if code is None or stopping:
                    continue
                if time.monotonic() - started < STARTUP_S:
                    announce(f"relay: a gateway process exited with {code} while starting")
                    stopping, status = True, code or 1
                    break
                announce(f"relay: gateway process {child.pid} exited with {code}; restarting it")
                children[i] = (subprocess.Popen(argv), time.monotonic())
    finally:
        for child, _ in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child, _ in children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
