"""A receive buffer that yields whole frames (docs/PROTOCOL.md §2.1).

Memory is bounded: a header is checked against the limit as soon as its five bytes
are in, so a hostile length prefix costs nothing, and the buffer never holds more
than one maximum-size frame plus what the last read brought.
"""

from __future__ import annotations

from collections.abc import Iterator

from .frames import _HEADER, _KNOWN_TYPES, HEADER_SIZE, Frame, FrameType

__all__ = ["FrameDecoder"]


class FrameDecoder:
    """Accumulates bytes and parses frames out of them.

    Feed bytes with :meth:`feed`, then iterate :meth:`frames` (the fast path, used
    by the session) or call :meth:`next_frame` until it returns ``None``; a read
    that holds exactly one frame may skip the buffer (:meth:`whole_frame`). A
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

    def whole_frame(self, data: bytes) -> tuple[int, bytes] | None:
        """``(type, body)`` when nothing is buffered and ``data`` is exactly one valid
        frame (the common case of a request-response exchange), without copying it
        through the buffer; otherwise None, and the caller feeds ``data``."""
        if self._pos != len(self._buf) or len(data) < HEADER_SIZE:
            return None
        length, ftype = _HEADER.unpack_from(data)
        if length + 4 != len(data) or length > self.max_size or ftype not in _KNOWN_TYPES:
            return None  # (a zero length cannot match: len(data) >= HEADER_SIZE)
        return ftype, data[HEADER_SIZE:]

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
