"""Built-in codecs. They register through the same hook a third-party codec uses."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .base import Codec
from .json import JsonCodec
from .msgpack import MsgpackCodec

__all__ = ["Codec", "JsonCodec", "MsgpackCodec", "korinet_register_codecs"]


@hookimpl
def korinet_register_codecs() -> list[Codec]:
    return [MsgpackCodec(), JsonCodec()]
