"""A real nats-server with JetStream on a loopback port, for the bus tests, and a
cluster of three of them (routes, JetStream replicated) for the failover tests.

Each server gets its own store directory, so a restart on the same directory and
port (kill -9, then start again) finds its streams where it left them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

BINARY = shutil.which("nats-server") or "/usr/sbin/nats-server"


def need_nats_server() -> None:
    if not os.path.exists(BINARY):
        if os.environ.get("CI"):
            pytest.fail("nats-server is not installed (Debian package nats-server): CI must install it")
        pytest.skip("nats-server is not installed (Debian package nats-server)")


class NatsServer:
    def __init__(self, workdir: Path, port: int = -1, extra: list[str] | None = None) -> None:
        self.workdir = workdir
        self.port = port
        self.extra = extra or []  # e.g. the cluster options of a NatsCluster node
        self.cluster_port: int | None = None
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
                *self.extra,
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
                    if "--cluster" in self.extra:
                        self.cluster_port = int(ports["cluster"][0].rsplit(":", 1)[1])
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


class NatsCluster:
    """Three nats-servers routed into one JetStream cluster on loopback ports.

    Every port is the kernel's choice (none fixed). JetStream in a cluster will not
    start without a configured route, and the first node cannot know the others'
    route ports: it is given a port of ours that is bound but never listens (its
    dials are refused, harmlessly), the second and third route to the first, and
    the nodes tell each other the rest (gossip) until each has routes to both.
    ``await ready()`` before use."""

    NAME = "korinet-test"

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.size = size
        self.nodes: list[NatsServer] = []
        self._nowhere = socket.socket()  # the first node's route: refused, never answered

    @property
    def urls(self) -> str:
        """The bus address of the live nodes: ``nats://h:p,h:p,h:p``."""
        live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        return "nats://" + ",".join(f"127.0.0.1:{n.port}" for n in live)

    def _options(self, index: int, routes: list[int]) -> list[str]:
        return [
            "--server_name", f"n{index}",
            "--cluster", "nats://127.0.0.1:-1",
            "--cluster_name", self.NAME,
            "--routes", ",".join(f"nats://127.0.0.1:{port}" for port in routes),
        ]  # fmt: skip

    def start(self) -> NatsCluster:
        """Start the nodes (then await :meth:`ready`)."""
        need_nats_server()
        self._nowhere.bind(("127.0.0.1", 0))
        try:
            first = NatsServer(self.workdir / "n0", extra=self._options(0, [self._nowhere.getsockname()[1]]))
            self.nodes.append(first.start())
            assert first.cluster_port is not None
            for i in range(1, self.size):
                node = NatsServer(self.workdir / f"n{i}", extra=self._options(i, [first.cluster_port]))
                self.nodes.append(node.start())
        except BaseException:
            self.stop()
            raise
        return self

    async def ready(self, timeout: float = 60.0) -> None:
        """Until the cluster places a stream on all its nodes: routes up, JetStream's
        meta group has a leader and knows every peer (a replicas-N stream created
        before that is refused: "no suitable peers for placement")."""
        import nats
        import nats.errors
        import nats.js.errors
        from nats.js import api

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        nc = await nats.connect([n.url for n in self.nodes], connect_timeout=5, max_reconnect_attempts=-1)
        try:
            js = nc.jetstream(timeout=5)
            while True:
                try:
                    await js.add_stream(
                        api.StreamConfig(name="PROBE", subjects=["probe"], num_replicas=len(self.nodes))
                    )
                    await js.delete_stream("PROBE")
                    return
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    if loop.time() > deadline:
                        raise RuntimeError(f"no nats cluster within {timeout:g} s: {exc}") from exc
                await asyncio.sleep(0.1)
        finally:
            await nc.close()

    def node(self, name: str) -> NatsServer:
        """The node called ``name`` (``n0``, ``n1``...: JetStream names leaders so)."""
        return self.nodes[int(name.removeprefix("n"))]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self._nowhere.close()


@contextlib.asynccontextmanager
async def nats_cluster(workdir: Path) -> AsyncIterator[NatsCluster]:
    """A formed three-node cluster for the length of a test."""
    cluster = NatsCluster(workdir).start()
    try:
        await cluster.ready()
        yield cluster
    finally:
        cluster.stop()


async def stream_leader(cluster: NatsCluster, stream: str, timeout: float = 30.0) -> NatsServer:
    """The node leading ``stream`` now, asked on a link of its own (waiting out an
    election: between two leaders the stream names none)."""
    import nats

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    nc = await nats.connect([n.url for n in cluster.nodes], connect_timeout=5)
    try:
        while True:
            info = await nc.jetstream(timeout=10).stream_info(stream)
            if info.cluster is not None and info.cluster.leader:
                return cluster.node(str(info.cluster.leader))
            if loop.time() > deadline:
                raise RuntimeError(f"{stream} has had no leader for {timeout:g} s")
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
