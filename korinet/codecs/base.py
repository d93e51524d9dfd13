"""The codec protocol (how application objects become message payloads), and the
order in which a client offers the installed codecs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Protocol, runtime_checkable

__all__ = ["COMMON_GROUND", "Codec", "default_offer"]


@runtime_checkable
class Codec(Protocol):
    """Encodes application objects to bytes and back.

    ``name`` is what the handshake negotiates (docs/PROTOCOL.md §3.2); it must be
    ASCII and unique among installed codecs. ``encode`` and ``decode`` raise
    :class:`~korinet.exceptions.CodecError` on failure, never anything else.

    A codec may also declare ``preference: int`` (not part of the protocol, read
    with ``getattr``): clients offer installed codecs higher preference first
    (:func:`default_offer`); none declared counts as 0.
    """

    name: str

    def encode(self, obj: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


#: The built-in codecs, offered after every other one: msgpack is what every KoriNet
#: peer speaks, so an offer always ends on common ground; JSON is for text-only peers.
COMMON_GROUND: Final = ("msgpack", "json")


def default_offer(codecs: Mapping[str, Codec]) -> tuple[str, ...]:
    """The codec names a client offers when its ``SessionConfig.codecs`` is None.

    Every codec in ``codecs`` other than the built-ins, highest declared
    ``preference`` first (ties by name, so every process offers the same list), then
    msgpack, then JSON. Installing a codec plugin on both sides is thus enough for
    it to be used; a server without it answers with the next one it has.
    """
    extra = sorted(
        (c for name, c in codecs.items() if name not in COMMON_GROUND),
        key=lambda c: (-_preference(c), c.name),
    )
    return tuple(c.name for c in extra) + tuple(n for n in COMMON_GROUND if n in codecs)


def _preference(codec: Codec) -> int:
    value = getattr(codec, "preference", 0)
    return value if isinstance(value, int) else 0
