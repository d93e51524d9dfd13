"""A blocking server's peer that speaks the original KoriNet v2 wire (docs/PROTOCOL.md §9).

The rules are those of :class:`korinet.runtime.legacy.LegacyPeer`: the original is
stop-and-wait, so a frame is acknowledged (``statusP``) only when the application
takes it, and the frame that arrives while one of our sends waits is that send's
acknowledgement. There is no session, no heartbeat and nothing to resume: the
socket is read only while the application waits in recv() or send(), in its thread.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from typing import Any

from ..exceptions import (
    ConnectionClosedError,
    ConnectionClosedOK,
    KoriNetError,
    KoriNetTimeout,
    RemoteProtocolError,
)
from ..messages import Message
from ..session import CloseCode
from ..wire.legacy import LEGACY_IDLE_TIMEOUT, V2Decoder, encode_v2, encode_v2_ack
from .driver import set_socket_timeout

__all__ = ["SyncLegacyPeer"]

logger = logging.getLogger(__name__)

#: Bytes asked of the kernel per read.
READ_SIZE = 64 * 1024


class SyncLegacyPeer:
    """``recv_message()``/``send()``/``close()`` over a v2 connection, blocking."""

    session_id = None
    identity = None

    def __init__(
        self, sock: socket.socket, peername: str, leftover: bytes, accept_plain: bool = True
    ) -> None:
        # A blocking socket whose waits SO_RCVTIMEO bounds: one system call per read
        # (a Python timeout would poll() before every recv()), as the original reads.
        sock.setblocking(True)
        set_socket_timeout(sock, socket.SO_SNDTIMEO, LEGACY_IDLE_TIMEOUT)  # a peer that never reads
        self.sock = sock
        self._rcvtimeo = 0.0  # SO_RCVTIMEO now (0.0: none)
        self.peername = peername
        self.accept_plain = accept_plain
        self._decoder = V2Decoder()
        self._decoder.feed(leftover)
        self._inbox: deque[Message] = deque()
        self._lock = threading.Lock()  # v2 is stop-and-wait: one call reads at a time
        self._ended: KoriNetError | None = None

    def __repr__(self) -> str:
        return f"<SyncLegacyPeer {self.peername}>"

    @property
    def is_closed(self) -> bool:
        return self._ended is not None

    @property
    def is_connected(self) -> bool:
        return self._ended is None

    def _end(self, error: KoriNetError) -> KoriNetError:
        if self._ended is None:
            self._ended = error
            self.sock.close()
        return self._ended

    def _next_entry(self, timeout: float | None) -> tuple[Any, Any]:
        """(lock held) The next v2 frame, read within ``timeout`` (None: until the peer
        has been silent for LEGACY_IDLE_TIMEOUT, which ends the connection)."""
        try:
            while (entry := self._decoder.next_entry()) is None:
                wait = LEGACY_IDLE_TIMEOUT if timeout is None else timeout
                flags = 0
                if wait < 1e-3:
                    flags = socket.MSG_DONTWAIT  # (SO_RCVTIMEO 0 would wait forever)
                elif wait != self._rcvtimeo:
                    set_socket_timeout(self.sock, socket.SO_RCVTIMEO, wait)
                    self._rcvtimeo = wait
                try:
                    data = self.sock.recv(READ_SIZE, flags)
                except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO passed (EAGAIN)
                    if timeout is not None:
                        raise KoriNetTimeout("timed out waiting for a message") from None
                    logger.info("%r: silent for %.0fs, closing", self, LEGACY_IDLE_TIMEOUT)
                    raise self._end(
                        ConnectionClosedError(CloseCode.LINK_LOST, "the peer went silent")
                    ) from None
                except OSError as exc:
                    raise self._end(
                        ConnectionClosedError(CloseCode.LINK_LOST, f"connection lost: {exc}")
                    ) from exc
                if not data:
                    raise self._end(ConnectionClosedError(CloseCode.LINK_LOST, "connection lost"))
                self._decoder.feed(data)
        except RemoteProtocolError as exc:
            logger.warning("%r: %s", self, exc)
            raise self._end(exc) from None
        return entry

    def _write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise self._end(ConnectionClosedError(CloseCode.LINK_LOST, f"connection lost: {exc}")) from exc

    def recv_message(self, timeout: float | None = None) -> Message:
        """Take the next message and acknowledge it (statusP), as v2 expects."""
        with self._lock:
            if not self._inbox:
                if self._ended is not None:
                    raise self._ended
                obj, msg_id = self._next_entry(timeout)
                self._inbox.append(Message("", obj, 0, 0, self, id=str(msg_id)))
            msg = self._inbox.popleft()
            self._write(encode_v2_ack())
            return msg

    def recv(self, timeout: float | None = None) -> Any:
        return self.recv_message(timeout).data

    def send(self, obj: Any, type: str = "") -> None:
        """Send ``obj``; return once the peer acknowledged it (its next frame)."""
        if type:
            raise KoriNetError("a legacy v2 peer cannot receive typed messages")
        with self._lock:
            if self._ended is not None:
                raise self._ended
            self._write(encode_v2(obj))
            ack, _ = self._next_entry(None)
            if not (isinstance(ack, dict) and ack.get("statusP") is True):
                raise self._end(RemoteProtocolError(f"expected a v2 acknowledgement, got {ack!r}"))

    def close(self, reason: str = "") -> None:
        self._end(ConnectionClosedOK(CloseCode.NORMAL, reason or "closed"))
