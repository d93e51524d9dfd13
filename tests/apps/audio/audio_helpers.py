"""Shared by the audio tests: a tone and how much of it a listener heard, a numbered
pulse train and finding its pulses in what a listener played (to tell every pulse
heard once from one missing or doubled), and a call joined through a hub."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from korinet_audio.frames import SAMPLE_RATE
from korinet_audio.talk import Call
from korinet_audio.wavio import FilePlayback
from testutil import TIMEOUT_FACTOR

from korinet import Client
from korinet.plugins import PluginManager

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


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (np.sin(2 * np.pi * freq * t) * 8000).astype(np.int16)


def talk_spurts(seconds: float, on: float = 0.4, off: float = 0.1) -> np.ndarray:
    """A 440 Hz tone in spurts of ``on`` seconds with pauses of ``off``, as speech has:
    a jitter buffer left too deep takes a frame out in a pause, never out of a spurt."""
    audio = tone(seconds)
    t = np.arange(len(audio)) / SAMPLE_RATE
    audio[t % (on + off) >= on] = 0
    return audio


def tone_share(frames: list[np.ndarray], freq: float = 440.0, tolerance: float = 5.0) -> float:
    """Share of 100 ms windows whose dominant frequency is ``freq`` ± ``tolerance``."""
    audio = np.concatenate(frames) if frames else np.zeros(0, np.int16)
    win = SAMPLE_RATE // 10
    hits = total = 0
    for i in range(0, len(audio) - win + 1, win):
        w = audio[i : i + win].astype(np.float64)
        total += 1
        spectrum = np.abs(np.fft.rfft(w * np.hanning(win), n=win * 8))
        peak = np.argmax(spectrum) * SAMPLE_RATE / (win * 8)
        hits += np.abs(w).max() > 500 and abs(peak - freq) <= tolerance
    return hits / total if total else 0.0


def loud_frames(frames: list[np.ndarray]) -> list[bool]:
    """Per 20 ms frame played: whether it carries sound (a gap is a silent frame)."""
    return [bool(np.abs(f).max() > 500) for f in frames]


def gaps_after_start(frames: list[np.ndarray]) -> int:
    """Silent frames between the first and the last loud one."""
    loud = loud_frames(frames)
    if True not in loud:
        return len(loud)
    first, last = loud.index(True), len(loud) - 1 - loud[::-1].index(True)
    return loud[first : last + 1].count(False)


def record_arrivals(call: Call) -> dict[float, float]:
    """Arrival time (wall clock) of every frame that reaches ``call``'s receiver, by
    capture time (the key of ``Receiver.history``): from arrival to playout is the
    time the jitter buffer held it, its own doing; before arrival is the machine's."""
    arrived: dict[float, float] = {}
    receive = call.receiver.on_frame

    def on_frame(obj: Any) -> None:
        if isinstance(obj, list) and len(obj) > 3 and isinstance(obj[3], int):
            arrived.setdefault(obj[3] / 1e6, time.time())
        receive(obj)

    call.receiver.on_frame = on_frame  # type: ignore[method-assign]
    return arrived


async def open_call(
    port: int, plugins: PluginManager, name: str, *, capture: Any = None, ptt: bool = False
) -> tuple[Call, FilePlayback]:
    client = await Client.connect("127.0.0.1", port, plugins=plugins, backoff_cap=0.2)
    playback = FilePlayback(None)
    call = Call(client, "lobby", name, capture, playback, ptt=ptt)
    await call.join()
    return call, playback


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout * TIMEOUT_FACTOR
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
