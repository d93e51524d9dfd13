"""``protocol.v2(sock)``: framing only, byte-compatible with KoriNet 0.0.1.

No session, no reconnection, no acknowledgements: exactly what the original
README promises for the raw layer. The frame format is in korinet.wire.legacy.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

from ..exceptions import ConnectionClosedError, FrameTooLarge
from ..session import CloseCode
from ..wire.legacy import LEGACY_MAX_BODY, V2Decoder, encode_v2

__all__ = ["v2"]

_LEN = struct.Struct("!I")


class v2:  # noqa: N801 - the original API's name
    """Blocking v2 framing over a connected socket.

    ``recv()`` returns the frame's data; when the data is a dict it gains the
    frame's ``"id"``, as in the original (``giveID`` is accepted for compatibility).
    """

    def __init__(self, sock: socket.socket, maxSizeBuffer: int = LEGACY_MAX_BODY) -> None:  # noqa: N803
        self.sock = sock
        self.maxSizeBuffer = maxSizeBuffer
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()

    def send(self, obj: Any) -> None:
        frame = encode_v2(obj)
        with self._send_lock:
            self.sock.sendall(frame)

    def recv(self, giveID: bool = False) -> Any:  # noqa: N803
        with self._recv_lock:
            (length,) = _LEN.unpack(self._recv_exactly(4))
            if length > self.maxSizeBuffer:
                raise FrameTooLarge(length, self.maxSizeBuffer)
            decoder = V2Decoder(self.maxSizeBuffer)
            decoder.feed(_LEN.pack(length) + self._recv_exactly(length))
            entry = decoder.next_entry()
        assert entry is not None
        data, msg_id = entry
        if isinstance(data, dict):
            data["id"] = msg_id
        return data

    def _recv_exactly(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = self.sock.recv(min(size - len(chunks), 1 << 20))
            if not chunk:
                raise ConnectionClosedError(CloseCode.LINK_LOST, "the peer closed the connection")
            chunks += chunk
        return bytes(chunks)
