"""The legacy v2 wire of KoriNet 0.0.1 (docs/PROTOCOL.md §9), byte for byte.

A frame is a 4-byte big-endian length and a CBOR map ``{"data": obj, "id": hex}``
(keys in that order, id = 32 lowercase hex characters, fresh for every frame).
The receiver of a data frame answers with ``{"statusP": True}`` framed the same
way. Bodies over 512 KiB were refused by the original; so are they here.
"""

from __future__ import annotations

import secrets
import struct
from typing import Any, Final

import cbor2

from ..exceptions import CodecError, FrameTooLarge, RemoteProtocolError

__all__ = [
    "LEGACY_ACK",
    "LEGACY_IDLE_TIMEOUT",
    "LEGACY_MAX_BODY",
    "V2Decoder",
    "encode_v2",
    "encode_v2_ack",
    "new_id",
]

LEGACY_MAX_BODY: Final = 524288
LEGACY_ACK: Final = {"statusP": True}
#: A v2 peer has no heartbeat; a server drops one silent this long.
LEGACY_IDLE_TIMEOUT: Final = 600.0
_LEN = struct.Struct("!I")


def new_id() -> str:
    return secrets.token_hex(16)


def encode_v2(data: Any, msg_id: str | None = None) -> bytes:
    """One v2 frame carrying ``data``."""
    try:
        body = cbor2.dumps({"data": data, "id": msg_id or new_id()})
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise CodecError(f"CBOR cannot encode {type(data).__name__}: {exc}") from exc
    if len(body) > LEGACY_MAX_BODY:
        raise CodecError(f"v2 frame body of {len(body)} bytes exceeds {LEGACY_MAX_BODY}")
    return _LEN.pack(len(body)) + body


def encode_v2_ack() -> bytes:
    """``encode_v2(LEGACY_ACK)``, the frame a server writes for every message it takes,
    without running the CBOR encoder: only its id changes, and it is the last field."""
    return _ACK_HEAD + new_id().encode()


_ACK_HEAD: Final = encode_v2(LEGACY_ACK, "0" * 32)[:-32]


class V2Decoder:
    """Feed bytes, take ``(data, id)`` pairs. Bad input raises RemoteProtocolError."""

    def __init__(self, max_body: int = LEGACY_MAX_BODY) -> None:
        self.max_body = max_body
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_entry(self) -> tuple[Any, Any] | None:
        if len(self._buf) < 4:
            return None
        (length,) = _LEN.unpack_from(self._buf)
        if length > self.max_body:
            raise FrameTooLarge(length, self.max_body)
        if length == 0:
            raise RemoteProtocolError("empty v2 frame")
        if len(self._buf) < 4 + length:
            return None
        body = bytes(self._buf[4 : 4 + length])
        del self._buf[: 4 + length]
        try:
            entry = cbor2.loads(body)
        except Exception as exc:  # cbor2 raises several types on garbage
            raise RemoteProtocolError(f"invalid CBOR in a v2 frame: {exc}") from exc
        if not isinstance(entry, dict) or "data" not in entry:
            raise RemoteProtocolError("a v2 frame must be a map with a 'data' key")
        return entry["data"], entry.get("id")
