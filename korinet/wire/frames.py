"""Frame layout (docs/PROTOCOL.md §2).

Every frame is ``length:u32be | type:u8 | body``, where ``length`` counts the type
byte and the body. A connection starts with the client's 4-byte preface ``KORI``,
which can never be a sane legacy-v2 length prefix (it reads as 1.2 GiB), so a server
tells the two wires apart from the first four bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from ..exceptions import (
    FrameTooLarge,
    LocalProtocolError,
    RemoteProtocolError,
    UnknownFrameType,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "PREFACE",
    "Frame",
    "FrameType",
    "MessageFlags",
    "MessageFrame",
    "decode_message",
    "decode_u64",
    "encode_frame",
    "encode_message",
    "encode_u64",
]

PREFACE: Final = b"KORI"
HEADER_SIZE: Final = 5
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024
MAX_TYPE_NAME: Final = 255
U64_MAX: Final = 2**64 - 1

_HEADER = struct.Struct(">IB")
_U64 = struct.Struct(">Q")
_MSG_HEAD = struct.Struct(">QB")  # seq, flags
_CORR = struct.Struct(">Q")


class FrameType(enum.IntEnum):
    """The type byte of a frame (docs/PROTOCOL.md §2.2)."""

    HELLO = 0x01
    WELCOME = 0x02
    MSG = 0x03
    RT = 0x04
    ACK = 0x05
    PING = 0x06
    PONG = 0x07
    CLOSE = 0x08
    CHALLENGE = 0x09  # server -> client: prove the passphrase (§3.4)
    AUTH = 0x0A  # client -> server: the proof


_KNOWN_TYPES: Final = frozenset(int(t) for t in FrameType)


class MessageFlags(enum.IntFlag):
    """Flags of a MSG or RT frame (docs/PROTOCOL.md §2.3)."""

    NONE = 0
    REQUEST = 0x01  # a correlation id follows; the peer answers with REPLY
    REPLY = 0x02  # a correlation id follows; answers the request with that id
    ERROR = 0x04  # with REPLY: the request failed, the payload is {"error": reason}
    REJECT = 0x08  # rejects the message whose seq (or request id) is the correlation id


_HAS_CORR: Final = int(MessageFlags.REQUEST | MessageFlags.REPLY | MessageFlags.REJECT)


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame: its type and its body (the bytes after the type byte)."""

    type: FrameType
    body: bytes

    def serialize(self) -> bytes:
        return encode_frame(self.type, self.body)

    @classmethod
    def parse_header(cls, header: bytes, max_size: int) -> tuple[int, FrameType]:
        """Check a 5-byte header and return ``(body_length, type)``.

        Raises:
            FrameTooLarge: the length exceeds ``max_size`` (checked before any allocation).
            RemoteProtocolError: the length is zero.
            UnknownFrameType: the type byte is not defined.
        """
        length, ftype = _HEADER.unpack(header)
        if length > max_size:
            raise FrameTooLarge(length, max_size)
        if length == 0:
            raise RemoteProtocolError("frame length 0 (a frame has at least its type byte)")
        if ftype not in _KNOWN_TYPES:
            raise UnknownFrameType(ftype)
        return length - 1, FrameType(ftype)


@dataclass(frozen=True, slots=True)
class MessageFrame:
    """The decoded body of a MSG (``seq`` > 0) or RT (``seq`` == 0) frame."""

    seq: int
    flags: int
    corr: int
    type: str
    payload: bytes


def encode_frame(ftype: int, body: bytes) -> bytes:
    return _HEADER.pack(len(body) + 1, ftype) + body


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(body: bytes) -> int:
    if len(body) != 8:
        raise RemoteProtocolError(f"expected an 8-byte integer, got {len(body)} bytes")
    value: int = _U64.unpack(body)[0]
    return value


def encode_message(ftype: int, seq: int, flags: int, corr: int, mtype: str, payload: bytes) -> bytes:
    """Serialize a whole MSG/RT frame, header included (docs/PROTOCOL.md §2.3)."""
    tname = mtype.encode()
    if len(tname) > MAX_TYPE_NAME:
        raise LocalProtocolError(f"message type name longer than {MAX_TYPE_NAME} bytes")
    head = _MSG_HEAD.pack(seq, flags)
    if flags & _HAS_CORR:
        head += _CORR.pack(corr)
    body_len = len(head) + 1 + len(tname) + len(payload)
    return b"".join((_HEADER.pack(body_len + 1, ftype), head, bytes((len(tname),)), tname, payload))


def decode_message(body: bytes) -> MessageFrame:
    """Parse the body of a MSG/RT frame.

    Raises:
        RemoteProtocolError: the body is truncated or the type name is not UTF-8.
    """
    if len(body) < 10:
        raise RemoteProtocolError("message frame truncated")
    seq, flags = _MSG_HEAD.unpack_from(body)
    pos = 9
    corr = 0
    if flags & _HAS_CORR:
        if len(body) < pos + 9:
            raise RemoteProtocolError("message frame truncated in its correlation id")
        corr = _CORR.unpack_from(body, pos)[0]
        pos += 8
    tlen = body[pos]
    pos += 1
    if len(body) < pos + tlen:
        raise RemoteProtocolError("message frame truncated in its type name")
    try:
        mtype = body[pos : pos + tlen].decode() if tlen else ""
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("message type name is not UTF-8") from exc
    return MessageFrame(seq, flags, corr, mtype, body[pos + tlen :])
