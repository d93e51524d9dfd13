"""The zstd+msgpack codec as pure code: round trips, the size threshold, and bombs."""

from __future__ import annotations

import random
import tracemalloc

import msgpack
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from korinet_zstd import ZstdMsgpackCodec
from korinet_zstd.codec import MARK_RAW, MARK_ZSTD

from korinet import CodecError

LOG_LINES = "".join(
    f"root {1000 + i} 0.0 0.1 123456 7890 ? S 10:{i % 60:02d} 0:00 /usr/sbin/daemon --worker {i}\n"
    for i in range(200)
)


def test_short_payloads_go_uncompressed() -> None:
    codec = ZstdMsgpackCodec()
    payload = codec.encode({"nick": "ana", "text": "hi there"})
    assert payload[0] == MARK_RAW
    assert payload[1:] == msgpack.packb({"nick": "ana", "text": "hi there"}, use_bin_type=True)
    assert codec.decode(payload) == {"nick": "ana", "text": "hi there"}


def test_command_output_is_compressed_and_comes_back_equal() -> None:
    codec = ZstdMsgpackCodec()
    obj = {"stream": "stdout", "data": LOG_LINES.encode()}
    payload = codec.encode(obj)
    assert payload[0] == MARK_ZSTD
    assert len(payload) < len(LOG_LINES) / 4
    assert codec.decode(payload) == obj


def test_incompressible_payloads_stay_raw() -> None:
    codec = ZstdMsgpackCodec()
    data = random.Random(1).randbytes(4096)  # zstd would only add its header
    payload = codec.encode(data)
    assert payload[0] == MARK_RAW
    assert len(payload) == 1 + 3 + len(data)  # marker + msgpack bin16 header
    assert codec.decode(payload) == data


def test_threshold_is_configurable() -> None:
    assert ZstdMsgpackCodec(min_size=0).encode("a" * 100)[0] == MARK_ZSTD
    assert ZstdMsgpackCodec(min_size=10_000).encode("a" * 5000)[0] == MARK_RAW


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
        max_leaves=30,
    )
)
def test_round_trip_keeps_bytes_and_str_apart(obj: object) -> None:
    codec = ZstdMsgpackCodec(min_size=0)  # compress everything, to exercise both paths
    assert codec.decode(codec.encode(obj)) == obj


def test_unencodable_object_is_a_codec_error_and_the_codec_still_works() -> None:
    codec = ZstdMsgpackCodec()
    with pytest.raises(CodecError, match="set"):
        codec.encode({"a": {1, 2}})
    assert codec.decode(codec.encode([1, 2])) == [1, 2]


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"", "marker"),
        (b"\x07abc", "marker byte 0x07"),
        (b"\x01not zstd at all", "zstd"),
        (b"\x00\xc1", "msgpack"),
    ],
)
def test_garbage_is_a_codec_error(payload: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        ZstdMsgpackCodec().decode(payload)


def test_truncated_frame_is_a_codec_error() -> None:
    codec = ZstdMsgpackCodec()
    payload = codec.encode(LOG_LINES)
    with pytest.raises(CodecError):
        codec.decode(payload[: len(payload) // 2])


def _bomb(size: int, *, declare_size: bool) -> bytes:
    """A zstd frame of ``size`` zero bytes, made without holding them in memory."""
    comp = zstandard.ZstdCompressor(level=1, write_content_size=declare_size)
    chunk = bytes(1 << 20)
    if declare_size:
        obj = comp.compressobj(size=size)
    else:
        obj = comp.compressobj()
    parts = [obj.compress(chunk) for _ in range(size // len(chunk))]
    parts.append(obj.flush())
    return b"".join(parts)


@pytest.mark.parametrize("declare_size", [True, False], ids=["declared", "undeclared"])
def test_a_zstd_bomb_is_refused_without_spending_its_memory(declare_size: bool) -> None:
    limit = 1 << 20
    bomb = bytes([MARK_ZSTD]) + _bomb(256 << 20, declare_size=declare_size)
    assert len(bomb) < 64 * 1024  # 256 MiB of zeros in a few KiB
    codec = ZstdMsgpackCodec(max_output=limit)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="limit"):
            codec.decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit, f"decoding the bomb allocated {peak} bytes"


def test_a_frame_lying_about_its_size_is_refused() -> None:
    # A header declaring 100 bytes for a frame producing 2 MiB: zstd itself catches it.
    real = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(2 << 20))
    liar = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(100))
    header_len = len(liar) - len(zstandard.ZstdCompressor(write_content_size=False).compress(bytes(100)))
    forged = liar[:header_len] + real[header_len - 1 :]  # best effort: any corruption must be refused
    codec = ZstdMsgpackCodec(max_output=1 << 20)
    with pytest.raises(CodecError):
        codec.decode(bytes([MARK_ZSTD]) + forged)


def test_exactly_the_limit_is_accepted() -> None:
    codec = ZstdMsgpackCodec(max_output=10_000)
    obj = b"x" * (10_000 - 3)  # msgpack bin16: 3 bytes of header
    payload = codec.encode(obj)
    assert payload[0] == MARK_ZSTD
    assert codec.decode(payload) == obj
    with pytest.raises(CodecError, match="limit"):
        codec.decode(ZstdMsgpackCodec(max_output=20_000).encode(b"x" * 10_001))


def test_max_output_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ZstdMsgpackCodec(max_output=0)
