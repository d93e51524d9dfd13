"""A receive buffer that yields whole frames (docs/PROTOCOL.md §2.1).

Memory is bounded: a header is checked against the limit as soon as its five bytes
are in, so a hostile length prefix costs nothing, and the buffer never holds more
than one maximum-size frame plus what the last read brought.
"""

from __future__ import annotations

from .frames import HEADER_SIZE, Frame, FrameType

__all__ = ["FrameDecoder"]


class FrameDecoder:
    """Accumulates bytes and parses frames out of them.

    Feed bytes with :meth:`feed`, then call :meth:`next_frame` until it returns
    ``None`` (more bytes needed). A malformed header raises a
    :class:`~korinet.exceptions.RemoteProtocolError`; the decoder is then unusable.
    """

    __slots__ = ("_buf", "_need", "_pos", "_type", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0
        self._need = 0  # body length of the frame whose header was parsed, or 0
        self._type: FrameType | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def take_rest(self) -> bytes:
        """Return and forget every unparsed byte (used when a link changes hands)."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def next_frame(self) -> Frame | None:
        buf = self._buf
        if self._type is None:
            if len(buf) - self._pos < HEADER_SIZE:
                self._compact()
                return None
            self._need, self._type = Frame.parse_header(
                bytes(buf[self._pos : self._pos + HEADER_SIZE]), self.max_size
            )
            self._pos += HEADER_SIZE
        end = self._pos + self._need
        if len(buf) < end:
            self._compact()
            return None
        frame = Frame(self._type, bytes(buf[self._pos : end]))
        self._pos = end
        self._type = None
        return frame

    def _compact(self) -> None:
        # Drop consumed bytes once they dominate, keeping del cheap on average.
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
