"""A loopback TCP relay that can cut every connection it carries, on demand.

It forwards bytes between clients and one upstream server, one thread per
accepted connection pair. ``cut()`` drops every pair at once (RST on both sides,
so neither end gets a clean EOF); ``cut(mid_frame=True)`` waits for the next
chunk of traffic in either direction, forwards only a prefix of it that ends
strictly inside a frame, then drops everything.

Frame boundaries are tracked per direction: both KoriNet wires frame as a
4-byte big-endian length followed by that many bytes, and the new wire's client
opens with a 4-byte ``KORI`` preface (``client_preface=4``).
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time

__all__ = ["FrameTracker", "Relay"]

_LINGER_RST = struct.pack("ii", 1, 0)


class FrameTracker:
    """Where the frame boundaries fall in one direction of a stream."""

    def __init__(self, preface: int = 0) -> None:
        self._mode = "preface" if preface else "header"
        self._need = preface  # bytes left in the preface or the body
        self._header = b""  # partial length prefix

    def interior_points(self, chunk: bytes) -> list[int]:
        """Offsets p in 1..len(chunk) after which the stream is inside a frame
        (or its preface); the tracker itself does not move."""
        saved = (self._mode, self._need, self._header)
        points = []
        for p in range(1, len(chunk) + 1):
            self.feed(chunk[p - 1 : p])
            if not (self._mode == "header" and self._header == b""):
                points.append(p)
        self._mode, self._need, self._header = saved
        return points

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._mode == "header":
                take = 4 - len(self._header)
                self._header += bytes(view[:take])
                view = view[take:]
                if len(self._header) == 4:
                    (self._need,) = struct.unpack("!I", self._header)
                    self._header = b""
                    if self._need:
                        self._mode = "body"
            else:
                take = min(self._need, len(view))
                self._need -= take
                view = view[take:]
                if self._need == 0:
                    self._mode = "header"


class _Pair:
    def __init__(self, relay: Relay, down: socket.socket, up: socket.socket) -> None:
        self.relay = relay
        self.down = down
        self.up = up
        self.trackers = {down: FrameTracker(relay.client_preface), up: FrameTracker(0)}
        self.dead = False
        self.thread = threading.Thread(target=self._pump, name="relay-pump", daemon=True)

    def kill(self) -> None:
        """Reset both sockets; the pump thread notices and exits."""
        if self.dead:
            return
        self.dead = True
        for s in (self.down, self.up):
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _pump(self) -> None:
        other = {self.down: self.up, self.up: self.down}
        try:
            while not self.dead and not self.relay.stopped.is_set():
                readable, _, _ = select.select([self.down, self.up], [], [], 0.2)
                for src in readable:
                    try:
                        chunk = src.recv(65536)
                    except OSError:
                        chunk = b""
                    if not chunk or self.dead:
                        return
                    if self.relay._mid_frame_armed():
                        points = self.trackers[src].interior_points(chunk)
                        if points and self.relay._claim_mid_frame():
                            other[src].sendall(chunk[: random.choice(points)])
                            self.relay._cut_now(mid_frame=True)
                            return
                    self.trackers[src].feed(chunk)
                    other[src].sendall(chunk)
                    self.relay.forwarded += len(chunk)
        except OSError:
            pass
        finally:
            self.kill()
            for s in (self.down, self.up):
                s.close()
            self.relay._forget(self)


class Relay:
    """Listen on 127.0.0.1 (a free port) and forward to ``upstream`` (from ``source``).

    Use as a context manager, or call ``start()`` and ``stop()``.
    """

    def __init__(self, upstream: tuple[str, int], *, client_preface: int = 4, source: str = "") -> None:
        self.upstream = upstream
        self.source = source  # the address the upstream sees (another loopback one: 127.0.0.2)
        self.client_preface = client_preface
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.forwarded = 0  # bytes forwarded, both directions
        self.cuts = 0
        self.mid_frame_cuts = 0
        self.accepted = 0
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._armed_since: float | None = None
        self._cut_done = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Relay:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self._thread.join(5)
        self.listener.close()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.kill()
        for pair in pairs:
            pair.thread.join(5)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self, *, mid_frame: bool = False, timeout: float = 2.0) -> bool:
        """Drop every connection; return whether the cut fell inside a frame.

        With ``mid_frame``, wait (up to ``timeout``) for traffic to cut through;
        if none comes, cut anyway, between frames.
        """
        if not mid_frame:
            self._cut_now(mid_frame=False)
            return False
        with self._lock:
            self._cut_done.clear()
            self._armed_since = time.monotonic()
        if self._cut_done.wait(timeout):
            return True
        with self._lock:
            armed = self._armed_since is not None
            self._armed_since = None
        if armed:
            self._cut_now(mid_frame=False)
            return False
        self._cut_done.wait(timeout)  # a pump claimed it just as we gave up
        return True

    def _mid_frame_armed(self) -> bool:
        with self._lock:
            return self._armed_since is not None

    def _claim_mid_frame(self) -> bool:
        """A pump takes the armed cut (only one can)."""
        with self._lock:
            armed, self._armed_since = self._armed_since is not None, None
            return armed

    def _cut_now(self, *, mid_frame: bool) -> None:
        with self._lock:
            self._armed_since = None
            pairs = list(self._pairs)
            self.cuts += 1
            if mid_frame:
                self.mid_frame_cuts += 1
        for pair in pairs:
            pair.kill()
        self._cut_done.set()

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)

    def _accept_loop(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                down, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(
                    self.upstream, timeout=5, source_address=(self.source, 0) if self.source else None
                )
            except OSError:
                down.close()
                continue
            for s in (down, up):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(self, down, up)
            with self._lock:
                self._pairs.add(pair)
                self.accepted += 1
            pair.thread.start()
