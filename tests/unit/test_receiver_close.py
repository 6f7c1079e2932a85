"""The tests' recording receiver closes without leaking a socket (tests/stack.py).

A peer stopped while the event loop was not running (a fixture's synchronous
teardown) leaves connections in the receiver's listen backlog. CPython 3.11 leaks
the socket of a connection accepted just as its server closes: the transport
fails in ``Server._attach`` and never closes it. The garbage collector then finds
an "unclosed transport" during some later test, which fails that test (CI failed
``test_noisy_neighbour`` and ``test_sweeper_supervision`` so).
"""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings

import pytest

from tests.stack import Receiver


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
async def test_a_receiver_closed_while_connections_arrive_leaves_no_socket(turns: int) -> None:
    receiver = await Receiver().start()
    assert receiver.server is not None
    # Given 50 connections made and dropped while the loop did not run
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", receiver.server.port)) as peer:
            peer.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    # When the receiver closes some turns after the loop sees them
    # (two turns is when the accepted connections' transports are not made yet)
    for _ in range(turns):
        await asyncio.sleep(0)
    await receiver.close()
    # Then nothing it accepted is left for the garbage collector to find open
    await asyncio.sleep(0.1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    assert [str(w.message) for w in seen if w.category is ResourceWarning] == []
