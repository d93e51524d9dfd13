"""The audio frame and utterance formats: round trips, and every malformed input refused."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from korinet_audio.frames import MAX_PAYLOAD, PART_FRAMES, AudioFrame, MalformedFrame, UtterancePart
from korinet_audio.talk import past_deadline


def test_frame_round_trips_through_msgpack() -> None:
    frame = AudioFrame(123, 45, 1_700_000_000_000_000, "opus", b"\x01\x02", "alice")
    wire = msgpack.unpackb(msgpack.packb(frame.to_wire()))
    assert AudioFrame.parse(wire) == frame
    assert frame.capture_time == pytest.approx(1_700_000_000.0)


GOOD = [1, 1, 2, 3, "pcm16", b"x" * 640, ""]


@pytest.mark.parametrize(
    "bad",
    [
        None, "frame", {"seq": 1}, GOOD[:6], [*GOOD, 1],
        [2, *GOOD[1:]],  # unknown version
        [True, *GOOD[1:]],
        [1, -1, *GOOD[2:]], [1, 2**32, *GOOD[2:]],  # stream
        [1, 1, "2", *GOOD[3:]], [1, 1, True, *GOOD[3:]], [1, 1, 2**63, *GOOD[3:]],  # seq
        [1, 1, 2, 3.5, *GOOD[4:]],  # capture time
        [1, 1, 2, 3, "", *GOOD[5:]], [1, 1, 2, 3, "OPUS", *GOOD[5:]], [1, 1, 2, 3, "x" * 17, *GOOD[5:]],
        [1, 1, 2, 3, 5, *GOOD[5:]],  # codec
        [*GOOD[:5], "text", ""], [*GOOD[:5], b"x" * (MAX_PAYLOAD + 1), ""],  # payload
        [*GOOD[:6], 7], [*GOOD[:6], "n" * 65],  # src
    ],
)  # fmt: skip
def test_malformed_frames_are_refused(bad: Any) -> None:
    with pytest.raises(MalformedFrame):
        AudioFrame.parse(bad)


@given(st.recursive(st.none() | st.integers() | st.binary() | st.text(), lambda c: st.lists(c, max_size=8)))
def test_parse_raises_only_malformed_frame(obj: Any) -> None:
    try:
        AudioFrame.parse(obj)
    except MalformedFrame:
        pass


def test_utterance_part_round_trips_and_refuses_bad_parts() -> None:
    part = UtterancePart(9, 2, 100, 5, "pcm16", (b"a", b"b"), True, "bob")
    assert UtterancePart.parse(msgpack.unpackb(msgpack.packb(part.to_wire()))) == part
    assert list(part.seqs) == [100, 101]
    good = part.to_wire()
    for key, value in [
        ("v", 2), ("payloads", []), ("payloads", [b"a"] * (PART_FRAMES + 1)), ("payloads", ["a"]),
        ("final", 1), ("first_seq", -1), ("codec", None), ("src", b"bob"),
    ]:  # fmt: skip
        with pytest.raises(MalformedFrame):
            UtterancePart.parse({**good, key: value})
    with pytest.raises(MalformedFrame):
        UtterancePart.parse([good])


def test_frame_deadline() -> None:
    assert not past_deadline(10.000, 10.059, 60)
    assert past_deadline(10.000, 10.061, 60)
    assert not past_deadline(10.0, 9.9, 60)  # a clock that stepped back is not "old"
