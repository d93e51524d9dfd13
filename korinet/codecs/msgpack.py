"""The default codec: msgpack, with bytes kept apart from str."""

from __future__ import annotations

from typing import Any

import msgpack

from ..exceptions import CodecError

__all__ = ["MsgpackCodec"]


class MsgpackCodec:
    name = "msgpack"

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)

    def encode(self, obj: Any) -> bytes:
        try:
            data: bytes = self._packer.pack(obj)
        except (TypeError, ValueError, OverflowError) as exc:
            raise CodecError(f"msgpack cannot encode {type(obj).__name__}: {exc}") from exc
        return data

    def decode(self, data: bytes) -> Any:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises many unrelated types on garbage
            raise CodecError(f"invalid msgpack payload: {exc}") from exc
