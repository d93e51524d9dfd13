"""A real nats-server with JetStream on a loopback port, for the bus tests.

Each server gets its own store directory, so a restart on the same directory and
port (kill -9, then start again) finds its streams where it left them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

BINARY = shutil.which("nats-server") or "/usr/sbin/nats-server"


def need_nats_server() -> None:
    if not os.path.exists(BINARY):
        if os.environ.get("CI"):
            pytest.fail("nats-server is not installed (Debian package nats-server): CI must install it")
        pytest.skip("nats-server is not installed (Debian package nats-server)")


class NatsServer:
    def __init__(self, workdir: Path, port: int = -1) -> None:
        self.workdir = workdir
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        need_nats_server()
        ports_dir = self.workdir / "ports"
        ports_dir.mkdir(parents=True, exist_ok=True)
        for old in ports_dir.iterdir():
            old.unlink()
        self.proc = subprocess.Popen(
            [
                BINARY,
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.workdir / "js"),
                "--ports_file_dir",
                str(ports_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "server.log", "ab"),
        )
        deadline = time.monotonic() + 15
        while True:  # the ports file appears once the server listens
            files = list(ports_dir.glob("*.ports"))
            if files:
                try:
                    ports = json.loads(files[0].read_text())
                    self.port = int(ports["nats"][0].rsplit(":", 1)[1])
                    return self
                except (ValueError, KeyError, IndexError):
                    pass  # written but not complete yet
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {(self.workdir / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("nats-server did not start within 15 s")
            time.sleep(0.02)

    def kill(self) -> None:
        """kill -9: no goodbye to the clients, the store left as it was."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
