"""The sender without a network: the frame deadline, drops while offline, and the
push-to-talk utterance parts posted on the reliable lane."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from korinet_audio import codecs
from korinet_audio.frames import FRAME_SAMPLES, PART_FRAMES, AudioFrame, UtterancePart
from korinet_audio.talk import CallStats, Sender

from korinet import SendBufferFull

SILENCE = np.zeros(FRAME_SAMPLES, np.int16)


class Wire:
    def __init__(self) -> None:
        self.live: list[AudioFrame] = []
        self.reliable: list[UtterancePart] = []
        self.link_up = True
        self.window_full = False

    def send_realtime(self, obj: Any, type: str) -> bool:
        if not self.link_up:
            return False
        self.live.append(AudioFrame.parse(obj))
        return True

    def post(self, obj: Any, type: str) -> int:
        if self.window_full:
            raise SendBufferFull("full")
        self.reliable.append(UtterancePart.parse(obj))
        return len(self.reliable)


def sender(wire: Wire, **kw: Any) -> Sender:
    return Sender(wire.send_realtime, wire.post, CallStats(), **kw)


def test_frames_older_than_the_deadline_are_dropped_not_sent_late() -> None:
    wire = Wire()
    s = sender(wire, deadline_ms=60)
    assert s.capture(SILENCE, 100.00, 100.05) is not None
    assert s.capture(SILENCE, 100.02, 100.09) is None  # 70 ms old: the loop stalled
    assert s.capture(SILENCE, 100.04, 100.09) is not None
    assert [f.seq for f in wire.live] == [0, 2], "a dropped frame still takes its seq (time passed)"
    assert s.stats.dropped_deadline == 1 and s.stats.frames_sent == 2


def test_frames_are_dropped_at_once_while_the_link_is_down() -> None:
    wire = Wire()
    s = sender(wire)
    wire.link_up = False
    for i in range(5):
        s.capture(SILENCE, 100 + i * 0.02, 100 + i * 0.02)
    wire.link_up = True
    s.capture(SILENCE, 100.1, 100.1)
    assert [f.seq for f in wire.live] == [5]
    assert s.stats.dropped_offline == 5


def test_push_to_talk_sends_only_while_talking_and_posts_each_utterance_once() -> None:
    wire = Wire()
    s = sender(wire, ptt=True)
    t = 100.0
    for _ in range(3):
        s.capture(SILENCE, t, t)
        t += 0.02
    assert wire.live == [] and wire.reliable == []
    s.set_talking(True)
    for _ in range(PART_FRAMES + 5):
        s.capture(SILENCE, t, t)
        t += 0.02
    s.set_talking(False)
    assert len(wire.live) == PART_FRAMES + 5
    assert [len(p.payloads) for p in wire.reliable] == [PART_FRAMES, 5]
    assert [p.final for p in wire.reliable] == [False, True]
    assert wire.reliable[0].first_seq == 3 and wire.reliable[1].first_seq == 3 + PART_FRAMES
    assert {p.utterance for p in wire.reliable} == {0}
    s.set_talking(True)
    s.capture(SILENCE, t, t)
    s.set_talking(False)
    assert wire.reliable[-1].utterance == 1


def test_a_full_window_drops_the_part_and_counts_it() -> None:
    wire = Wire()
    s = sender(wire, ptt=True)
    s.set_talking(True)
    s.capture(SILENCE, 100.0, 100.0)
    wire.window_full = True
    s.set_talking(False)
    assert s.stats.parts_dropped == 1 and wire.reliable == []


def test_switching_codec_closes_the_open_part() -> None:
    wire = Wire()
    s = sender(wire, ptt=True)
    s.set_talking(True)
    s.capture(SILENCE, 100.0, 100.0)
    s.use_codec("pcm16")  # the same: nothing happens
    assert wire.reliable == []
    if "opus" not in codecs.available():
        pytest.skip(f"opus unavailable: {codecs.opus_missing_reason()}")
    s.use_codec("opus")
    assert len(wire.reliable) == 1 and wire.reliable[0].codec == "pcm16"
    s.capture(SILENCE, 100.02, 100.02)
    assert wire.live[-1].codec == "opus"


def test_missed_utterances_waiting_to_play_are_bounded() -> None:
    from korinet_audio.talk import MAX_CATCH_UP, Receiver

    stats = CallStats()
    receiver = Receiver(stats, clock=lambda: 1000.0)
    payload = bytes(FRAME_SAMPLES * 2)
    for i in range(MAX_CATCH_UP // PART_FRAMES + 5):
        part = UtterancePart(1, i, i * PART_FRAMES, 0, "pcm16", (payload,) * PART_FRAMES, True, "bob")
        receiver.on_utterance(part.to_wire())
    assert receiver.missed_pending == MAX_CATCH_UP
    assert stats.missed_parts_dropped == 5
    receiver.next_frame(1000.0)
    assert receiver.replaying == "bob"
