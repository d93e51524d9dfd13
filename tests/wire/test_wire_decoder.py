"""FrameDecoder: whole frames out of arbitrarily split bytes, bounded memory."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from korinet.exceptions import FrameTooLarge, RemoteProtocolError, UnknownFrameType
from korinet.wire.buffer import WHOLE_FRAMES_MAX, FrameDecoder
from korinet.wire.frames import Frame, FrameType, encode_message

FRAMES = [
    Frame(FrameType.PING, b"\x00" * 8),
    Frame(FrameType.MSG, encode_message(FrameType.MSG, 1, 0, 0, "t", b"hello")[5:]),
    Frame(FrameType.CLOSE, b""),
    Frame(FrameType.RT, b"r" * 1000),
    Frame(FrameType.ACK, b"\x00" * 7 + b"\x01"),
]
STREAM = b"".join(f.serialize() for f in FRAMES)


def drain(decoder: FrameDecoder) -> list[Frame]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def test_whole_stream_at_once() -> None:
    decoder = FrameDecoder(4096)
    decoder.feed(STREAM)
    assert drain(decoder) == FRAMES
    assert decoder.buffered == 0


def test_byte_by_byte() -> None:
    decoder = FrameDecoder(4096)
    got: list[Frame] = []
    ends = set()
    pos = 0
    for f in FRAMES:
        pos += len(f.serialize())
        ends.add(pos)
    for i, byte in enumerate(STREAM, start=1):
        decoder.feed(bytes([byte]))
        new = drain(decoder)
        # a frame comes out exactly when its last byte arrives, never earlier
        assert len(new) == (1 if i in ends else 0), i
        got += new
    assert got == FRAMES
    assert decoder.buffered == 0


@given(st.lists(st.integers(1, len(STREAM) - 1), unique=True, max_size=40))
@settings(max_examples=150, deadline=None)
def test_random_chunk_splits(cuts: list[int]) -> None:
    decoder = FrameDecoder(4096)
    got: list[Frame] = []
    bounds = [0, *sorted(cuts), len(STREAM)]
    for a, b in itertools.pairwise(bounds):
        decoder.feed(STREAM[a:b])
        got += drain(decoder)
    assert got == FRAMES
    assert decoder.buffered == 0


def test_buffered_counts_unparsed_bytes() -> None:
    decoder = FrameDecoder(4096)
    wire = FRAMES[3].serialize()
    decoder.feed(wire[:3])
    assert decoder.next_frame() is None
    assert decoder.buffered == 3
    decoder.feed(wire[3:500])
    assert decoder.next_frame() is None
    # the header may already be consumed (it is checked as soon as it is in) or not
    assert 500 - 5 <= decoder.buffered <= 500
    decoder.feed(wire[500:] + b"\x00")
    assert decoder.next_frame() == FRAMES[3]
    assert decoder.buffered == 1


def test_take_rest_returns_unparsed_bytes_and_empties_the_buffer() -> None:
    decoder = FrameDecoder(4096)
    decoder.feed(FRAMES[0].serialize() + b"rest")
    assert decoder.next_frame() == FRAMES[0]
    assert decoder.take_rest() == b"rest"
    assert decoder.buffered == 0
    assert decoder.next_frame() is None


def test_four_gib_length_prefix_fails_before_any_allocation() -> None:
    decoder = FrameDecoder(16 * 1024 * 1024)
    tracemalloc.start()
    try:
        decoder.feed(b"\xff\xff\xff\xff" + bytes([FrameType.MSG]))
        with pytest.raises(FrameTooLarge) as info:
            decoder.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.length == 2**32 - 1
    assert info.value.limit == 16 * 1024 * 1024
    assert decoder.buffered <= 5
    assert peak < 64 * 1024


def test_oversize_frame_is_refused_with_only_its_header_received() -> None:
    decoder = FrameDecoder(1000)
    decoder.feed(b"\x00\x00\x03\xe9")  # 1001: one over, the type byte not yet in
    assert decoder.next_frame() is None
    decoder.feed(bytes([FrameType.PING]))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(1000)
    frame = Frame(FrameType.PONG, b"p" * 999)
    decoder.feed(frame.serialize())
    assert decoder.next_frame() == frame


def test_zero_length_is_a_remote_error() -> None:
    decoder = FrameDecoder(1000)
    decoder.feed(b"\x00\x00\x00\x00\x06")
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


@pytest.mark.parametrize("ftype", [0, 0x0B, 200, 255])
def test_unknown_frame_type(ftype: int) -> None:
    decoder = FrameDecoder(1000)
    decoder.feed(b"\x00\x00\x00\x01" + bytes([ftype]))
    with pytest.raises(UnknownFrameType) as info:
        decoder.next_frame()
    assert info.value.frame_type == ftype


def test_frame_after_many_frames_in_one_feed_still_parses() -> None:
    # The parser must not lose its place while consumed bytes are being compacted.
    decoder = FrameDecoder(4096)
    frames = [Frame(FrameType.PONG, bytes([i % 256]) * (i % 50 + 1)) for i in range(300)]
    wire = b"".join(f.serialize() for f in frames)
    got: list[Frame] = []
    for i in range(0, len(wire), 97):
        decoder.feed(wire[i : i + 97])
        got += drain(decoder)
    assert got == frames


@given(st.binary(max_size=300), st.integers(1, 50))
@settings(max_examples=200, deadline=None)
def test_garbage_raises_only_remote_errors_and_stays_bounded(data: bytes, chunk: int) -> None:
    limit = 64
    decoder = FrameDecoder(limit)
    for i in range(0, len(data), chunk):
        piece = data[i : i + chunk]
        decoder.feed(piece)
        try:
            drain(decoder)
        except RemoteProtocolError:
            return
        # after parsing, at most one incomplete frame remains: its header or its body
        assert decoder.buffered < max(limit, 5)


# whole_frames(): a read of a few whole frames skips the buffer, never the checks


def test_whole_frames_takes_a_read_of_whole_frames_on_an_empty_decoder() -> None:
    decoder = FrameDecoder(1000)
    ack = Frame(FrameType.ACK, b"\x00" * 7 + b"\x05")
    assert decoder.whole_frames(ack.serialize()) == [(FrameType.ACK, ack.body)]
    answer = FRAMES[1]  # an answer and the ACK riding on it: a request-response exchange's read
    assert decoder.whole_frames(answer.serialize() + ack.serialize()) == [
        (FrameType.MSG, answer.body),
        (FrameType.ACK, ack.body),
    ]
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    "data",
    [
        Frame(FrameType.PING, b"\x00" * 8).serialize() + b"\x00",  # a frame and the start of the next
        Frame(FrameType.PING, b"\x00" * 8).serialize()[:-1],  # not all of it yet
        b"\x00\x00\x00",  # not even a header
        b"\xff\xff\xff\xff" + bytes([FrameType.MSG]),  # a 4 GiB prefix: the buffer's check refuses it
        FRAMES[0].serialize() + b"\xff\xff\xff\xff" + bytes([FrameType.MSG]),  # ... after a good frame
        b"\x00\x00\x00\x00\x06",  # zero length
        b"\x00\x00\x00\x01\xc8",  # unknown type 200
        FRAMES[0].serialize() + b"\x00\x00\x00\x01\xc8",  # ... after a good frame
        Frame(FrameType.PONG, b"p" * 1000).serialize(),  # whole, but one byte over the limit
        FRAMES[0].serialize() * (WHOLE_FRAMES_MAX + 1),  # more than a few: a stream's read
    ],
    ids=["partial", "part", "short", "4gib", "4gib-2nd", "zero", "unknown", "unknown-2nd", "over", "many"],
)
def test_whole_frames_leaves_everything_else_to_the_buffer(data: bytes) -> None:
    assert FrameDecoder(1000).whole_frames(data) is None


def test_whole_frames_is_not_taken_while_bytes_wait_in_the_buffer() -> None:
    decoder = FrameDecoder(1000)
    first = Frame(FrameType.PONG, b"a" * 10).serialize()
    decoder.feed(first[:3])
    # a complete frame on its own, but the bytes before it come first
    assert decoder.whole_frames(Frame(FrameType.PING, b"\x00" * 8).serialize()) is None
    decoder.feed(first[3:])
    assert drain(decoder) == [Frame(FrameType.PONG, b"a" * 10)]
    assert decoder.whole_frames(first) == [(FrameType.PONG, b"a" * 10)]  # all consumed: fast again


def test_whole_frames_of_exactly_the_limit() -> None:
    frame = Frame(FrameType.PONG, b"p" * 999)
    assert FrameDecoder(1000).whole_frames(frame.serialize()) == [(FrameType.PONG, frame.body)]


@settings(max_examples=300, deadline=None)
@given(
    picks=st.lists(st.integers(0, len(FRAMES) - 1), max_size=6),
    tail=st.binary(max_size=12),
    cut=st.integers(0, 40),
)
def test_whole_frames_agrees_with_the_buffer(picks: list[int], tail: bytes, cut: int) -> None:
    """Whatever a read holds (whole frames, a cut one, garbage after them), the fast
    path either declines or gives exactly what the buffer would, with nothing left."""
    data = b"".join(FRAMES[i].serialize() for i in picks) + tail
    data = data[: max(len(data) - cut, 0)] if cut % 2 else data
    fast = FrameDecoder(4096).whole_frames(data)
    if fast is None:
        return
    slow = FrameDecoder(4096)
    slow.feed(data)
    assert fast == [(f.type, f.body) for f in drain(slow)]
    assert slow.buffered == 0
