"""Raw asyncio baseline: 4-byte big-endian length + msgpack([seq, payload]) frames over
asyncio Protocols with TCP_NODELAY. The receiver sends an 8-byte big-endian cumulative
ack of the highest seq every ACK_EVERY frames and whenever its read buffer drains.

This is the floor any Python messaging library pays: what a page of hand-written
asyncio code gets with no reliability machinery beyond cumulative acks.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from multiprocessing.connection import Connection

import msgpack
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

HDR = struct.Struct(">I")
ACK = struct.Struct(">Q")


def encode(seq: int, payload: bytes) -> bytes:
    body: bytes = msgpack.packb((seq, payload))
    return HDR.pack(len(body)) + body


def split_frames(buf: bytearray) -> list[bytes]:
    """Pop every complete frame body off the front of buf."""
    bodies: list[bytes] = []
    off, end = 0, len(buf)
    while end - off >= HDR.size:
        (length,) = HDR.unpack_from(buf, off)
        if end - off - HDR.size < length:
            break
        start = off + HDR.size
        bodies.append(bytes(buf[start : start + length]))
        off = start + length
    del buf[:off]
    return bodies


def _nodelay(transport: asyncio.BaseTransport) -> None:
    # asyncio already sets it on TCP transports; say it explicitly since the figures depend on it.
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --------------------------------------------------------------------------- server


class _ServerProtocol(asyncio.Protocol):
    """mode "ack": cumulative acks; mode "echo": reply each frame with the same frame."""

    def __init__(self, mode: str, closed: asyncio.Future[None]) -> None:
        self.mode = mode
        self.closed = closed
        self.buf = bytearray()
        self.highest = 0
        self.unacked = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        _nodelay(transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        out: list[bytes] = []
        for body in split_frames(self.buf):
            seq, payload = msgpack.unpackb(body)
            if self.mode == "echo":
                out.append(encode(seq, payload))
                continue
            self.highest = seq
            self.unacked += 1
            if self.unacked >= ACK_EVERY:
                out.append(ACK.pack(seq))
                self.unacked = 0
        if self.unacked:  # read buffer drained: ack what we have so the sender never stalls
            out.append(ACK.pack(self.highest))
            self.unacked = 0
        if out:
            self.transport.writelines(out)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _serve(conn: Connection, mode: str) -> None:
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()
    server = await loop.create_server(lambda: _ServerProtocol(mode, closed), LOOPBACK, 0)
    conn.send(server.sockets[0].getsockname()[1])
    deadline = Deadline(CHILD_MAX_S)
    # One client per measurement: stop when it disconnects, the parent says so, or time's up.
    while not closed.done() and not deadline.expired() and not stop_requested(conn):
        await asyncio.wait({closed}, timeout=0.2)
    server.close()


def server_main(conn: Connection, mode: str) -> None:
    asyncio.run(_serve(conn, mode))


# --------------------------------------------------------------------------- client


class _ClientProtocol(asyncio.Protocol):
    """Tracks the highest cumulative ack (mode "ack") or the next echoed frame ("echo")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.buf = bytearray()
        self.acked = 0
        self.waiter: asyncio.Future[None] | None = None
        self.wait_for = 0  # wake the waiter once acked >= this
        self.replies = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        _nodelay(transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.mode == "echo":
            for body in split_frames(self.buf):
                msgpack.unpackb(body)  # decode the reply, as a real caller would
                self.replies += 1
            progress = self.replies
        else:
            whole = len(self.buf) - len(self.buf) % ACK.size
            if whole:
                # Acks are cumulative: only the last one in the chunk matters.
                (self.acked,) = ACK.unpack_from(self.buf, whole - ACK.size)
                del self.buf[:whole]
            progress = self.acked
        if self.waiter is not None and progress >= self.wait_for and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("server closed the connection"))

    async def until(self, target: int, timeout: float) -> None:
        """Wait until acked (or replies) reaches target."""
        current = self.replies if self.mode == "echo" else self.acked
        if current >= target:
            return
        self.wait_for = target
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.waiter, timeout)
        finally:
            self.waiter = None


async def _connect(port: int, mode: str) -> tuple[asyncio.Transport, _ClientProtocol]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(lambda: _ClientProtocol(mode), LOOPBACK, port)
    return transport, proto


async def _pipelined(port: int, n: int, size: int, budget_s: float) -> tuple[int, float]:
    """Send up to n frames keeping WINDOW unacked; returns (frames acked, seconds)."""
    transport, proto = await _connect(port, "ack")
    payload = os.urandom(size)
    try:
        transport.write(encode(1, payload))  # warm-up: connection up, both sides hot
        await proto.until(1, DRAIN_S)
        first = seq = 1
        deadline = Deadline(budget_s)
        t0 = time.perf_counter()
        while seq - first < n and not deadline.expired():
            room = min(WINDOW - (seq - proto.acked), n - (seq - first))
            if room > 0:
                # One write per loop turn: coalescing is what any sane sender does.
                frames = [encode(s, payload) for s in range(seq + 1, seq + 1 + room)]
                transport.writelines(frames)
                seq += room
            # Resume as soon as the window has at least ACK_EVERY free slots.
            await proto.until(min(seq, seq - WINDOW + ACK_EVERY), DRAIN_S)
        await proto.until(seq, DRAIN_S)
        return seq - first, time.perf_counter() - t0
    finally:
        transport.close()


async def _stop_and_wait(port: int, n: int, size: int, budget_s: float) -> tuple[int, float]:
    transport, proto = await _connect(port, "ack")
    payload = os.urandom(size)
    try:
        transport.write(encode(1, payload))
        await proto.until(1, DRAIN_S)
        deadline = Deadline(budget_s)
        done = 0
        t0 = time.perf_counter()
        while done < n and not deadline.expired():
            transport.write(encode(done + 2, payload))
            await proto.until(done + 2, DRAIN_S)
            done += 1
        return done, time.perf_counter() - t0
    finally:
        transport.close()


async def _reqrep(port: int, n: int, size: int, budget_s: float) -> list[int]:
    transport, proto = await _connect(port, "echo")
    payload = os.urandom(size)
    samples: list[int] = []
    try:
        deadline = Deadline(budget_s)
        warmup = min(100, max(n // 10, 1))
        for i in range(warmup + n):
            if deadline.expired():
                break
            t = time.perf_counter_ns()
            transport.write(encode(i, payload))
            await proto.until(i + 1, DRAIN_S)
            if i >= warmup:
                samples.append(time.perf_counter_ns() - t)
        return samples
    finally:
        transport.close()


async def _echo_round_trips(port: int, n: int, size: int, budget_s: float) -> tuple[int, float]:
    """Echo round trips one at a time, as many as fit: the raw stop-and-wait floor."""
    transport, proto = await _connect(port, "echo")
    payload = os.urandom(size)
    try:
        transport.write(encode(0, payload))
        await proto.until(1, DRAIN_S)
        deadline = Deadline(budget_s)
        done = 0
        t0 = time.perf_counter()
        while done < n and not deadline.expired():
            transport.write(encode(done + 1, payload))
            await proto.until(done + 2, DRAIN_S)
            done += 1
        return done, time.perf_counter() - t0
    finally:
        transport.close()


# --------------------------------------------------------------------------- figures


def pipelined(n: int, size: int, budget_s: float) -> tuple[int, float]:
    with spawn_child(server_main, "ack") as (_, port):
        return asyncio.run(_pipelined(port, n, size, budget_s))


def stop_and_wait(n: int, size: int, budget_s: float) -> tuple[int, float]:
    with spawn_child(server_main, "ack") as (_, port):
        return asyncio.run(_stop_and_wait(port, n, size, budget_s))


def reqrep(n: int, size: int, budget_s: float) -> dict[str, float]:
    with spawn_child(server_main, "echo") as (_, port):
        return latency_figures(asyncio.run(_reqrep(port, n, size, budget_s)))


def echo_round_trips(n: int, size: int, budget_s: float) -> tuple[int, float]:
    with spawn_child(server_main, "echo") as (_, port):
        return asyncio.run(_echo_round_trips(port, n, size, budget_s))
