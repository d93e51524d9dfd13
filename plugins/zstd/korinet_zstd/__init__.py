"""korinet-zstd: the ``zstd+msgpack`` codec for KoriNet.

Install it on both sides and list it first in the client's codecs
(:func:`prefer_zstd`); a server that lacks it makes the session fall back to
msgpack in the handshake (docs/PROTOCOL.md §3.2).
"""

from __future__ import annotations

from .codec import CODEC_NAME, DEFAULT_LEVEL, DEFAULT_MAX_OUTPUT, DEFAULT_MIN_SIZE, ZstdMsgpackCodec
from .config import prefer_zstd

__all__ = [
    "CODEC_NAME",
    "DEFAULT_LEVEL",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_MIN_SIZE",
    "ZstdMsgpackCodec",
    "prefer_zstd",
]
