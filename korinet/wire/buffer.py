"""A receive buffer that yields whole frames (docs/PROTOCOL.md §2.1).

Memory is bounded: a header is checked against the limit as soon as its five bytes
are in, so a hostile length prefix costs nothing, and the buffer never holds more
than one maximum-size frame plus what the last read brought.
"""

from __future__ import annotations

from collections.abc import Iterator

from .frames import _HEADER, _KNOWN_TYPES, HEADER_SIZE, Frame, FrameType

__all__ = ["WHOLE_FRAMES_MAX", "FrameDecoder"]

#: Most frames :meth:`FrameDecoder.whole_frames` takes from one read; a read with
#: more (a pipelined stream's) goes through the buffer without a second scan.
WHOLE_FRAMES_MAX = 4


class FrameDecoder:
    """Accumulates bytes and parses frames out of them.

    Feed bytes with :meth:`feed`, then iterate :meth:`frames` (the fast path, used
    by the session) or call :meth:`next_frame` until it returns ``None``; a read
    that holds only whole frames, a few, may skip the buffer (:meth:`whole_frames`). A
    malformed header raises a :class:`~korinet.exceptions.RemoteProtocolError`
    after every complete frame before it was yielded; the decoder is then unusable.
    """

    __slots__ = ("_buf", "_pos", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]  # O(1) at the front of a CPython bytearray
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def whole_frames(self, data: bytes) -> list[tuple[int, bytes]] | None:
        """``[(type, body), ...]`` when nothing is buffered and ``data`` is exactly
        one to WHOLE_FRAMES_MAX valid frames (a request-response exchange's every
        read: a message, an ACK, or both), without copying them through the buffer;
        otherwise None, and the caller feeds ``data``."""
        size = len(data)
        if self._pos != len(self._buf) or size < HEADER_SIZE:
            return None
        unpack = _HEADER.unpack_from
        limit = self.max_size
        found: list[tuple[int, bytes]] = []
        pos = 0
        while True:
            length, ftype = unpack(data, pos)
            end = pos + 4 + length
            if end > size or length > limit or length == 0 or ftype not in _KNOWN_TYPES:
                return None
            found.append((ftype, data[pos + HEADER_SIZE : end]))
            if end == size:
                return found
            if size - end < HEADER_SIZE or len(found) == WHOLE_FRAMES_MAX:
                return None
            pos = end

    def take_rest(self) -> bytes:
        """Return and forget every unparsed byte (used when a link changes hands)."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def frames(self) -> Iterator[tuple[int, bytes]]:
        """Yield ``(type, body)`` for every complete frame buffered (§2.1).

        Each header is checked against the limit as soon as its five bytes are in,
        so an oversized frame is refused before its body arrives.
        """
        buf = self._buf
        size = len(buf)
        pos = self._pos
        unpack = _HEADER.unpack_from
        limit = self.max_size
        known = _KNOWN_TYPES
        while size - pos >= HEADER_SIZE:
            length, ftype = unpack(buf, pos)
            if length > limit or length == 0 or ftype not in known:
                Frame.parse_header(bytes(buf[pos : pos + HEADER_SIZE]), limit)  # raises the typed error
            end = pos + 4 + length
            if end > size:
                return
            body = bytes(buf[pos + HEADER_SIZE : end])
            pos = self._pos = end
            yield ftype, body

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        for ftype, body in self.frames():
            return Frame(FrameType(ftype), body)
        return None
