"""korinet-zstd: the ``zstd+msgpack`` codec for KoriNet.

Install it on both sides: clients offer it by default, before msgpack; a server
that lacks it makes the session fall back to msgpack in the handshake
(docs/PROTOCOL.md §3.2). :func:`prefer_zstd` puts it first in a pinned list.
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
