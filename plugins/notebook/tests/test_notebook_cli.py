"""`korinet notebook ...` against `korinet serve`, as a user runs them."""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from testutil import TIMEOUT_FACTOR

T = 20 * TIMEOUT_FACTOR


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A private KORINET_HOME, and only this plugin loaded (another package's plugin
    must not decide whether these tests pass)."""
    others = [ep.name for ep in importlib.metadata.entry_points(group="korinet") if ep.name != "notebook"]
    return {**os.environ, "KORINET_HOME": str(tmp_path / "home"), "KORINET_DISABLE_PLUGINS": ",".join(others)}


def korinet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "korinet.cli", *args], capture_output=True, text=True, timeout=T, env=env
    )


def _serve(env: dict[str, str], *options: str) -> Iterator[str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "korinet.cli", "serve", "127.0.0.1:0", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        found = re.search(r"serving on (127\.0\.0\.1:\d+) \(message types: (.*)\)", banner)
        assert found, banner + (server.stderr.read() if server.stderr else "")
        assert "notebook.put" in found.group(2)
        yield found.group(1)
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=T)


@pytest.fixture
def plain_server(env: dict[str, str]) -> Iterator[str]:
    yield from _serve(env)


@pytest.fixture
def tls_server(env: dict[str, str]) -> Iterator[str]:
    yield from _serve(env, "--tls", "--no-client-auth")


def test_put_get_list_del_over_tls_by_default(env: dict[str, str], tls_server: str) -> None:
    put = korinet(env, "notebook", "--server", tls_server, "put", "motd", "hello LAN")
    assert put.returncode == 0, put.stderr
    assert put.stdout == "motd set (version 1)\n"
    assert f"first connection to {tls_server}: pinned its key SHA256:" in put.stderr
    get = korinet(env, "notebook", "--server", tls_server, "get", "motd")
    assert (get.returncode, get.stdout) == (0, "hello LAN\n"), get.stderr
    assert "pinned" not in get.stderr  # the key is known now
    korinet(env, "notebook", "--server", tls_server, "put", "motd2", "x")
    listing = korinet(env, "notebook", "--server", tls_server, "list", "motd")
    assert listing.stdout == "motd\thello LAN\nmotd2\tx\n"
    gone = korinet(env, "notebook", "--server", tls_server, "del", "motd")
    assert (gone.returncode, gone.stdout) == (0, "motd deleted\n")
    missing = korinet(env, "notebook", "--server", tls_server, "get", "motd")
    assert missing.returncode == 1
    assert "no such key: 'motd'" in missing.stderr and "Traceback" not in missing.stderr


def test_tls_client_refuses_a_plaintext_server_and_says_so(env: dict[str, str], plain_server: str) -> None:
    result = korinet(env, "notebook", "--server", plain_server, "--timeout", "2", "get", "x")
    assert result.returncode == 2
    assert f"cannot reach {plain_server}" in result.stderr and "Traceback" not in result.stderr


def test_plaintext_only_when_asked_with_a_warning_and_rejections_shown(
    env: dict[str, str], plain_server: str
) -> None:
    args = ("notebook", "--server", plain_server, "--insecure-plaintext")
    bad = korinet(env, *args, "put", "two words", "v")
    assert bad.returncode == 1
    assert "warning: plaintext connection" in bad.stderr
    assert "invalid 'notebook.put' message: key 'two words' contains whitespace" in bad.stderr
    assert "Traceback" not in bad.stderr
    good = korinet(env, *args, "put", "cfg/a", "1")
    assert good.returncode == 0, good.stderr


def test_watch_prints_changes_as_they_happen(env: dict[str, str], plain_server: str) -> None:
    args = ("notebook", "--server", plain_server, "--insecure-plaintext")
    korinet(env, *args, "put", "cfg/a", "1")
    watcher = subprocess.Popen(
        [sys.executable, "-m", "korinet.cli", *args, "watch", "cfg/", "--count", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline() == "cfg/a = 1\n"  # the state when the watch began
        korinet(env, *args, "put", "elsewhere", "x")
        korinet(env, *args, "put", "cfg/a", "2")
        korinet(env, *args, "del", "cfg/a")
        out, err = watcher.communicate(timeout=T)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0, err
    assert out == "cfg/a = 2\ncfg/a deleted\n"


def test_unreachable_server_is_one_line(env: dict[str, str]) -> None:
    result = korinet(
        env, "notebook", "--server", "127.0.0.1:1", "--insecure-plaintext", "--timeout", "1", "list"
    )
    assert result.returncode == 2
    assert "cannot reach 127.0.0.1:1" in result.stderr and "Traceback" not in result.stderr
