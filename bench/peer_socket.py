"""Raw blocking-socket baseline: 4-byte big-endian length + payload, ping-pong over
one TCP connection with TCP_NODELAY, the server echoing each frame. The least a
blocking request/response costs in Python: two sendall() and two recv loops per side.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from multiprocessing.connection import Connection

from benchutil import CHILD_MAX_S, DRAIN_S, LOOPBACK, Deadline, latency_figures, spawn_child, stop_requested

HDR = struct.Struct(">I")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("peer closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket) -> bytes:
    (length,) = HDR.unpack(_recv_exactly(sock, HDR.size))
    return _recv_exactly(sock, length)


def server_main(conn: Connection) -> None:
    lsock = socket.create_server((LOOPBACK, 0))
    lsock.settimeout(0.2)
    conn.send(lsock.getsockname()[1])
    deadline = Deadline(CHILD_MAX_S)
    while not deadline.expired() and not stop_requested(conn):
        try:
            sock, _ = lsock.accept()
        except TimeoutError:
            continue
        sock.settimeout(0.2)  # so a stop request is seen while the client is idle
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with sock:
            while not deadline.expired() and not stop_requested(conn):
                try:
                    body = _recv_frame(sock)
                except TimeoutError:
                    continue  # only between frames: the client sends each frame whole
                except ConnectionError:
                    break
                sock.sendall(HDR.pack(len(body)) + body)
    lsock.close()


def _round_trips(port: int, n: int, size: int, budget_s: float) -> list[int]:
    sock = socket.create_connection((LOOPBACK, port), timeout=DRAIN_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    frame = HDR.pack(size) + os.urandom(size)
    samples: list[int] = []
    with sock:
        deadline = Deadline(budget_s)
        warmup = min(100, max(n // 10, 1))
        for i in range(warmup + n):
            if deadline.expired():
                break
            t = time.perf_counter_ns()
            sock.sendall(frame)
            _recv_frame(sock)
            if i >= warmup:
                samples.append(time.perf_counter_ns() - t)
    return samples


def round_trip(n: int, size: int, budget_s: float) -> dict[str, float]:
    with spawn_child(server_main) as (_, port):
        return latency_figures(_round_trips(port, n, size, budget_s))
