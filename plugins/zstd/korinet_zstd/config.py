"""Asking for the codec in a pinned list: a client whose SessionConfig lists its codecs
offers only those (by default, with ``codecs=None``, it offers every installed one)."""

from __future__ import annotations

import dataclasses

from korinet import SessionConfig

from .codec import CODEC_NAME

__all__ = ["prefer_zstd"]


def prefer_zstd(config: SessionConfig | None = None) -> SessionConfig:
    """``config`` (default: the defaults) with ``zstd+msgpack`` first among its codecs:
    a pinned list (msgpack, then json, when ``config`` pins none).

    The server picks the first codec in the client's list that it has (docs/PROTOCOL.md
    §3.2), so a server without this plugin answers with the next one, msgpack.
    """
    config = config or SessionConfig()
    rest = tuple(name for name in (config.codecs or ("msgpack", "json")) if name != CODEC_NAME)
    return dataclasses.replace(config, codecs=(CODEC_NAME, *rest))
