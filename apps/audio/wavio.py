"""WAV files instead of the microphone and speaker (``--input-file``/``--output-file``).

Both are paced by the monotonic clock, as a sound card would be: the input gives one
20 ms frame per 20 ms of elapsed time (stamped with the wall-clock time it is due),
the output asks for one frame per 20 ms and writes it, silence included, so the file
is a faithful recording of what a speaker would have played.
"""

from __future__ import annotations

import time
import wave
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from .frames import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE

__all__ = ["FileCapture", "FilePlayback", "WavFormatError", "read_wav", "write_wav"]

Samples = npt.NDArray[np.int16]
_FRAME_S: Final = FRAME_MS / 1000
#: After a stall of the event loop, catch up at most this many frames at once.
MAX_CATCH_UP: Final = 10


class WavFormatError(ValueError):
    """The WAV file is not 16 kHz, mono, 16-bit."""


def read_wav(path: str | Path) -> Samples:
    """All samples of a 16 kHz mono 16-bit WAV file.

    Raises:
        WavFormatError: another format (the message says which and how to convert).
        OSError, wave.Error: unreadable.
    """
    with wave.open(str(path), "rb") as wav:
        rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
        if (rate, channels, width) != (SAMPLE_RATE, 1, 2):
            raise WavFormatError(
                f"{path}: {rate} Hz, {channels} channel(s), {8 * width}-bit; korinet-audio needs "
                f"{SAMPLE_RATE} Hz mono 16-bit (e.g. sox IN.wav -r 16000 -c 1 -b 16 OUT.wav)"
            )
        data = wav.readframes(wav.getnframes())
    return np.frombuffer(data, "<i2").astype(np.int16)


def write_wav(path: str | Path, samples: Samples) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(samples.astype("<i2").tobytes())


class FileCapture:
    """Frames from a WAV file (or an array of samples), one per 20 ms of elapsed time;
    ``loop`` repeats it."""

    def __init__(self, source: str | Path | Samples, *, loop: bool = False) -> None:
        samples = source if isinstance(source, np.ndarray) else read_wav(source)
        whole = len(samples) // FRAME_SAMPLES * FRAME_SAMPLES
        self.frames = samples[:whole].reshape(-1, FRAME_SAMPLES)
        self.loop = loop
        self.produced = 0
        self._t0: float | None = None

    @property
    def finished(self) -> bool:
        return not self.loop and self.produced >= len(self.frames)

    def start(self) -> None:
        self._t0 = time.monotonic()

    def stop(self) -> None:
        self._t0 = None

    def read(self, now: float) -> list[tuple[Samples, float]]:
        if self._t0 is None or not len(self.frames):
            return []
        elapsed = time.monotonic() - self._t0
        due = int(elapsed / _FRAME_S)
        out = []
        while self.produced < due and not self.finished:
            frame = self.frames[self.produced % len(self.frames)]
            # stamped with the wall-clock time it was due: a late read shows up as age
            captured = now - (elapsed - (self.produced + 1) * _FRAME_S)
            out.append((frame, captured))
            self.produced += 1
        return out


class FilePlayback:
    """A WAV file written as a speaker would play: one frame per 20 ms, silence included.
    With ``path=None`` the frames are kept in :attr:`recorded` instead (tests, benchmarks)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self.recorded: list[Samples] = []
        self.written = 0
        self._wav: wave.Wave_write | None = None
        self._t0: float | None = None

    def start(self) -> None:
        if self.path is not None:
            wav = wave.open(str(self.path), "wb")
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(SAMPLE_RATE)
            self._wav = wav
        self._t0 = time.monotonic()

    def stop(self) -> None:
        wav, self._wav = self._wav, None
        if wav is not None:
            wav.close()

    def wanted(self, now: float) -> int:
        if self._t0 is None:
            return 0
        due = int((time.monotonic() - self._t0) / _FRAME_S)
        if due - self.written > MAX_CATCH_UP:  # the loop stalled: do not write a burst
            self.written = due - MAX_CATCH_UP
        return max(0, due - self.written)

    def delay(self) -> float:
        return 0.0

    def write(self, samples: Samples) -> None:
        if self._wav is not None:
            self._wav.writeframes(samples.astype("<i2").tobytes())
        elif self.path is None:
            self.recorded.append(samples.copy())
        self.written += 1
