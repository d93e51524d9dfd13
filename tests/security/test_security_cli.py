"""keygen, id, authorize, serve --tls and ping --tls, run as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def run(home: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "KORINET_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "korinet.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_id_creates_on_first_use_and_says_so(home: Path) -> None:
    first = run(home, "id")
    assert first.returncode == 0, first.stderr
    fingerprint = first.stdout.strip()
    assert FINGERPRINT.fullmatch(fingerprint)  # stdout is the fingerprint alone: $(korinet id)
    assert "created a new identity" in first.stderr and str(home) in first.stderr
    again = run(home, "id")
    assert again.stdout.strip() == fingerprint and "created" not in again.stderr
    assert (home / "key.pem").stat().st_mode & 0o777 == 0o600


def test_keygen_refuses_to_overwrite_without_force(home: Path) -> None:
    made = run(home, "keygen")
    assert made.returncode == 0, made.stderr
    fingerprint = FINGERPRINT.search(made.stdout)
    assert fingerprint is not None
    refused = run(home, "keygen")
    assert refused.returncode == 1
    assert "already exists" in refused.stderr and "--force" in refused.stderr
    assert run(home, "id").stdout.strip() == fingerprint.group()  # untouched
    forced = run(home, "keygen", "--force")
    assert forced.returncode == 0
    assert run(home, "id").stdout.strip() not in (fingerprint.group(), "")


def test_authorize_writes_the_file(home: Path) -> None:
    fingerprint = run(home, "id").stdout.strip()
    done = run(home, "authorize", fingerprint, "--name", "alice", "--role", "admin", "--role", "chat")
    assert done.returncode == 0, done.stderr
    assert "authorized alice" in done.stdout and "admin, chat" in done.stdout
    assert f"{fingerprint} alice admin,chat" in (home / "authorized_keys").read_text()
    bad = run(home, "authorize", "SHA256:short", "--name", "x")
    assert bad.returncode == 1 and "not a KoriNet fingerprint" in bad.stderr


@pytest.mark.timeout(90)
def test_serve_tls_then_ping_tls(tmp_path: Path) -> None:
    server_home, client_home, stranger_home = tmp_path / "server", tmp_path / "client", tmp_path / "stranger"
    client_fp = run(client_home, "id").stdout.strip()
    assert run(server_home, "authorize", client_fp, "--name", "client").returncode == 0
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "KORINET_HOME": str(server_home)}
    server = subprocess.Popen(
        [sys.executable, "-m", "korinet.cli", "serve", f"127.0.0.1:{port}", "--tls"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        lines = [server.stdout.readline() for _ in range(4)]
        assert f"serving on 127.0.0.1:{port}" in lines[0]
        server_fp = FINGERPRINT.search(lines[1])
        assert server_fp is not None and "TLS 1.3" in lines[1]
        assert "1 key(s)" in lines[2]

        ping = run(client_home, "ping", "--tls", f"127.0.0.1:{port}", "-c", "2", "-i", "0")
        assert ping.returncode == 0, ping.stderr
        assert (
            f"first connection to 127.0.0.1:{port}: its key {server_fp.group()} is now pinned" in ping.stderr
        )
        assert "2 requests, 2 replies, 0 errors" in ping.stdout
        again = run(client_home, "ping", "--tls", f"127.0.0.1:{port}", "-c", "1")
        assert again.returncode == 0 and "first connection" not in again.stderr

        stranger = run(stranger_home, "ping", "--tls", f"127.0.0.1:{port}", "-c", "1", "-t", "3")
        assert stranger.returncode == 2
        assert "is not authorized on this server" in stranger.stderr

        plain = run(client_home, "ping", f"127.0.0.1:{port}", "-c", "1", "-t", "1")
        assert plain.returncode == 2  # a plaintext client gets no session from a TLS server
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=10)
    assert server.returncode == 0, err
    assert "refused: key" in err  # the server logged the stranger


@pytest.mark.timeout(90)
def test_ping_tls_refuses_a_server_whose_key_changed(tmp_path: Path) -> None:
    client_home = tmp_path / "client"
    port = free_port()
    for attempt, server_home in enumerate((tmp_path / "one", tmp_path / "two")):
        env = {**os.environ, "PYTHONPATH": os.getcwd(), "KORINET_HOME": str(server_home)}
        server = subprocess.Popen(
            [sys.executable, "-m", "korinet.cli", "serve", f"127.0.0.1:{port}", "--tls", "--no-client-auth"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert server.stdout is not None
            assert "serving on" in server.stdout.readline()
            ping = run(client_home, "ping", "--tls", f"127.0.0.1:{port}", "-c", "1")
            if attempt == 0:
                assert ping.returncode == 0, ping.stderr
            else:
                assert ping.returncode == 2
                assert "CHANGED" in ping.stderr and f"of {client_home / 'known_hosts'}" in ping.stderr
        finally:
            server.send_signal(signal.SIGINT)
            server.communicate(timeout=10)
