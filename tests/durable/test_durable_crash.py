"""kill -9 of a real server or client process mid-stream; the restarted process resumes
the same session from its store and every message is delivered exactly once, in order,
both ways (issue 4, item 2).

The application (durable_app.py) records what it receives in a table of its store,
in the loop turn in which recv() returned it: that record must read 1..N exactly once.
It also appends to a plain file, which must read 1..N in order with, at worst, a
replay of the last few before a kill (the end-to-end argument: a file outside the
store's transaction cannot be exactly-once).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testutil import TIMEOUT_FACTOR

APP = Path(__file__).with_name("durable_app.py")
#: every process started (for dumps of a stuck run)
ALIVE: list[subprocess.Popen[bytes]] = []
N = 3000
WAIT_S = 30 * TIMEOUT_FACTOR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Side:
    """One side's process, restartable with the same store and records."""

    def __init__(self, role: str, port: int, tmp: Path) -> None:
        self.role = role
        self.port = port
        self.store = tmp / f"{role}.db"
        self.record = tmp / f"{role}.record"
        self.tmp = tmp
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.out: Path | None = None

    def start(self) -> None:
        self.runs += 1
        self.out = self.tmp / f"{self.role}-{self.runs}.out"
        with open(self.out, "wb") as out:
            self.proc = proc = subprocess.Popen(
                [
                    sys.executable,
                    str(APP),
                    self.role,
                    str(self.port),
                    str(self.store),
                    str(self.record),
                    str(N),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "DURABLE_APP_LOG": "INFO"},
            )
        ALIVE.append(proc)
        if self.role == "server":
            wait_for(lambda: accepts(self.port) or self.exited(), f"the server listening on {self.port}")
            assert not self.exited(), self.output()

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill9(self) -> None:
        assert self.proc is not None and not self.exited(), self.output()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(WAIT_S)

    def finish(self) -> None:
        """Wait for a client to complete its run (exit 0)."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            dump_alive()
            self.kill9()
            raise AssertionError(f"{self.role} did not finish in {WAIT_S}s:\n{self.everything()}") from None
        assert rc == 0, self.everything()

    def everything(self) -> str:
        """Every run's output, both sides (for a failure message)."""
        ALIVE[:] = [p for p in ALIVE if p.poll() is None]
        server = Side("server", self.port, self.tmp)
        client = Side("client", self.port, self.tmp)
        return server.all_output() + client.all_output()

    def stop(self) -> None:
        if self.proc is not None and not self.exited():
            self.proc.kill()
            self.proc.wait(WAIT_S)

    def output(self) -> str:
        return self.out.read_text(errors="replace")[-3000:] if self.out else ""

    def all_output(self) -> str:
        return "".join(
            f"--- {out.name}\n" + out.read_text(errors="replace")[-3000:]
            for out in sorted(self.tmp.glob(f"{self.role}-*.out"))
        )

    def received_lines(self) -> int:
        try:
            return self.record.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def dump_alive() -> None:
    """Ask every live process for its tasks' stacks (see durable_app.py)."""
    for proc in ALIVE:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(0.5)


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            dump_alive()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def store_record(side: Side) -> list[int]:
    db = sqlite3.connect(side.store)
    try:
        return [n for (n,) in db.execute("SELECT n FROM app_received ORDER BY rowid")]
    finally:
        db.close()


def stored_sessions(side: Side) -> int:
    db = sqlite3.connect(side.store)
    try:
        return int(db.execute("SELECT count(*) FROM korinet_sessions").fetchone()[0])
    finally:
        db.close()


def file_record_is_replay_only(side: Side) -> int:
    """The file holds 1..N in order, where a kill may have made it start again a little
    earlier (never skip, never reorder). Returns how many lines were replays."""
    numbers = [int(line) for line in side.record.read_text().split()]
    expected = 1
    replays = 0
    for n in numbers:
        if n == expected:
            expected += 1
        else:
            assert n < expected, f"{side.role}: {n} recorded before {expected}: a message was lost"
            replays += 1
    assert expected == N + 1, f"{side.role}: the file stops at {expected - 1}"
    return replays


def accepted_survived(side: Side) -> None:
    """Every number post() had accepted before a kill is in the store: the restarted
    process starts after it, never at or below it."""
    accepted = 0
    for line in (side.tmp / f"{side.record.name}.sent").read_text().splitlines():
        if line.startswith("start "):
            first = int(line.split()[1])
            assert first > accepted, f"{side.role} restarted at {first} after post() accepted {accepted}"
        else:
            accepted = int(line)
    assert accepted == N


def check(server: Side, client: Side) -> None:
    for side in (server, client):
        accepted_survived(side)
    expected = list(range(1, N + 1))
    assert store_record(server) == expected  # client -> server, exactly once, in order
    assert store_record(client) == expected  # server -> client
    for side in (server, client):
        replays = file_record_is_replay_only(side)
        print(f"{side.role}: {replays} replayed line(s) in the plain file")
    # The client closed its session at the end: neither store keeps it any more.
    assert stored_sessions(client) == 0
    wait_for(lambda: stored_sessions(server) == 0, "the server to forget the closed session")


@pytest.fixture
def sides(tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    server, client = Side("server", port, tmp_path), Side("client", port, tmp_path)
    yield server, client
    client.stop()
    server.stop()
    print(server.everything())  # shown when the test failed


@pytest.mark.timeout(120 * TIMEOUT_FACTOR)
def test_durable_server_killed_mid_stream(sides: tuple[Side, Side]) -> None:
    server, client = sides
    server.start()
    client.start()
    wait_for(lambda: server.received_lines() >= N // 3 or client.exited(), "a third of the stream")
    assert not client.exited(), client.output()
    server.kill9()
    at_kill = server.received_lines()
    assert at_kill < N, "the stream was over before the kill"
    server.start()
    client.finish()
    assert "server up with 1 restored session(s)" in server.output()
    # The restored session went on where it was, not from the start.
    assert "ServerPeer sends from 1\n" not in server.output() and "ServerPeer sends from" in server.output()
    server.stop()
    check(server, client)


@pytest.mark.timeout(120 * TIMEOUT_FACTOR)
def test_durable_client_killed_mid_stream(sides: tuple[Side, Side]) -> None:
    server, client = sides
    server.start()
    client.start()
    wait_for(lambda: server.received_lines() >= N // 3 or client.exited(), "a third of the stream")
    client.kill9()
    first_run = client.output()
    client.start()
    client.finish()
    # The same session, resumed where the store says the application left off.
    session_line = next(line for line in first_run.splitlines() if line.startswith("client session"))
    session_id = session_line.split()[2]
    resumed = next(line for line in client.output().splitlines() if line.startswith("client session"))
    assert resumed.split()[2] == session_id
    assert int(resumed.split()[4]) > 0
    server.stop()
    check(server, client)


@pytest.mark.timeout(180 * TIMEOUT_FACTOR)
def test_durable_both_killed_in_turn(sides: tuple[Side, Side]) -> None:
    server, client = sides
    server.start()
    client.start()
    for turn, fraction in enumerate((0.2, 0.4, 0.6, 0.8)):
        wait_for(lambda f=fraction: server.received_lines() >= N * f or client.exited(), f"{fraction} of N")
        assert not client.exited(), client.output()
        if turn % 2 == 0:
            server.kill9()
            server.start()
        else:
            client.kill9()
            client.start()
    client.finish()
    server.stop()
    check(server, client)
