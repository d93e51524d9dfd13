"""KoriNet itself, measured like the peers: the server in a spawned process, the client
here. Acks mean "the application has it": the server side consumes every message
with ``async for`` (pipelined, stop-and-wait) or answers ``korinet.echo`` requests.

Beyond the shared rows: the blocking API's stop-and-wait, the time to the first
message after a cut (reconnect + resume), and RSS per idle session.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import peer_original
from benchutil import (
    ACK_EVERY,
    CHILD_MAX_S,
    DRAIN_S,
    LOOPBACK,
    WINDOW,
    Deadline,
    latency_figures,
    spawn_child,
    stop_requested,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's korinet

import korinet
from korinet import Client, Server, SessionConfig
from korinet.builtin import ECHO

# --------------------------------------------------------------------------- server


async def _serve(conn: Connection, heartbeat: float, mode: str) -> None:
    async def consume(peer: korinet.Peer) -> None:
        async for _ in peer:
            pass

    async def echo(peer: korinet.Peer) -> None:
        async for msg in peer:
            peer.post(msg)

    config = SessionConfig(heartbeat_interval=heartbeat)
    server = await Server(
        LOOPBACK,
        0,
        handler=echo if mode == "echo" else consume,
        config=config,
        max_sessions=100_000,
        max_connections_per_address=100_000,  # the idle sessions all come from 127.0.0.1
    ).start()
    conn.send(server.port)
    deadline = Deadline(CHILD_MAX_S)
    while not deadline.expired():
        if conn.poll(0):  # "rss" asks for our memory; anything else (or EOF) means stop
            try:
                request = conn.recv()
            except EOFError:
                break
            if request != "rss":
                break
            conn.send((_rss_kib(), len(server.hub.sessions)))
        await asyncio.sleep(0.05)
    await server.close()


def server_main(conn: Connection, heartbeat: float = 5.0, mode: str = "consume") -> None:
    """The asyncio Server; mode "consume" takes every message, "echo" posts it back."""
    asyncio.run(_serve(conn, heartbeat, mode))


def blocking_server_main(conn: Connection, mode: str) -> None:
    """The blocking ``korinet.server(conn)`` on each accepted socket, in this thread:
    mode "ack" takes every message (recv() acknowledges it), "echo" sends it back."""
    lsock = socket.create_server((LOOPBACK, 0))
    lsock.settimeout(0.2)
    conn.send(lsock.getsockname()[1])
    deadline = Deadline(CHILD_MAX_S)
    while not deadline.expired() and not stop_requested(conn):
        try:
            sock, _ = lsock.accept()
        except TimeoutError:
            continue
        sock.setblocking(True)
        srv = korinet.server(sock)
        try:
            while not deadline.expired() and not stop_requested(conn):
                try:
                    msg = srv.recv(timeout=0.2)
                except korinet.KoriNetTimeout:
                    continue
                if mode == "echo":
                    srv.send(msg)
        except (korinet.ConnectionClosed, OSError):
            pass  # the client hung up: take the next one
    lsock.close()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --------------------------------------------------------------------------- client


async def _pipelined(port: int, n: int, size: int, budget_s: float) -> tuple[int, float]:
    client = await Client.connect(LOOPBACK, port)
    payload = os.urandom(size)
    try:
        await client.send(payload)  # warm-up
        deadline = Deadline(budget_s)
        done = 0
        last = 0
        t0 = time.perf_counter()
        while done < n and not deadline.expired():
            if last - client.session.acked >= WINDOW:
                await client.wait_acked(last - WINDOW + ACK_EVERY, timeout=DRAIN_S)
            last = client.post(payload)
            done += 1
        await client.wait_acked(last, timeout=DRAIN_S)
        return done, time.perf_counter() - t0
    finally:
        await client.close()


async def _stop_and_wait(port: int, n: int, size: int, budget_s: float) -> tuple[int, float]:
    client = await Client.connect(LOOPBACK, port)
    payload = os.urandom(size)
    try:
        await client.send(payload)
        deadline = Deadline(budget_s)
        done = 0
        t0 = time.perf_counter()
        while done < n and not deadline.expired():
            await client.send(payload)
            done += 1
        return done, time.perf_counter() - t0
    finally:
        await client.close()


async def _reqrep(port: int, n: int, size: int, budget_s: float) -> list[int]:
    client = await Client.connect(LOOPBACK, port)
    payload = os.urandom(size)
    samples: list[int] = []
    try:
        deadline = Deadline(budget_s)
        warmup = min(100, max(n // 10, 1))
        for i in range(warmup + n):
            if deadline.expired():
                break
            t = time.perf_counter_ns()
            await client.request(payload, ECHO, timeout=DRAIN_S)
            if i >= warmup:
                samples.append(time.perf_counter_ns() - t)
        return samples
    finally:
        await client.close()


async def _echo_send_recv(port: int, n: int, size: int, budget_s: float) -> list[int]:
    """``await send()`` then ``await recv()`` of the server's echo, one at a time."""
    client = await Client.connect(LOOPBACK, port)
    payload = os.urandom(size)
    samples: list[int] = []
    try:
        deadline = Deadline(budget_s)
        warmup = min(100, max(n // 10, 1))
        for i in range(warmup + n):
            if deadline.expired():
                break
            t = time.perf_counter_ns()
            await client.send(payload, timeout=DRAIN_S)
            await client.recv(timeout=DRAIN_S)
            if i >= warmup:
                samples.append(time.perf_counter_ns() - t)
        return samples
    finally:
        await client.close()


# The blocking rows send the original's message shape ({"seq", "p"}), as
# original_helper.py does, so both sides of each ratio move the same object.


def _blocking_stop_and_wait(port: int, n: int, size: int, budget_s: float) -> tuple[int, float]:
    c = korinet.client(LOOPBACK, port, timeout=DRAIN_S)
    payload = os.urandom(size)
    try:
        c.send({"seq": -1, "p": payload})
        deadline = Deadline(budget_s)
        done = 0
        t0 = time.perf_counter()
        while done < n and not deadline.expired():
            c.send({"seq": done, "p": payload})
            done += 1
        return done, time.perf_counter() - t0
    finally:
        c.close()


def _blocking_round_trips(port: int, n: int, size: int, budget_s: float) -> list[int]:
    """``send()`` then ``recv()`` of the server's echo, one at a time."""
    c = korinet.client(LOOPBACK, port, timeout=DRAIN_S)
    payload = os.urandom(size)
    samples: list[int] = []
    try:
        deadline = Deadline(budget_s)
        warmup = min(100, max(n // 10, 1))
        for i in range(warmup + n):
            if deadline.expired():
                break
            t = time.perf_counter_ns()
            c.send({"seq": i, "p": payload})
            c.recv(timeout=DRAIN_S)
            if i >= warmup:
                samples.append(time.perf_counter_ns() - t)
        return samples
    finally:
        c.close()


async def _first_message_after_cut(port: int, cuts: int) -> list[float]:
    """Cut the client's TCP connection (an RST, as a lost link) while the server stays up;
    time from the cut until a message sent right after it is acknowledged."""
    client = await Client.connect(LOOPBACK, port)
    gaps: list[float] = []
    try:
        await client.send(b"warm-up")
        for _ in range(cuts):
            conn = client.conn
            assert conn is not None and conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            t0 = time.perf_counter()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.transport.abort()  # RST to the server, link lost here
            await client.send(b"after the cut", timeout=DRAIN_S)
            gaps.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.02)
        return gaps
    finally:
        await client.close()


async def _idle_sessions(port: int, count: int) -> list[Client]:
    clients: list[Client] = []
    for i in range(0, count, 100):
        batch = await asyncio.gather(
            *(Client.connect(LOOPBACK, port, open_timeout=30) for _ in range(min(100, count - i)))
        )
        clients.extend(batch)
    return clients


# --------------------------------------------------------------------------- figures


def pipelined(n: int, size: int, budget_s: float) -> tuple[int, float]:
    with spawn_child(server_main) as (_, port):
        return asyncio.run(_pipelined(port, n, size, budget_s))


def stop_and_wait(n: int, size: int, budget_s: float) -> tuple[int, float]:
    with spawn_child(server_main) as (_, port):
        return asyncio.run(_stop_and_wait(port, n, size, budget_s))


def blocking_stop_and_wait(n: int, size: int, budget_s: float) -> tuple[int, float]:
    """``client()`` against ``server(conn)``, both blocking."""
    with spawn_child(blocking_server_main, "ack") as (_, port):
        return _blocking_stop_and_wait(port, n, size, budget_s)


def blocking_round_trip(n: int, size: int, budget_s: float) -> dict[str, float]:
    """``client()`` send()+recv() against ``server(conn)`` recv()+send()."""
    with spawn_child(blocking_server_main, "echo") as (_, port):
        return latency_figures(_blocking_round_trips(port, n, size, budget_s))


def original_client_stop_and_wait(n: int, size: int, budget_s: float) -> tuple[int, float]:
    """The original 0.0.1 client (its own venv) against the new ``server(conn)``."""
    with (
        spawn_child(blocking_server_main, "ack") as (_, port),
        tempfile.TemporaryDirectory(prefix="korinet-bench-orig-") as cwd,
    ):
        r = peer_original.client(port, "ack", n, size, budget_s, cwd)
        return r["done"], r["elapsed"]


def echo_send_recv(n: int, size: int, budget_s: float) -> dict[str, float]:
    with spawn_child(server_main, 5.0, "echo") as (_, port):
        return latency_figures(asyncio.run(_echo_send_recv(port, n, size, budget_s)))


def reqrep(n: int, size: int, budget_s: float) -> dict[str, float]:
    with spawn_child(server_main) as (_, port):
        return latency_figures(asyncio.run(_reqrep(port, n, size, budget_s)))


def reconnect_ms(cuts: int) -> float:
    with spawn_child(server_main) as (_, port):
        return statistics.median(asyncio.run(_first_message_after_cut(port, cuts)))


def idle_session_kib(count: int) -> float:
    """Server RSS growth per idle, heartbeating session (KiB), `count` sessions (heartbeat 5 s)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count * 2 + 1024)), hard))
    with spawn_child(server_main) as (conn, port):

        async def run() -> float:
            conn.send("rss")
            before, _ = conn.recv()
            clients = await _idle_sessions(port, count)
            await asyncio.sleep(2.0)  # a heartbeat or so
            conn.send("rss")
            after, sessions = conn.recv()
            assert sessions >= count, f"only {sessions} of {count} sessions open"
            for c in clients:
                await c.abort()
            return (after - before) / count

        return asyncio.run(run())
