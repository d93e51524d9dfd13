"""The ``zstd+msgpack`` codec: msgpack, then Zstandard above a size threshold.

The MSG frame has no flag for compression (its spare flag bits are reserved,
docs/PROTOCOL.md §2.3), so the payload carries its own one-byte marker:

    0x00 | msgpack bytes              small payloads, or ones zstd cannot shrink
    0x01 | one zstd frame of msgpack  everything else

Decompression is bounded: a frame that declares, or turns out to produce, more
than ``max_output`` bytes is a :class:`korinet.CodecError` before the memory is
spent, so a "zstd bomb" (a few KiB that inflate to gigabytes) ends the sender's
session with a protocol error instead of exhausting the receiver.
"""

from __future__ import annotations

import threading
from typing import Any, Final

import msgpack
import zstandard

from korinet import CodecError

__all__ = [
    "CODEC_NAME",
    "DEFAULT_LEVEL",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_MIN_SIZE",
    "MARK_RAW",
    "MARK_ZSTD",
    "ZstdMsgpackCodec",
]

CODEC_NAME: Final = "zstd+msgpack"
MARK_RAW: Final = 0x00
MARK_ZSTD: Final = 0x01
#: zstd's own default is 3; on command output level 1 compresses as well (0.247 of
#: the msgpack size against 0.248) in half the time (bench/plugins_zstd.py).
DEFAULT_LEVEL: Final = 1
#: Below this many msgpack bytes a payload is sent as is: a zstd frame costs ~10 bytes
#: of header and a few microseconds, and short chat lines rarely shrink.
DEFAULT_MIN_SIZE: Final = 256
#: The largest decompressed payload accepted: KoriNet's default maximum frame size
#: (SessionConfig.max_frame_size), so compression never lets a peer send more than it
#: could have sent uncompressed.
DEFAULT_MAX_OUTPUT: Final = 16 * 1024 * 1024

_RAW_PREFIX: Final = bytes([MARK_RAW])
_ZSTD_PREFIX: Final = bytes([MARK_ZSTD])


class ZstdMsgpackCodec:
    """msgpack (bytes kept apart from str, as KoriNet's msgpack codec) compressed
    with Zstandard when that pays.

    Args:
        level: zstd compression level (1 fastest ... 19 smallest; 1 by default).
        min_size: msgpack payloads shorter than this are not compressed.
        max_output: the most bytes one payload may decompress to.
    """

    name = CODEC_NAME
    #: Offered by default ahead of codecs with a lower preference (msgpack is always
    #: last): installing the plugin on both sides is enough for it to be used.
    preference = 20

    def __init__(
        self,
        level: int = DEFAULT_LEVEL,
        min_size: int = DEFAULT_MIN_SIZE,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> None:
        if max_output <= 0:
            raise ValueError("max_output must be positive")
        self.level = level
        self.min_size = min_size
        self.max_output = max_output
        # zstd contexts are not thread-safe, and the blocking facade may encode from
        # several threads: one pair per thread.
        self._local = threading.local()
        self._packer = threading.local()

    def __repr__(self) -> str:
        return f"<ZstdMsgpackCodec level={self.level} min_size={self.min_size} max_output={self.max_output}>"

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp: zstandard.ZstdCompressor | None = getattr(self._local, "comp", None)
        if comp is None:
            # the content size in the header lets the receiver refuse a bomb unread
            comp = self._local.comp = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec: zstandard.ZstdDecompressor | None = getattr(self._local, "dec", None)
        if dec is None:
            dec = self._local.dec = zstandard.ZstdDecompressor()
        return dec

    def encode(self, obj: Any) -> bytes:
        packer: msgpack.Packer | None = getattr(self._packer, "packer", None)
        if packer is None:
            packer = self._packer.packer = msgpack.Packer(use_bin_type=True)
        try:
            packed: bytes = packer.pack(obj)
        except (TypeError, ValueError, OverflowError) as exc:
            packer.reset()
            raise CodecError(f"msgpack cannot encode {type(obj).__name__}: {exc}") from exc
        if len(packed) < self.min_size:
            return _RAW_PREFIX + packed
        compressed = self._compressor().compress(packed)
        if len(compressed) >= len(packed):
            return _RAW_PREFIX + packed  # incompressible (already compressed media, random bytes)
        return _ZSTD_PREFIX + compressed

    def decode(self, data: bytes) -> Any:
        if not data:
            raise CodecError("empty zstd+msgpack payload (no marker byte)")
        mark = data[0]
        if mark == MARK_RAW:
            packed = data[1:]
        elif mark == MARK_ZSTD:
            packed = self.decompress(data[1:])
        else:
            raise CodecError(f"unknown zstd+msgpack marker byte 0x{mark:02x}")
        try:
            return msgpack.unpackb(packed, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises many unrelated types on garbage
            raise CodecError(f"invalid msgpack payload: {exc}") from exc

    def decompress(self, frame: bytes) -> bytes:
        """One zstd frame, at most :attr:`max_output` bytes of it.

        Raises:
            CodecError: not a zstd frame, corrupt, or larger than the limit.
        """
        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise CodecError(f"not a zstd frame: {exc}") from exc
        if declared > self.max_output:
            # refused on the header: nothing is allocated
            raise CodecError(
                f"zstd payload declares {declared} bytes, more than the limit of {self.max_output}"
            )
        try:
            # With a declared size zstd allocates exactly that (checked above) and fails
            # if the frame produces more; without one, max_output_size is the bound.
            out: bytes = self._decompressor().decompress(frame, max_output_size=self.max_output)
        except zstandard.ZstdError as exc:
            raise CodecError(
                f"zstd payload is corrupt or inflates past the limit of {self.max_output} bytes: {exc}"
            ) from exc
        return out
