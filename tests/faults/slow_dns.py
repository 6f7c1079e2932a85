"""A name server on loopback with a slow zone, for a worker that resolves through it.

The noisy-neighbour scenario's slow DNS (issue 21): a tenant points its targets at
names in a zone whose server takes SLOW_S to answer, while another tenant's target
is in a zone answered at once. The worker runs in a mount namespace of its own
(``unshare --mount``) where /etc/resolv.conf names this server, so the relay's real
resolver (glibc's ``getaddrinfo`` in its lookup threads) is what is slowed: no stub
in the relay. Both zones resolve to 127.0.0.1.

Making a mount namespace and listening on port 53 need root (CI runs as root);
:func:`slow_dns` yields None where they cannot be had, and the scenario then runs
without this one noise and says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnslib import QTYPE, RCODE, RR, A, DNSLabel
from dnslib.server import BaseResolver, DNSLogger, DNSServer

ADDRESS = "127.0.0.53"
SLOW_ZONE = "slow.test"
FAST_ZONE = "fast.test"
#: How long the slow zone's server takes to answer: past the relay's lookup timeout
#: (RELAY_DNS_TIMEOUT_S, 2 s), and long enough to hold a lookup thread that long.
SLOW_S = 6.0


@dataclass
class Zones(BaseResolver):  # type: ignore[misc]
    """Answers A queries in the two zones with 127.0.0.1 (the slow one after SLOW_S),
    AAAA queries there with no address, anything else with NXDOMAIN."""

    slow_queries: int = 0
    fast_queries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = request.q.qname
        if name.matchSuffix(DNSLabel(SLOW_ZONE)):
            with self._lock:
                self.slow_queries += 1
            time.sleep(SLOW_S)
        elif name.matchSuffix(DNSLabel(FAST_ZONE)):
            with self._lock:
                self.fast_queries += 1
        else:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if request.q.qtype == QTYPE.A:
            reply.add_answer(RR(name, QTYPE.A, rdata=A("127.0.0.1"), ttl=60))
        return reply


@dataclass
class SlowDns:
    """The running server, and the command prefix that runs a process resolving with it."""

    zones: Zones
    prefix: list[str]


def _can_isolate() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True, timeout=10, check=False
    )
    return probe.returncode == 0


@contextlib.contextmanager
def slow_dns(scratch: Path) -> Iterator[SlowDns | None]:
    """The server on ADDRESS:53 while in the block, or None where it cannot run."""
    if not _can_isolate():
        yield None
        return
    zones = Zones()
    try:
        server = DNSServer(zones, address=ADDRESS, port=53, logger=DNSLogger(logf=lambda _: None))
        server.start_thread()
    except OSError:  # port 53 taken, or loopback without 127.0.0.53
        yield None
        return
    resolv = scratch / "resolv.conf"
    resolv.write_text(f"nameserver {ADDRESS}\n")
    prefix = [
        "unshare",
        "--mount",
        "sh",
        "-c",
        'mount --bind "$0" /etc/resolv.conf && exec "$@"',
        str(resolv),
    ]
    try:
        yield SlowDns(zones, prefix)
    finally:
        server.stop()
        server.server.server_close()
