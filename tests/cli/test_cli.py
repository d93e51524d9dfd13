"""The korinet command, run as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from korinet.cli import parse_address

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def korinet(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "korinet.cli", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_parse_address() -> None:
    assert parse_address("example") == ("example", 1235)
    assert parse_address("example:99") == ("example", 99)
    assert parse_address("[::1]:7") == ("::1", 7)
    assert parse_address(":8") == ("127.0.0.1", 8)
    with pytest.raises(Exception, match="bad port"):
        parse_address("h:x")


def test_help_names_the_commands() -> None:
    out = korinet("--help").stdout
    for command in ("serve", "ping", "plugins"):
        assert command in out


def test_plugins_lists_codecs_and_message_types() -> None:
    out = korinet("plugins").stdout
    assert "codec         msgpack" in out and "message type  korinet.echo" in out


@pytest.mark.timeout(60)
def test_serve_then_ping() -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "korinet.cli", "serve", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert f"serving on 127.0.0.1:{port}" in banner
        ping = korinet("ping", f"127.0.0.1:{port}", "-c", "3", "-i", "0")
        assert ping.returncode == 0, ping.stderr
        assert "3 requests, 3 replies, 0 errors" in ping.stdout
        assert re.search(r"min/median/p99/max = \d+/\d+/\d+/\d+ µs", ping.stdout)
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=10)
    assert server.returncode == 0, err
    assert "stopping" in out


def test_ping_with_nobody_there_says_so() -> None:
    started = time.monotonic()
    result = korinet("ping", f"127.0.0.1:{free_port()}", "-t", "1")
    assert result.returncode == 2
    assert "could not open a session" in result.stderr and "Connect call failed" in result.stderr
    assert time.monotonic() - started < 15


def test_serve_on_a_port_in_use_says_so() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = korinet("serve", f"127.0.0.1:{busy.getsockname()[1]}")
    assert result.returncode == 1
    assert "cannot listen" in result.stderr


@pytest.mark.timeout(60)
def test_serve_and_ping_with_a_passphrase_from_the_environment() -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "korinet.cli", "serve", f"127.0.0.1:{port}", "--passphrase"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**ENV, "KORINET_PASSPHRASE": "open sesame"},
    )
    try:
        assert server.stdout is not None
        assert f"serving on 127.0.0.1:{port}" in server.stdout.readline()
        assert "prove the passphrase" in server.stdout.readline()
        good = subprocess.run(
            [sys.executable, "-m", "korinet.cli", "ping", f"127.0.0.1:{port}", "-c", "1", "--passphrase"],
            capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
            env={**ENV, "KORINET_PASSPHRASE": "open sesame"},
        )  # fmt: skip
        assert good.returncode == 0, good.stderr
        bad = subprocess.run(
            [sys.executable, "-m", "korinet.cli", "ping", f"127.0.0.1:{port}", "-c", "1", "--passphrase"],
            capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
            env={**ENV, "KORINET_PASSPHRASE": "open barley"},
        )  # fmt: skip
        assert bad.returncode == 2 and "wrong passphrase" in bad.stderr
        none = korinet("ping", f"127.0.0.1:{port}", "-c", "1")
        assert none.returncode == 2 and "requires a passphrase" in none.stderr
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=10)


def test_passphrase_without_a_source_says_where_to_put_it() -> None:
    env = {k: v for k, v in ENV.items() if k != "KORINET_PASSPHRASE"}
    result = subprocess.run(
        [sys.executable, "-m", "korinet.cli", "ping", "127.0.0.1:1", "--passphrase"],
        capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert result.returncode == 1 and "set KORINET_PASSPHRASE" in result.stderr


@pytest.mark.timeout(60)
def test_serve_with_a_store_refuses_a_store_in_use(tmp_path: Path) -> None:
    store = tmp_path / "sessions.db"
    port = free_port()
    first = subprocess.Popen(
        [sys.executable, "-m", "korinet.cli", "serve", f"127.0.0.1:{port}", "--store", str(store)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert first.stdout is not None and "serving on" in first.stdout.readline()
        assert store.exists() and store.stat().st_mode & 0o077 == 0  # it holds resume tokens
        second = korinet("serve", f"127.0.0.1:{free_port()}", "--store", str(store))
        assert second.returncode == 1 and "in use by another process" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=10)
