"""Sound devices through sounddevice (PortAudio), with callbacks that never wait.

PortAudio calls our callbacks on its own thread, in real time. They only copy
samples between the device's buffer and a preallocated :class:`SampleRing`, bump
counters and read a clock: no lock, no queue that can block, no buffer allocation,
no logging, no I/O. An exception inside one is caught and counted, and the device
gets silence; it never reaches PortAudio.

The event loop is the other end of each ring: it takes captured 20 ms frames out
(:meth:`DeviceCapture.read`) and tops the playback ring up a frame at a time
(:meth:`DevicePlayback.wanted`, :meth:`DevicePlayback.write`), so playout is paced
by the sound card's clock, and the jitter buffer absorbs the talker's.

``sounddevice`` is imported on first use: PortAudio reads the ALSA configuration
when it initializes, and a missing libportaudio2 must not break the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .frames import FRAME_SAMPLES, SAMPLE_RATE

__all__ = [
    "DeviceCapture",
    "DevicePlayback",
    "DeviceStats",
    "SampleRing",
    "check_device",
    "list_devices",
    "open_sounddevice",
]

Samples = npt.NDArray[np.int16]

#: The playback ring is topped up while it holds less than this: one frame plus a
#: tick of the event loop's clock (5 ms), so it never runs dry between two ticks.
PLAYBACK_LOW_WATER: Final = FRAME_SAMPLES + SAMPLE_RATE * 5 // 1000
#: A device that takes several blocks at once (large periods) raises the mark, a frame
#: per underrun, up to this; it comes down a frame per PLAYBACK_CALM seconds without one.
PLAYBACK_MAX_LOW_WATER: Final = PLAYBACK_LOW_WATER + 8 * FRAME_SAMPLES
PLAYBACK_CALM: Final = 5.0


class SampleRing:
    """A single-producer, single-consumer ring of int16 samples.

    ``written`` and ``read_count`` only grow and each is assigned by one side only
    (a single store, atomic under the GIL), so neither side waits for the other.
    A producer that laps the consumer overwrites the oldest samples; the consumer
    notices and skips them (:attr:`overruns`).
    """

    def __init__(self, capacity: int) -> None:
        self.buf = np.zeros(capacity, np.int16)
        self.capacity = capacity
        self.written = 0
        self.read_count = 0
        self.overruns = 0

    @property
    def fill(self) -> int:
        return min(self.written - self.read_count, self.capacity)

    def write(self, samples: Samples) -> None:
        n = len(samples)
        start = self.written % self.capacity
        first = min(n, self.capacity - start)
        self.buf[start : start + first] = samples[:first]
        if first < n:
            self.buf[: n - first] = samples[first:]
        self.written += n

    def read_into(self, out: Samples) -> int:
        """Copy up to ``len(out)`` samples into ``out``; returns how many."""
        available = self.written - self.read_count
        if available > self.capacity:  # lapped: the oldest samples are gone
            self.overruns += 1
            self.read_count = self.written - self.capacity
            available = self.capacity
        n = min(len(out), available)
        start = self.read_count % self.capacity
        first = min(n, self.capacity - start)
        out[:first] = self.buf[start : start + first]
        if first < n:
            out[first:n] = self.buf[: n - first]
        self.read_count += n
        return n


@dataclass(slots=True)
class DeviceStats:
    callbacks: int = 0
    xruns: int = 0  # PortAudio reported an input overflow or output underflow
    underruns: int = 0  # playback: the ring had less than the device asked for
    errors: int = 0  # exceptions caught inside a callback


def open_sounddevice() -> Any:
    """Import sounddevice, or explain what is missing.

    Raises:
        OSError: PortAudio is not installed (with the package to install).
    """
    try:
        import sounddevice  # type: ignore[import-untyped]
    except OSError as exc:
        raise OSError(f"{exc}: install PortAudio (Debian/Ubuntu: apt-get install libportaudio2)") from exc
    return sounddevice


def list_devices() -> list[dict[str, Any]]:
    """The sound devices PortAudio sees (name, channels, default rate, default mark)."""
    sd = open_sounddevice()
    default_in, default_out = sd.default.device
    found = []
    for index, info in enumerate(sd.query_devices()):
        found.append(
            {
                "index": index,
                "name": info["name"],
                "hostapi": sd.query_hostapis(info["hostapi"])["name"],
                "inputs": info["max_input_channels"],
                "outputs": info["max_output_channels"],
                "rate": info["default_samplerate"],
                "default_input": index == default_in,
                "default_output": index == default_out,
            }
        )
    return found


def check_device(kind: str, device: int | str | None) -> str:
    """Check that a ``"input"`` or ``"output"`` device is there and takes 16 kHz mono
    int16, without starting it; returns its name (so the user sees which one).

    Raises:
        OSError: PortAudio is missing, or there is no such device, or it refuses the
            format (one line that says which and what to do instead).
    """
    sd = open_sounddevice()
    what, instead = ("microphone", "--input-file or --listen-only") if kind == "input" else (
        "speaker", "--output-file"
    )  # fmt: skip
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        if device is None and sd.default.device[0 if kind == "input" else 1] < 0:
            raise ValueError(f"no default {kind} device (no sound card?)")
        info = sd.query_devices(device, kind)
        check(device, channels=1, dtype="int16", samplerate=SAMPLE_RATE)
    except (sd.PortAudioError, ValueError) as exc:
        which = "the default one" if device is None else repr(device)
        raise OSError(
            f"no usable {what} ({which}): {exc}; see `korinet-audio devices`, or use {instead}"
        ) from exc
    return str(info["name"])


def _open_stream(kind: str, what: str, device: int | str | None, callback: Any) -> Any:
    """Open and start a 16 kHz mono int16 callback stream of 20 ms blocks.

    Raises:
        OSError: PortAudio is missing or refused the device (the message says which).
    """
    sd = open_sounddevice()
    try:
        stream = getattr(sd, kind)(
            samplerate=SAMPLE_RATE, channels=1, dtype="int16", blocksize=FRAME_SAMPLES,
            device=device, latency="low", callback=callback,
        )  # fmt: skip
        stream.start()
    except (sd.PortAudioError, ValueError) as exc:
        raise OSError(
            f"cannot open the {what} ({device if device is not None else 'default device'}): {exc}; "
            "see `korinet-audio devices`, or use --input-file/--output-file"
        ) from exc
    return stream


class DeviceCapture:
    """The microphone: 16 kHz mono int16, delivered as 20 ms frames with capture times."""

    def __init__(self, device: int | str | None = None, *, seconds: float = 1.0) -> None:
        self.device = device
        self.ring = SampleRing(int(SAMPLE_RATE * seconds))
        self.stats = DeviceStats()
        self._stamp_written = 0  # ring.written when _stamp_time was taken
        self._stamp_time = 0.0
        self._frame = np.zeros(FRAME_SAMPLES, np.int16)
        self._stream: Any = None

    def _callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        try:
            self.stats.callbacks += 1
            if status:
                self.stats.xruns += 1
            self.ring.write(indata[:, 0])
            # the last sample just arrived: stamp the ring position with the wall clock
            self._stamp_time = time.time()
            self._stamp_written = self.ring.written
        except Exception:
            self.stats.errors += 1

    def check(self) -> str:
        """The device's name, once checked (:func:`check_device`; raises OSError)."""
        return check_device("input", self.device)

    def start(self) -> None:
        self._stream = _open_stream("InputStream", "microphone", self.device, self._callback)

    def stop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.stop()
            stream.close()

    def read(self, now: float) -> list[tuple[Samples, float]]:
        """Every whole frame captured since the last call, with its capture time."""
        frames = []
        ring = self.ring
        stamp_time, stamp_written = self._stamp_time, self._stamp_written
        while ring.written - ring.read_count >= FRAME_SAMPLES:
            ring.read_into(self._frame)
            # time of the frame's last sample, from the callback's stamp
            captured = stamp_time - (stamp_written - ring.read_count) / SAMPLE_RATE
            frames.append((self._frame.copy(), captured))
        return frames


class DevicePlayback:
    """The speaker: the loop writes 20 ms frames, the device callback takes them."""

    def __init__(self, device: int | str | None = None, *, seconds: float = 0.5) -> None:
        self.device = device
        self.ring = SampleRing(int(SAMPLE_RATE * seconds))
        self.stats = DeviceStats()
        self.low_water = PLAYBACK_LOW_WATER
        self._underruns_seen = 0
        self._calm_since = 0.0
        self._stream: Any = None
        self._latency = 0.0

    def _callback(self, outdata: Any, frames: int, time_info: Any, status: Any) -> None:
        try:
            self.stats.callbacks += 1
            if status:
                self.stats.xruns += 1
            out = outdata[:, 0]
            got = self.ring.read_into(out)
            if got < frames:
                out[got:] = 0
                self.stats.underruns += 1
        except Exception:
            self.stats.errors += 1
            outdata.fill(0)

    def check(self) -> str:
        """The device's name, once checked (:func:`check_device`; raises OSError)."""
        return check_device("output", self.device)

    def start(self) -> None:
        self._stream = _open_stream("OutputStream", "speaker", self.device, self._callback)
        self._latency = float(self._stream.latency)

    def stop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.stop()
            stream.close()

    def wanted(self, now: float) -> int:
        """Frames to write now to keep the ring above its low-water mark, which adapts
        to how many blocks the device takes at once."""
        underruns = self.stats.underruns
        if underruns != self._underruns_seen:
            self._underruns_seen = underruns
            self.low_water = min(self.low_water + FRAME_SAMPLES, PLAYBACK_MAX_LOW_WATER)
            self._calm_since = now
        elif self.low_water > PLAYBACK_LOW_WATER and now - self._calm_since > PLAYBACK_CALM:
            self.low_water -= FRAME_SAMPLES
            self._calm_since = now
        return 1 if self.ring.written - self.ring.read_count < self.low_water else 0

    def delay(self) -> float:
        """Seconds until a frame written now is heard (the ring, then the device)."""
        return max(0, self.ring.written - self.ring.read_count) / SAMPLE_RATE + self._latency

    def write(self, samples: Samples) -> None:
        self.ring.write(samples)
