"""Real network faults between two network namespaces (docs: issue "reliability lab").

A KoriNet server and client run as separate processes on either side of a veth
pair; the kernel loses, rate-limits, black-holes and resets their packets. Every
scenario ends with 0 lost, 0 duplicated, 0 out of order, both ways.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR
from testutil.netns import SERVER_IP, NetnsPair, unavailable
from testutil.relay import Relay

PEER = Path(__file__).with_name("peer_proc.py")
REPO = Path(__file__).resolve().parents[2]
PORT = 7000
HEARTBEAT = 0.5
COUNT = 3000

_why = unavailable()
pytestmark = [
    pytest.mark.skipif(_why is not None, reason=f"no network namespaces here: {_why}"),
    pytest.mark.timeout(150 * TIMEOUT_FACTOR),
]


class Side:
    """A peer_proc.py process and its results file."""

    def __init__(self, argv: list[str], out: Path) -> None:
        self.out = out
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        ready = threading.Event()

        def wait_ready() -> None:
            assert self.proc.stdout is not None
            if self.proc.stdout.readline().strip() == "ready":
                ready.set()

        threading.Thread(target=wait_ready, daemon=True).start()
        if not ready.wait(20 * TIMEOUT_FACTOR):
            self.proc.kill()
            raise AssertionError(
                f"{argv[-6]} did not start: {self.proc.stderr.read() if self.proc.stderr else ''}"
            )

    def results(self, timeout: float) -> dict[str, Any]:
        """Wait until the side has written its final results."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.out.exists():
                data: dict[str, Any] = json.loads(self.out.read_text())
                if data.get("done"):
                    return data
            if self.proc.poll() not in (None, 0):
                break
            time.sleep(0.1)
        self.proc.kill()
        err = self.proc.stderr.read() if self.proc.stderr else ""
        partial = json.loads(self.out.read_text()) if self.out.exists() else {}
        raise AssertionError(
            f"{self.out.stem}: no final results; received {len(partial.get('got', []))} so far\n{err[-3000:]}"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


def side(prefix: tuple[str, ...], role: str, host: str, port: int, out: Path, count: int = COUNT) -> Side:
    argv = [*prefix, sys.executable, str(PEER), role, host, str(port), str(count), str(HEARTBEAT), str(out)]
    return Side(argv, out)


@pytest.fixture
def net() -> Iterator[NetnsPair]:
    with NetnsPair() as pair:
        yield pair


def run_pair(net: NetnsPair, tmp_path: Path, count: int = COUNT) -> tuple[Side, Side]:
    server = side(
        tuple(net.prefix(net.server_ns)), "server", SERVER_IP, PORT, tmp_path / "server.json", count
    )
    client = side(
        tuple(net.prefix(net.client_ns)), "client", SERVER_IP, PORT, tmp_path / "client.json", count
    )
    return server, client


def assert_exactly_once(
    server: Side, client: Side, count: int = COUNT, timeout: float = 90
) -> tuple[dict, dict]:
    try:
        c = client.results(timeout * TIMEOUT_FACTOR)
        s = server.results(10 * TIMEOUT_FACTOR)
    finally:
        client.stop()
        server.stop()
    for name, got in (("client", c["got"]), ("server", s["got"])):
        lost = count - len(set(got))
        duplicated = len(got) - len(set(got))
        assert got == list(range(count)), f"{name}: {lost} lost, {duplicated} duplicated, or out of order"
    return c, s


def test_two_percent_loss_at_one_megabit(net: NetnsPair, tmp_path: Path) -> None:
    net.rate_limit("1mbit")
    net.random_loss(0.02)
    server, client = run_pair(net, tmp_path, count=2000)
    assert_exactly_once(server, client, count=2000)


def test_link_down_five_seconds_then_up(net: NetnsPair, tmp_path: Path) -> None:
    server, client = run_pair(net, tmp_path)
    time.sleep(1.0)
    net.link(up=False)
    time.sleep(5.0)
    net.link(up=True)
    back = time.monotonic()
    c, s = assert_exactly_once(server, client)
    first = min(t for t in c["times"] + s["times"] if t >= back)
    assert first - back < 1.0, f"first message {first - back:.2f}s after the link came back"
    assert c["resumes"] >= 1 and len(c["lost"]) >= 1, "the outage was not even noticed"


def test_black_hole_is_detected_as_a_half_open_link(net: NetnsPair, tmp_path: Path) -> None:
    server, client = run_pair(net, tmp_path)
    time.sleep(1.0)
    silent_since = time.monotonic()
    net.drop_all(True)
    time.sleep(3 * HEARTBEAT + 1.0)
    net.drop_all(False)
    c, s = assert_exactly_once(server, client)
    for name, lost in (("client", c["lost"]), ("server", s["lost"])):
        detected = [t - silent_since for t in lost if t >= silent_since]
        assert detected, f"the {name} never noticed the silence"
        assert detected[0] <= 3 * HEARTBEAT, f"the {name} took {detected[0]:.2f}s (> 3 heartbeats)"


def test_reset_injected_mid_stream(net: NetnsPair, tmp_path: Path) -> None:
    server, client = run_pair(net, tmp_path)
    time.sleep(1.0)
    net.reset_all(True)
    time.sleep(0.3)
    net.reset_all(False)
    c, _ = assert_exactly_once(server, client)
    assert c["resumes"] >= 1, "the reset did not cut the connection"


def test_fifty_ms_delay_with_twenty_ms_jitter(tmp_path: Path) -> None:
    # A user-space relay on loopback delays every chunk by 30-70 ms, in order.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = side((), "server", "127.0.0.1", 0, tmp_path / "server.json")
    try:
        port = _listening_port(server)
        relay = asyncio.run_coroutine_threadsafe(
            Relay("127.0.0.1", port, delay=(0.03, 0.07)).start(), loop
        ).result(10)
        client = side((), "client", "127.0.0.1", relay.port, tmp_path / "client.json")
        assert_exactly_once(server, client)
        asyncio.run_coroutine_threadsafe(relay.close(), loop).result(10)
    finally:
        server.stop()
        asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _listening_port(server: Side) -> int:
    """The port the server bound (port 0 was asked), read from /proc."""
    pid = server.proc.pid
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                return int(fields[1].split(":")[1], 16)
    raise AssertionError("the server is not listening")
