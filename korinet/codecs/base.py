"""The codec protocol: how application objects become message payloads."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Codec"]


@runtime_checkable
class Codec(Protocol):
    """Encodes application objects to bytes and back.

    ``name`` is what the handshake negotiates (docs/PROTOCOL.md §3.2); it must be
    ASCII and unique among installed codecs. ``encode`` and ``decode`` raise
    :class:`~korinet.exceptions.CodecError` on failure, never anything else.
    """

    name: str

    def encode(self, obj: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...
