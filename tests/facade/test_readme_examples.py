"""The three API examples of the original README run as written.

Each example lives in examples/ verbatim, but for the imports the README forgot,
the port from the environment and a bound on its endless loops (every change is
marked ``# test:`` there). They run as subprocesses with the repository on
PYTHONPATH, exactly as a user would run them.
"""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from korinet import protocol

EXAMPLES = Path(__file__).parent / "examples"
REPO = Path(__file__).resolve().parents[2]
N = 3  # pings in the client/server example (the README's loops sleep 1 s per round)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def env_for(port: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["KORINET_EXAMPLE_PORT"] = str(port)
    env["KORINET_EXAMPLE_N"] = str(N)
    env["KORINET_EXAMPLE_SECONDS"] = "30"
    return env


def run_example(name: str, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-u", str(EXAMPLES / name)],
        cwd=str(REPO),
        env=env_for(port),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (read from /proc, without connecting:
    a probe connection would be served by the example as a client)."""
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return True  # cannot tell: let the client's own retries cover the start-up
    want = f"0100007F:{port:04X}"
    return any(line.split()[1] == want and line.split()[3] == "0A" for line in lines)


def wait_listening(port: int, proc: subprocess.Popen[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the server example did not listen"
        time.sleep(0.05)


def printed_dicts(out: str) -> list[dict[str, object]]:
    return [ast.literal_eval(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.timeout(60)
def test_server_and_client_examples() -> None:
    port = free_port()
    srv = run_example("server_example.py", port)
    cli: subprocess.Popen[str] | None = None
    try:
        wait_listening(port, srv)
        started = time.monotonic()
        cli = run_example("client_example.py", port)
        cli_out, cli_err = cli.communicate(timeout=30)
        srv_out, srv_err = srv.communicate(timeout=15)
        elapsed = time.monotonic() - started
    finally:
        for proc in (srv, cli):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    print(f"\nclient/server examples: {N} rounds in {elapsed:.1f}s")
    assert cli is not None
    assert cli.returncode == 0, cli_err
    assert srv.returncode == 0, srv_err
    assert "Traceback" not in srv_out + srv_err + cli_err, (srv_out, srv_err, cli_err)

    # the client printed every reply of the server, in order
    replies = printed_dicts(cli_out)
    assert len(replies) == N, cli_out
    for reply in replies:
        assert {k: v for k, v in reply.items() if k != "id"} == {"status": True}, cli_out

    # the server printed {"type": "ping", "num": n, "id": ...} for n = 0..N-1
    pings = printed_dicts(srv_out)
    assert [p["num"] for p in pings] == list(range(N)), srv_out
    for ping in pings:
        assert set(ping) == {"type", "num", "id"}, ping
        assert ping["type"] == "ping"
        assert isinstance(ping["id"], str) and ping["id"]
    assert len({p["id"] for p in pings}) == N, "message ids are distinct"


class RawPeer:
    """The other end of the raw example: accepts one socket, speaks protocol.v2."""

    def __init__(self, reply: dict[str, object]) -> None:
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(20)
        self.port: int = self.listener.getsockname()[1]
        self.received: list[object] = []
        self.error: BaseException | None = None
        self.eof = False
        self.thread = threading.Thread(target=self._run, name="raw-peer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(20)
                session = protocol.v2(conn)
                self.received.append(session.recv())
                session.send(self.reply)
                self.eof = conn.recv(1) == b""  # the example is done: it closes
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.listener.close()


@pytest.mark.timeout(60)
def test_raw_example() -> None:
    peer = RawPeer({"status": True})
    proc = run_example("raw_example.py", peer.port)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    peer.thread.join(10)
    assert proc.returncode == 0, err
    assert peer.error is None, peer.error
    assert peer.eof
    # the example sent {"type": "ping"}; v2 hands it over with the frame's id inside
    [ping] = peer.received
    assert isinstance(ping, dict) and set(ping) == {"type", "id"}, ping
    assert ping["type"] == "ping"
    assert re.fullmatch(r"[0-9a-f]{32}", ping["id"]), ping
    [response] = printed_dicts(out)
    assert response["status"] is True
    assert re.fullmatch(r"[0-9a-f]{32}", str(response["id"]))


@pytest.mark.timeout(60)
def test_raw_example_rejects_a_bad_response() -> None:
    peer = RawPeer({"status": False})
    proc = run_example("raw_example.py", peer.port)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    peer.thread.join(10)
    assert proc.returncode == 1
    assert "RuntimeError: Invalid response" in err
