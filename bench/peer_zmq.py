"""pyzmq peer.

Windowed and stop-and-wait figures use DEALER -> ROUTER with an application-level
cumulative ack (8-byte big-endian highest seq, every ACK_EVERY messages or when the
ROUTER's queue drains), since zmq itself gives no delivery confirmation.
Request/response latency uses plain REQ/REP. Bodies are msgpack([seq, payload]) like
the asyncio baseline, so the per-message encoding cost is the same.
"""

from __future__ import annotations

import os
import struct
import time
from multiprocessing.connection import Connection

import msgpack
import zmq
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

ACK = struct.Struct(">Q")
IDLE_POLL_MS = 100
# zmq's default high-water mark (1000) is below our window; raise it so the app
# window, not zmq, is what limits the sender.
HWM = 100_000


def _socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)  # never hang on close
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    return sock


# --------------------------------------------------------------------------- server


def _serve_acks(conn: Connection, sock: zmq.Socket[bytes], deadline: Deadline) -> None:
    ident = b""
    highest = unacked = 0
    while not deadline.expired():
        try:
            ident, body = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            if unacked:  # queue drained: ack now so the sender never stalls
                sock.send_multipart([ident, ACK.pack(highest)])
                unacked = 0
            if stop_requested(conn):
                return
            sock.poll(IDLE_POLL_MS)
            continue
        highest, _ = msgpack.unpackb(body)
        unacked += 1
        if unacked >= ACK_EVERY:
            sock.send_multipart([ident, ACK.pack(highest)])
            unacked = 0


def _serve_echo(conn: Connection, sock: zmq.Socket[bytes], deadline: Deadline) -> None:
    while not deadline.expired() and not stop_requested(conn):
        if sock.poll(IDLE_POLL_MS):
            seq, payload = msgpack.unpackb(sock.recv())
            sock.send(msgpack.packb((seq, payload)))


def server_main(conn: Connection, mode: str) -> None:
    """mode "ack": ROUTER with cumulative acks; mode "rep": REP echo."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = _socket(ctx, zmq.ROUTER if mode == "ack" else zmq.REP)
    try:
        conn.send(sock.bind_to_random_port(f"tcp://{LOOPBACK}"))
        deadline = Deadline(CHILD_MAX_S)
        if mode == "ack":
            _serve_acks(conn, sock, deadline)
        else:
            _serve_echo(conn, sock, deadline)
    finally:
        sock.close()
        ctx.term()


# --------------------------------------------------------------------------- client


class _AckedDealer:
    def __init__(self, port: int) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = _socket(self.ctx, zmq.DEALER)
        self.sock.connect(f"tcp://{LOOPBACK}:{port}")
        self.acked = 0

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def drain_acks(self) -> None:
        while True:
            try:
                (self.acked,) = ACK.unpack(self.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return

    def until(self, target: int) -> None:
        """Block (bounded) until the cumulative ack reaches target."""
        deadline = Deadline(DRAIN_S)
        self.drain_acks()
        while self.acked < target:
            if deadline.expired() or not self.sock.poll(int(deadline.remaining() * 1000) + 1):
                raise TimeoutError(f"ack {self.acked} < {target} after {DRAIN_S}s")
            self.drain_acks()

    def send(self, seq: int, payload: bytes) -> None:
        self.sock.send(msgpack.packb((seq, payload)))


def pipelined(n: int, size: int, budget_s: float) -> tuple[int, float]:
    with spawn_child(server_main, "ack") as (_, port):
        dealer = _AckedDealer(port)
        payload = os.urandom(size)
        try:
            dealer.send(1, payload)  # warm-up: connection up, both sides hot
            dealer.until(1)
            first = seq = 1
            deadline = Deadline(budget_s)
            t0 = time.perf_counter()
            while seq - first < n and not deadline.expired():
                room = min(WINDOW - (seq - dealer.acked), n - (seq - first))
                for _ in range(room):
                    seq += 1
                    dealer.send(seq, payload)
                    if seq % ACK_EVERY == 0:  # pick up acks while sending
                        dealer.drain_acks()
                dealer.until(min(seq, seq - WINDOW + ACK_EVERY))
            dealer.until(seq)
            return seq - first, time.perf_counter() - t0
        finally:
            dealer.close()


def stop_and_wait(n: int, size: int, budget_s: float) -> tuple[int, float]:
    with spawn_child(server_main, "ack") as (_, port):
        dealer = _AckedDealer(port)
        payload = os.urandom(size)
        try:
            dealer.send(1, payload)
            dealer.until(1)
            deadline = Deadline(budget_s)
            done = 0
            t0 = time.perf_counter()
            while done < n and not deadline.expired():
                dealer.send(done + 2, payload)
                dealer.until(done + 2)
                done += 1
            return done, time.perf_counter() - t0
        finally:
            dealer.close()


def reqrep(n: int, size: int, budget_s: float) -> dict[str, float]:
    with spawn_child(server_main, "rep") as (_, port):
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = _socket(ctx, zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, int(DRAIN_S * 1000))  # bounded: raises zmq.Again
        sock.connect(f"tcp://{LOOPBACK}:{port}")
        payload = os.urandom(size)
        samples: list[int] = []
        try:
            deadline = Deadline(budget_s)
            warmup = min(100, max(n // 10, 1))
            for i in range(warmup + n):
                if deadline.expired():
                    break
                t = time.perf_counter_ns()
                sock.send(msgpack.packb((i, payload)))
                msgpack.unpackb(sock.recv())
                if i >= warmup:
                    samples.append(time.perf_counter_ns() - t)
            return latency_figures(samples)
        finally:
            sock.close()
            ctx.term()
