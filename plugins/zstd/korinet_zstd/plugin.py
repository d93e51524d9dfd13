"""The hook implementations KoriNet loads through the ``korinet`` entry point.

Kept cheap to import: every KoriNet process loads it. Settings come from the
environment because the codec is registered once per process, before any session:

* ``KORINET_ZSTD_LEVEL``: compression level (default 1);
* ``KORINET_ZSTD_MIN_SIZE``: smallest msgpack payload worth compressing (default 256);
* ``KORINET_ZSTD_MAX_OUTPUT``: the most bytes one payload may inflate to (default
  16 MiB, KoriNet's default maximum frame size; lower it with a lower
  ``SessionConfig.max_frame_size``).
"""

from __future__ import annotations

import os

from korinet import Codec, hookimpl

from .codec import DEFAULT_LEVEL, DEFAULT_MAX_OUTPUT, DEFAULT_MIN_SIZE, ZstdMsgpackCodec

__all__ = ["korinet_register_codecs"]


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None


@hookimpl
def korinet_register_codecs() -> list[Codec]:
    return [
        ZstdMsgpackCodec(
            level=_env_int("KORINET_ZSTD_LEVEL", DEFAULT_LEVEL),
            min_size=_env_int("KORINET_ZSTD_MIN_SIZE", DEFAULT_MIN_SIZE),
            max_output=_env_int("KORINET_ZSTD_MAX_OUTPUT", DEFAULT_MAX_OUTPUT),
        )
    ]
