"""A JSON codec, for peers that prefer text. Bytes are not representable."""

from __future__ import annotations

import json
from typing import Any

from ..exceptions import CodecError

__all__ = ["JsonCodec"]


class JsonCodec:
    name = "json"

    def encode(self, obj: Any) -> bytes:
        try:
            return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
            raise CodecError(f"JSON cannot encode {type(obj).__name__}: {exc}") from exc

    def decode(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise CodecError(f"invalid JSON payload: {exc}") from exc
