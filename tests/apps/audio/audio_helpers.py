"""Shared by the audio tests: a numbered pulse train, and finding its pulses in what
a listener played (to tell every pulse heard once from one missing or doubled)."""

from __future__ import annotations

import numpy as np
from korinet_audio.frames import SAMPLE_RATE

PULSE_EVERY = 0.1
PULSE_IDS = 10  # pulse k is a 12 ms burst at 500 + 200 * (k % PULSE_IDS) Hz


def pulse_train(seconds: float) -> np.ndarray:
    """A numbered pulse every 100 ms: which pulse is heard is told by its frequency.
    Each lies within the first 20 ms frame of its 100 ms, also once Opus has delayed it
    by its 6.5 ms: a cut cannot split a pulse, heard as it is, frame by frame."""
    audio = np.zeros(int(seconds * SAMPLE_RATE), np.float64)
    n = int(0.012 * SAMPLE_RATE)
    ramp = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.002 * SAMPLE_RATE))
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
        if last - first + 1 < 2:
            continue  # a click, not a pulse (a pulse lasts 8 ms even at 1.5x)
        burst = audio[first * block : (last + 1) * block]
        spectrum = np.abs(np.fft.rfft(burst * np.hanning(len(burst)), n=8192))
        freq = np.argmax(spectrum) * SAMPLE_RATE / 8192
        k = round((freq - 500) / 200)
        ids.append(k if 0 <= k < PULSE_IDS and abs(freq - 500 - 200 * k) <= 60 else -1)
    return ids


def compare_pulses(heard: list[int], sent: int, lost: set[int] = frozenset()) -> tuple[int, int, int]:
    """(heard once, missing, extra) of ``sent`` pulses but those ``lost`` at the source:
    the longest common subsequence of the ids sent and heard is the pulses heard in
    order (ids repeat every PULSE_IDS, so nothing shorter-sighted aligns them)."""
    expected = [k % PULSE_IDS for k in range(sent) if k not in lost]
    row = [0] * (len(heard) + 1)
    for e in expected:
        prev_diag = 0
        for j, h in enumerate(heard, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if e == h else max(row[j], row[j - 1])
    once = row[-1]
    return once, len(expected) - once, len(heard) - once
