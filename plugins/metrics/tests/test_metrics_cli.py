"""`korinet serve --metrics-port` and KORINET_METRICS_PORT, as a user runs them."""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from testutil import TIMEOUT_FACTOR

T = 20 * TIMEOUT_FACTOR


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    others = [ep.name for ep in importlib.metadata.entry_points(group="korinet") if ep.name != "metrics"]
    env = {**os.environ, "KORINET_HOME": str(tmp_path), "KORINET_DISABLE_PLUGINS": ",".join(others)}
    env.pop("KORINET_METRICS_PORT", None)
    return env


@contextmanager
def serving(env: dict[str, str], *options: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``korinet [-v] serve 127.0.0.1:0 [options]``; yields it and its output up to the banner."""
    verbose = [o for o in options if o == "-v"]
    options = tuple(o for o in options if o != "-v")
    server = subprocess.Popen(
        [sys.executable, "-m", "korinet.cli", *verbose, "serve", "127.0.0.1:0", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        assert server.stdout is not None
        while not lines or "serving on" not in lines[-1]:
            line = server.stdout.readline()
            if not line:
                break
            lines.append(line)
        yield server, lines
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
        server.communicate(timeout=T)


def scrape(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url, timeout=T) as response:
        text = response.read().decode()
    return {
        (s.name, s.labels.get("side", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "le" not in s.labels
    }


def ping(env: dict[str, str], address: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "korinet.cli", "ping", address, "-c", "3", "-i", "0"],
        capture_output=True,
        text=True,
        timeout=T,
        env=env,
    )
    assert result.returncode == 0, result.stderr


def test_serve_metrics_port_counts_a_ping(env: dict[str, str]) -> None:
    with serving(env, "--metrics-port", "0") as (_, lines):
        text = "".join(lines)
        url = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", text)
        address = re.search(r"serving on (127\.0\.0\.1:\d+)", text)
        assert url and address, text
        before = scrape(url.group(1))
        assert before[("korinet_sessions_open", "server")] == 0
        ping(env, address.group(1))
        after = scrape(url.group(1))
    assert after[("korinet_sessions_opened_total", "server")] == 1
    assert after[("korinet_sessions_closed_total", "server")] == 1
    assert after[("korinet_messages_received_total", "server")] == 3  # the ping's requests
    assert after[("korinet_messages_sent_total", "server")] == 3  # and their replies
    assert ("process_cpu_seconds_total", "") in after  # prometheus-client's own, for free


def test_environment_variable_switches_it_on(env: dict[str, str]) -> None:
    # Port 0: any free one, found in the -v log line (no race for a port picked here).
    env["KORINET_METRICS_PORT"] = "0"
    with serving(env | {"PYTHONUNBUFFERED": "1"}, "-v") as (server, lines):
        address = re.search(r"serving on (127\.0\.0\.1:\d+)", "".join(lines))
        assert address and server.stderr is not None, lines
        url = None
        for _ in range(50):  # the log line precedes the banner, so it is already there
            found = re.search(r"korinet-metrics: serving (http://\S+/metrics)", server.stderr.readline())
            if found:
                url = found.group(1)
                break
        assert url is not None
        ping(env | {"KORINET_METRICS_PORT": ""}, address.group(1))
        m = scrape(url)
    assert m[("korinet_sessions_opened_total", "server")] == 1


def test_a_busy_metrics_port_is_one_clear_line(env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with serving(env, "--metrics-port", str(port)) as (server, lines):
            out, err = server.communicate(timeout=T)
    text = "".join(lines) + out
    assert server.returncode == 1
    assert f"cannot serve metrics on port {port}" in text
    assert "Traceback" not in err


def test_without_a_port_the_plugin_stays_idle(env: dict[str, str]) -> None:
    code = (
        "import sys, korinet_metrics.plugin as p; "
        "from korinet.plugins import PluginManager; PluginManager.load(); "
        "assert p.active() is None; assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=T)
    assert result.returncode == 0, result.stderr
