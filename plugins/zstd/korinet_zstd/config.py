"""Asking for the codec: a client offers only the codecs its SessionConfig lists."""

from __future__ import annotations

import dataclasses

from korinet import SessionConfig

from .codec import CODEC_NAME

__all__ = ["prefer_zstd"]


def prefer_zstd(config: SessionConfig | None = None) -> SessionConfig:
    """``config`` (default: the defaults) with ``zstd+msgpack`` first among its codecs.

    The server picks the first codec in the client's list that it has (docs/PROTOCOL.md
    §3.2), so a server without this plugin answers with the next one, msgpack.
    """
    config = config or SessionConfig()
    rest = tuple(name for name in config.codecs if name != CODEC_NAME)
    return dataclasses.replace(config, codecs=(CODEC_NAME, *rest))
