"""Frame layout: serializing gives these bytes, parsing them gives this frame."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from korinet.exceptions import (
    FrameTooLarge,
    LocalProtocolError,
    RemoteProtocolError,
    UnknownFrameType,
)
from korinet.wire.frames import (
    HEADER_SIZE,
    MAX_TYPE_NAME,
    PREFACE,
    Frame,
    FrameType,
    MessageFlags,
    MessageFrame,
    decode_message,
    decode_u64,
    encode_frame,
    encode_message,
    encode_u64,
)

# ---------------------------------------------------------------------- Frame


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (Frame(FrameType.PING, b"\x00" * 7 + b"\x2a"), b"\x00\x00\x00\x09\x06" + b"\x00" * 7 + b"\x2a"),
        (Frame(FrameType.ACK, encode_u64(258)), b"\x00\x00\x00\x09\x05\x00\x00\x00\x00\x00\x00\x01\x02"),
        (Frame(FrameType.CLOSE, b""), b"\x00\x00\x00\x01\x08"),
        (Frame(FrameType.HELLO, b"\x80"), b"\x00\x00\x00\x02\x01\x80"),
        (Frame(FrameType.PONG, b"x" * 300), b"\x00\x00\x01\x2d\x07" + b"x" * 300),
    ],
)
def test_frame_serializes_to_exact_bytes_and_parses_back(frame: Frame, wire: bytes) -> None:
    assert frame.serialize() == wire
    assert encode_frame(frame.type, frame.body) == wire
    length, ftype = Frame.parse_header(wire[:HEADER_SIZE], max_size=1024)
    assert (length, ftype) == (len(frame.body), frame.type)
    assert ftype is frame.type  # an enum member, not a bare int


def test_frame_type_values_are_the_documented_bytes() -> None:
    assert {t.name: int(t) for t in FrameType} == {
        "HELLO": 1,
        "WELCOME": 2,
        "MSG": 3,
        "RT": 4,
        "ACK": 5,
        "PING": 6,
        "PONG": 7,
        "CLOSE": 8,
        "CHALLENGE": 9,
        "AUTH": 10,
    }


def test_preface_is_kori_and_reads_as_an_absurd_legacy_length() -> None:
    assert PREFACE == b"KORI"
    assert struct.unpack(">I", PREFACE)[0] > 1024 * 1024 * 1024


def test_parse_header_accepts_exactly_the_limit() -> None:
    assert Frame.parse_header(struct.pack(">IB", 100, 6), max_size=100) == (99, FrameType.PING)


def test_parse_header_rejects_one_over_the_limit_with_data_in_attributes() -> None:
    with pytest.raises(FrameTooLarge) as info:
        Frame.parse_header(struct.pack(">IB", 101, 6), max_size=100)
    assert (info.value.length, info.value.limit) == (101, 100)
    assert isinstance(info.value, RemoteProtocolError)


def test_parse_header_rejects_zero_length() -> None:
    with pytest.raises(RemoteProtocolError, match="length 0"):
        Frame.parse_header(b"\x00\x00\x00\x00\x06", max_size=100)


@pytest.mark.parametrize("ftype", [0x00, 0x0B, 0x7F, 0xFF])
def test_parse_header_rejects_unknown_types(ftype: int) -> None:
    with pytest.raises(UnknownFrameType) as info:
        Frame.parse_header(struct.pack(">IB", 5, ftype), max_size=100)
    assert info.value.frame_type == ftype
    assert isinstance(info.value, RemoteProtocolError)


def test_size_is_checked_before_the_type() -> None:
    # A hostile length is the cheaper, surer verdict: FrameTooLarge even with a bad type.
    with pytest.raises(FrameTooLarge):
        Frame.parse_header(b"\xff\xff\xff\xff\x99", max_size=100)


# ---------------------------------------------------------------------- u64


@pytest.mark.parametrize("value", [0, 1, 255, 2**32, 2**64 - 1])
def test_u64_round_trip(value: int) -> None:
    wire = encode_u64(value)
    assert wire == value.to_bytes(8, "big")
    assert decode_u64(wire) == value


@pytest.mark.parametrize("body", [b"", b"\x00" * 7, b"\x00" * 9])
def test_u64_of_wrong_length_is_a_remote_error(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_u64(body)


# ---------------------------------------------------------------------- messages


def test_message_without_correlation_exact_bytes() -> None:
    wire = encode_message(FrameType.MSG, 1, 0, 0, "chat", b"\x81\xa1a\x01")
    body = b"\x00\x00\x00\x00\x00\x00\x00\x01" + b"\x00" + b"\x04chat" + b"\x81\xa1a\x01"
    assert wire == struct.pack(">IB", len(body) + 1, 3) + body
    assert decode_message(wire[HEADER_SIZE:]) == MessageFrame(1, 0, 0, "chat", b"\x81\xa1a\x01")


def test_message_with_correlation_exact_bytes() -> None:
    wire = encode_message(FrameType.MSG, 7, MessageFlags.REQUEST, 0x0102030405060708, "q", b"P")
    body = (
        b"\x00\x00\x00\x00\x00\x00\x00\x07" + b"\x01" + b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"\x01q" + b"P"
    )
    assert wire == struct.pack(">IB", len(body) + 1, 3) + body
    assert decode_message(wire[HEADER_SIZE:]) == MessageFrame(7, 1, 0x0102030405060708, "q", b"P")


CORR_FLAGS = MessageFlags.REQUEST | MessageFlags.REPLY | MessageFlags.REJECT


@pytest.mark.parametrize(
    "flags", [MessageFlags.REPLY, MessageFlags.REPLY | MessageFlags.ERROR, MessageFlags.REJECT]
)
def test_reply_and_reject_flags_carry_the_correlation_id(flags: int) -> None:
    wire = encode_message(FrameType.MSG, 2, flags, 99, "", b"")
    assert decode_message(wire[HEADER_SIZE:]).corr == 99
    assert len(wire) == HEADER_SIZE + 8 + 1 + 8 + 1


@pytest.mark.parametrize("flags", [MessageFlags.NONE, MessageFlags.ERROR, 0x10, 0xF4])
def test_correlation_id_is_not_written_without_a_flag_that_needs_it(flags: int) -> None:
    wire = encode_message(FrameType.MSG, 2, flags, 99, "t", b"")
    assert len(wire) == HEADER_SIZE + 8 + 1 + 1 + 1
    assert decode_message(wire[HEADER_SIZE:]).corr == 0


def test_realtime_frame_uses_type_rt_and_seq_zero() -> None:
    wire = encode_message(FrameType.RT, 0, 0, 0, "audio", b"\x00\x01")
    assert wire[4] == FrameType.RT
    assert decode_message(wire[HEADER_SIZE:]) == MessageFrame(0, 0, 0, "audio", b"\x00\x01")


def test_empty_type_name_and_payload() -> None:
    wire = encode_message(FrameType.MSG, 3, 0, 0, "", b"")
    assert wire == b"\x00\x00\x00\x0b\x03" + b"\x00" * 7 + b"\x03" + b"\x00" + b"\x00"
    assert decode_message(wire[HEADER_SIZE:]) == MessageFrame(3, 0, 0, "", b"")


def test_type_name_limit_counts_utf8_bytes() -> None:
    ok = "é" * 127 + "a"  # 255 bytes
    assert len(ok.encode()) == MAX_TYPE_NAME == 255
    wire = encode_message(FrameType.MSG, 1, 0, 0, ok, b"z")
    assert decode_message(wire[HEADER_SIZE:]).type == ok
    with pytest.raises(LocalProtocolError):
        encode_message(FrameType.MSG, 1, 0, 0, "é" * 128, b"z")  # 128 chars, 256 bytes
    with pytest.raises(LocalProtocolError):
        encode_message(FrameType.MSG, 1, 0, 0, "a" * 256, b"z")


@given(
    seq=st.integers(0, 2**64 - 1),
    flags=st.integers(0, 255),
    corr=st.integers(0, 2**64 - 1),
    mtype=st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255),
    payload=st.binary(max_size=200),
)
@settings(max_examples=200, deadline=None)
def test_message_round_trip(seq: int, flags: int, corr: int, mtype: str, payload: bytes) -> None:
    wire = encode_message(FrameType.MSG, seq, flags, corr, mtype, payload)
    (length,) = struct.unpack(">I", wire[:4])
    assert length == len(wire) - 4
    has_corr = bool(flags & CORR_FLAGS)
    expected = MessageFrame(seq, flags, corr if has_corr else 0, mtype, payload)
    assert decode_message(wire[HEADER_SIZE:]) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00" * 9,  # seq and flags, no type length
        b"\x00" * 8 + b"\x01" + b"\x00" * 8,  # REQUEST, corr, no type length
        b"\x00" * 8 + b"\x02" + b"\x00" * 3,  # REPLY, corr cut short
        b"\x00" * 8 + b"\x00" + b"\x05abc",  # type name shorter than announced
        b"\x00" * 8 + b"\x01" + b"\x00" * 8 + b"\xffab",
    ],
)
def test_truncated_message_bodies_are_remote_errors(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(body)


def test_every_truncation_before_the_payload_is_rejected() -> None:
    wire = encode_message(FrameType.MSG, 5, MessageFlags.REQUEST, 6, "type.name", b"payload")
    body = wire[HEADER_SIZE:]
    payload_start = len(body) - len(b"payload")
    for cut in range(payload_start):
        with pytest.raises(RemoteProtocolError):
            decode_message(body[:cut])
    # cutting into the payload leaves a shorter but well-formed message
    assert decode_message(body[: payload_start + 3]).payload == b"pay"


def test_type_name_that_is_not_utf8_is_a_remote_error() -> None:
    body = b"\x00" * 8 + b"\x00" + b"\x02\xff\xfe" + b"x"
    with pytest.raises(RemoteProtocolError, match="UTF-8"):
        decode_message(body)


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_decode_message_on_garbage_raises_only_remote_errors(body: bytes) -> None:
    try:
        m = decode_message(body)
    except RemoteProtocolError:
        return
    assert isinstance(m, MessageFrame)
    assert len(body) >= 10
