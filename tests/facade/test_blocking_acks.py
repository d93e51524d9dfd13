"""recv() acknowledges what it hands out before it returns.

So a sender learns at once that the application has the message, whatever the
receiving application does next: even a process that ends right after recv(),
without close() and without giving a background thread a chance, has
acknowledged it. (Delaying the ACK to ride on the application's answer would
save a write per exchange, but a sender would then wait for the receiver's next
call, and a receiver that ended first would leave the sender unacknowledged.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from testutil import TIMEOUT_FACTOR

from korinet import client

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)

T = 20 * TIMEOUT_FACTOR  # generous waits for events

RECEIVE_ONE_AND_EXIT = """
import os, socket
from korinet import server
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
print(repr(server(conn).recv(timeout=%r)), flush=True)
os._exit(0)  # no close(), no atexit handler, no background thread
"""


def test_a_receiver_that_ends_right_after_recv_has_acknowledged_the_message() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", RECEIVE_ONE_AND_EXIT % T], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        cli = client("127.0.0.1", port, timeout=T)
        try:
            cli.send("one")  # returns on the ACK (raises KoriNetTimeout without it)
            assert child.stdout.readline().strip() == "'one'"
            assert child.wait(T) == 0
        finally:
            cli.close()
    finally:
        child.kill()
        child.wait(T)
