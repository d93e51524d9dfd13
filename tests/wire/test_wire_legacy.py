"""The legacy v2 wire of KoriNet 0.0.1, byte for byte."""

from __future__ import annotations

import itertools
import re
import struct

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from korinet.exceptions import CodecError, FrameTooLarge, RemoteProtocolError
from korinet.wire import legacy
from korinet.wire.legacy import LEGACY_ACK, LEGACY_MAX_BODY, V2Decoder, encode_v2, new_id

FIXED_ID = "0123456789abcdef0123456789abcdef"


def test_status_ack_exact_57_byte_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(legacy, "new_id", lambda: FIXED_ID)
    wire = encode_v2(LEGACY_ACK)
    expected = (
        b"\x00\x00\x00\x35"
        + b"\xa2"
        + b"\x64data"
        + b"\xa1\x67statusP\xf5"
        + b"\x62id"
        + b"\x78\x20"
        + FIXED_ID.encode()
    )
    assert len(expected) == 57
    assert wire == expected


def test_explicit_id_is_used_verbatim() -> None:
    assert encode_v2({"statusP": True}, FIXED_ID).endswith(FIXED_ID.encode())


def test_new_id_is_32_lowercase_hex_and_fresh() -> None:
    ids = {new_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_each_frame_gets_a_fresh_id() -> None:
    decoder = V2Decoder()
    decoder.feed(encode_v2(1) + encode_v2(1))
    first, second = decoder.next_entry(), decoder.next_entry()
    assert first is not None and second is not None
    assert first[0] == second[0] == 1
    assert first[1] != second[1]


def test_data_key_comes_before_id() -> None:
    body = encode_v2("x", FIXED_ID)[4:]
    assert list(cbor2.loads(body)) == ["data", "id"]


ENTRIES = [
    ({"cmd": "ls", "args": ["-l"]}, "a" * 32),
    ("text", "b" * 32),
    (b"\x00\x01binary", "c" * 32),
    ([1, 2.5, None, True], "d" * 32),
    ({"statusP": True}, "e" * 32),
]
STREAM = b"".join(encode_v2(data, mid) for data, mid in ENTRIES)


def drain(decoder: V2Decoder) -> list[tuple[object, object]]:
    out = []
    while (entry := decoder.next_entry()) is not None:
        out.append(entry)
    return out


def test_decoder_whole_stream() -> None:
    decoder = V2Decoder()
    decoder.feed(STREAM)
    assert drain(decoder) == ENTRIES


def test_decoder_byte_by_byte() -> None:
    decoder = V2Decoder()
    got = []
    for byte in STREAM:
        decoder.feed(bytes([byte]))
        got += drain(decoder)
    assert got == ENTRIES


@given(st.lists(st.integers(1, len(STREAM) - 1), unique=True, max_size=30))
@settings(max_examples=100, deadline=None)
def test_decoder_random_chunks(cuts: list[int]) -> None:
    decoder = V2Decoder()
    got = []
    bounds = [0, *sorted(cuts), len(STREAM)]
    for a, b in itertools.pairwise(bounds):
        decoder.feed(STREAM[a:b])
        got += drain(decoder)
    assert got == ENTRIES


def test_oversize_length_refused_from_the_prefix_alone() -> None:
    decoder = V2Decoder()
    decoder.feed(struct.pack("!I", LEGACY_MAX_BODY + 1))
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_entry()
    assert (info.value.length, info.value.limit) == (LEGACY_MAX_BODY + 1, 524288)


def test_four_gib_length_refused() -> None:
    decoder = V2Decoder()
    decoder.feed(b"\xff\xff\xff\xff")
    with pytest.raises(FrameTooLarge):
        decoder.next_entry()


def test_exactly_the_limit_waits_for_the_body() -> None:
    decoder = V2Decoder()
    decoder.feed(struct.pack("!I", LEGACY_MAX_BODY) + b"\xa1")
    assert decoder.next_entry() is None


def test_zero_length_is_a_remote_error() -> None:
    decoder = V2Decoder()
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError):
        decoder.next_entry()


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


@pytest.mark.parametrize(
    "body",
    [
        cbor2.dumps([1, 2, 3]),  # not a map
        cbor2.dumps("data"),
        cbor2.dumps({"id": "x"}),  # a map without data
        cbor2.dumps({}),
        b"\xff\xfe\xfd",  # not CBOR
        b"\xa2\x64da",  # CBOR cut short inside the frame
        b"\x1c",  # reserved additional info
    ],
)
def test_non_map_or_garbage_is_a_remote_error(body: bytes) -> None:
    decoder = V2Decoder()
    decoder.feed(frame(body))
    with pytest.raises(RemoteProtocolError):
        decoder.next_entry()


def test_entry_without_id_decodes_with_none() -> None:
    decoder = V2Decoder()
    decoder.feed(frame(cbor2.dumps({"data": 5})))
    assert decoder.next_entry() == (5, None)


@given(st.binary(min_size=1, max_size=100))
@settings(max_examples=300, deadline=None)
def test_garbage_bodies_raise_only_remote_errors(body: bytes) -> None:
    decoder = V2Decoder()
    decoder.feed(frame(body))
    try:
        entry = decoder.next_entry()
    except RemoteProtocolError:
        return
    assert entry is not None


def test_unencodable_data_is_a_codec_error() -> None:
    with pytest.raises(CodecError):
        encode_v2(object())


def test_oversize_data_is_refused_when_encoding() -> None:
    with pytest.raises(CodecError):
        encode_v2(b"x" * LEGACY_MAX_BODY)
    assert len(encode_v2(b"x" * (LEGACY_MAX_BODY - 100))) <= LEGACY_MAX_BODY + 4


def test_the_servers_ack_is_encode_v2_of_statusp_byte_for_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    # encode_v2_ack() splices a fresh id into a precomputed head instead of encoding
    monkeypatch.setattr(legacy, "new_id", lambda: FIXED_ID)
    assert legacy.encode_v2_ack() == encode_v2(LEGACY_ACK)


def test_every_ack_has_a_fresh_id() -> None:
    ids = set()
    for _ in range(100):
        wire = legacy.encode_v2_ack()
        (length,) = struct.unpack("!I", wire[:4])
        entry = cbor2.loads(wire[4:])
        assert length == len(wire) - 4
        assert entry["data"] == LEGACY_ACK
        assert re.fullmatch(r"[0-9a-f]{32}", entry["id"])
        ids.add(entry["id"])
    assert len(ids) == 100
