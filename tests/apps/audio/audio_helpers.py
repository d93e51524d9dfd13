"""Shared by the audio tests: a numbered pulse train, and finding its pulses in what
a listener played (to tell every pulse heard once from one missing or doubled)."""

from __future__ import annotations

import difflib

import numpy as np
from korinet_audio.frames import SAMPLE_RATE

PULSE_EVERY = 0.1
PULSE_IDS = 10  # pulse k is a 30 ms burst at 500 + 200 * (k % PULSE_IDS) Hz


def pulse_train(seconds: float) -> np.ndarray:
    """A numbered pulse every 100 ms: which pulse is heard is told by its frequency."""
    audio = np.zeros(int(seconds * SAMPLE_RATE), np.float64)
    n = int(0.030 * SAMPLE_RATE)
    ramp = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.005 * SAMPLE_RATE))
    for k in range(int(seconds / PULSE_EVERY)):
        start = int(k * PULSE_EVERY * SAMPLE_RATE)
        freq = 500 + 200 * (k % PULSE_IDS)
        audio[start : start + n] = np.sin(2 * np.pi * freq * np.arange(n) / SAMPLE_RATE) * 8000 * ramp
    return audio.astype(np.int16)


def pulses_heard(frames: list[np.ndarray]) -> list[int]:
    """The id of each pulse in a recording, in order (-1: a burst at no pulse's frequency)."""
    audio = np.concatenate(frames).astype(np.float64) if frames else np.zeros(0)
    block = 32  # 2 ms
    loud = np.abs(audio[: len(audio) // block * block]).reshape(-1, block).max(axis=1) > 1500
    runs: list[list[int]] = []
    for i in np.flatnonzero(loud):
        if runs and i - runs[-1][1] <= 5:  # a dip under 10 ms does not split a burst
            runs[-1][1] = i
        else:
            runs.append([i, i])
    ids = []
    for first, last in runs:
        burst = audio[first * block : (last + 1) * block]
        spectrum = np.abs(np.fft.rfft(burst * np.hanning(len(burst)), n=8192))
        freq = np.argmax(spectrum) * SAMPLE_RATE / 8192
        k = round((freq - 500) / 200)
        ids.append(k if 0 <= k < PULSE_IDS and abs(freq - 500 - 200 * k) <= 60 else -1)
    return ids


def compare_pulses(heard: list[int], sent: int) -> tuple[int, int, int]:
    """(heard once, missing, extra) of ``sent`` pulses, by aligning the id sequences."""
    expected = [k % PULSE_IDS for k in range(sent)]
    once = missing = extra = 0
    for op, a1, a2, b1, b2 in difflib.SequenceMatcher(None, expected, heard, autojunk=False).get_opcodes():
        if op == "equal":
            once += a2 - a1
        else:
            missing += a2 - a1
            extra += b2 - b1
    return once, missing, extra
