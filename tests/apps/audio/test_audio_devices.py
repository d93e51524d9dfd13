"""The rings between PortAudio's callbacks and the event loop, and callbacks that
never raise, driven directly (no device needed)."""

from __future__ import annotations

import numpy as np
from korinet_audio.devices import PLAYBACK_LOW_WATER, DeviceCapture, DevicePlayback, SampleRing
from korinet_audio.frames import FRAME_SAMPLES


def test_ring_wraps_and_keeps_order() -> None:
    ring = SampleRing(1000)
    out = np.zeros(300, np.int16)
    total = []
    for i in range(10):
        ring.write(np.arange(i * 300, (i + 1) * 300, dtype=np.int16))
        assert ring.read_into(out) == 300
        total.append(out.copy())
    assert np.array_equal(np.concatenate(total), np.arange(3000, dtype=np.int16))


def test_ring_lapped_by_the_producer_skips_to_the_newest_samples() -> None:
    ring = SampleRing(1000)
    ring.write(np.arange(1500, dtype=np.int16))  # 500 samples were overwritten
    out = np.zeros(1000, np.int16)
    assert ring.read_into(out) == 1000
    assert ring.overruns == 1 and out[0] == 500 and out[-1] == 1499


def test_playback_callback_pads_with_silence_and_counts_underruns() -> None:
    playback = DevicePlayback()
    assert playback.wanted(0.0) == 1
    playback.write(np.full(FRAME_SAMPLES, 7, np.int16))
    outdata = np.ones((FRAME_SAMPLES * 2, 1), np.int16)
    playback._callback(outdata, FRAME_SAMPLES * 2, None, None)
    assert (outdata[:FRAME_SAMPLES, 0] == 7).all() and not outdata[FRAME_SAMPLES:].any()
    assert playback.stats.underruns == 1
    while playback.wanted(0.0):
        playback.write(np.zeros(FRAME_SAMPLES, np.int16))
    assert playback.ring.fill >= PLAYBACK_LOW_WATER


def test_callbacks_never_raise_whatever_they_are_given() -> None:
    playback = DevicePlayback()
    bad = np.ones((FRAME_SAMPLES,), np.int16)  # 1-D: indexing [:, 0] fails inside
    playback._callback(bad, FRAME_SAMPLES, None, "output underflow")
    assert playback.stats.errors == 1 and not bad.any(), "the device must get silence"
    capture = DeviceCapture()
    capture._callback(object(), FRAME_SAMPLES, None, None)
    assert capture.stats.errors == 1


def test_capture_cuts_frames_and_stamps_them_from_the_callback_time() -> None:
    capture = DeviceCapture()
    block = np.arange(FRAME_SAMPLES * 3, dtype=np.int16).reshape(-1, 1)
    capture._callback(block, len(block), None, None)
    frames = capture.read(0.0)
    assert [int(f[0]) for f, _ in frames] == [0, FRAME_SAMPLES, 2 * FRAME_SAMPLES]
    stamps = [t for _, t in frames]
    assert np.allclose(np.diff(stamps), 0.020) and stamps[-1] == capture._stamp_time


def test_playback_ring_grows_for_a_bursty_device_and_shrinks_when_it_calms() -> None:
    """A device that takes six blocks at once (a 120 ms period) needs six in the ring."""
    playback = DevicePlayback()
    outdata = np.zeros((FRAME_SAMPLES, 1), np.int16)
    now = 0.0
    for _ in range(20):  # every 120 ms: the loop tops up, then six callbacks in a row
        while playback.wanted(now):
            playback.write(np.full(FRAME_SAMPLES, 1, np.int16))
        for _ in range(6):
            playback._callback(outdata, FRAME_SAMPLES, None, None)
        now += 0.120
    burst_underruns = playback.stats.underruns
    assert playback.low_water > PLAYBACK_LOW_WATER + 3 * FRAME_SAMPLES
    for _ in range(5):  # after adapting, the bursts find enough samples
        while playback.wanted(now):
            playback.write(np.full(FRAME_SAMPLES, 1, np.int16))
        for _ in range(6):
            playback._callback(outdata, FRAME_SAMPLES, None, None)
        now += 0.120
    assert playback.stats.underruns == burst_underruns
    for _ in range(1500):  # then a steady device, one block per 20 ms, for 30 s
        while playback.wanted(now):
            playback.write(np.full(FRAME_SAMPLES, 1, np.int16))
        playback._callback(outdata, FRAME_SAMPLES, None, None)
        now += 0.020
    assert playback.low_water == PLAYBACK_LOW_WATER, "the ring stayed deep after the device calmed down"
