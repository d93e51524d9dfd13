"""End to end through the real PortAudio library: two `korinet-audio talk` processes
whose sound devices are ALSA ``file`` PCMs, and a hub, all on loopback.

Each process gets an ALSA configuration of its own (ALSA_CONFIG_PATH, set before the
process starts: PortAudio reads it when it initializes) whose default device reads
capture samples from ``infile`` and writes playback samples to ``file``, with a
``null`` slave. A null slave has no clock: fed from plain files it runs as fast as
the CPU goes (tens of megasamples a second). So the two files are FIFOs, and this
test plays the sound card's part: it writes the talker's microphone (a 440 Hz tone,
16 kHz S16 mono, 640 bytes every 20 ms) and drains each speaker every 20 ms, which
paces PortAudio at real time as a device clock would.

A pipe wakes a blocked writer only when a whole 4 KiB page is free: at 16 kHz S16
mono that is 128 ms, and PortAudio's playback callbacks came in bursts of six every
128 ms (the first version of this test let two thirds of the output be silence and
still found 440 Hz in most windows). So the playback side goes through ``plug`` to
48 kHz S32 stereo (a page is then 10.7 ms), and the test requires the output to be
free of gaps, not only to contain the tone.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import errno
import fcntl
import inspect
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from korinet_audio.talk import DEADLINE_MS, Receiver
from testutil import TIMEOUT_FACTOR

pytestmark = pytest.mark.timeout(90 * TIMEOUT_FACTOR)

RATE = 16000
CHUNK = 640  # bytes: 20 ms of S16_LE mono at 16 kHz, the microphone
OUT_RATE = 48000
OUT_CHUNK = 7680  # bytes: 20 ms of S32_LE stereo at 48 kHz, the speaker
F_SETPIPE_SZ = 1031

if ctypes.util.find_library("portaudio") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must install libportaudio2 for the PortAudio end-to-end test")
    pytest.skip("libportaudio2 is not installed (apt-get install libportaudio2)", allow_module_level=True)


def alsa_config(path: Path, capture: Path, playback: Path) -> Path:
    path.write_text(
        f"""pcm.!default {{
  type asym
  capture.pcm {{
    type file
    slave.pcm {{ type null }}
    file "/dev/null"
    infile "{capture}"
    format raw
  }}
  playback.pcm {{
    type plug
    slave {{
      pcm {{
        type file
        slave.pcm {{ type null }}
        file "{playback}"
        format raw
      }}
      format S32_LE
      rate {OUT_RATE}
      channels 2
    }}
  }}
}}
"""
    )
    return path


class SoundCard:
    """The clock a real card would have: feeds a capture FIFO and drains a playback
    FIFO, one 20 ms chunk per 20 ms, in a thread. Every open and read is non-blocking
    and retried, so PortAudio probing (opening and closing) the device is harmless."""

    def __init__(self, capture: Path, playback: Path, mic: np.ndarray) -> None:
        self.capture, self.playback = capture, playback
        os.mkfifo(capture)
        os.mkfifo(playback)
        self.mic = mic.astype("<i2").tobytes()
        self.heard = bytearray()
        self.first_heard: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SoundCard:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        rd = os.open(self.playback, os.O_RDONLY | os.O_NONBLOCK)
        with contextlib.suppress(OSError):
            fcntl.fcntl(rd, F_SETPIPE_SZ, 16384)  # room for 20 ms, little slack ahead of the clock
        wr: int | None = None
        pos = 0
        tick = time.monotonic()
        try:
            while not self._stop.is_set():
                if wr is None:
                    try:
                        wr = os.open(self.capture, os.O_WRONLY | os.O_NONBLOCK)
                        with contextlib.suppress(OSError):
                            fcntl.fcntl(wr, F_SETPIPE_SZ, 4096)
                    except OSError as exc:
                        if exc.errno != errno.ENXIO:  # ENXIO: nobody is reading it yet
                            raise
                if wr is not None:
                    chunk = self.mic[pos : pos + CHUNK] or self.mic[:CHUNK]
                    try:
                        os.write(wr, chunk)
                        pos = (pos + CHUNK) % len(self.mic)
                    except BlockingIOError:
                        pass  # the reader is behind: a real card would overrun too
                    except BrokenPipeError:
                        os.close(wr)  # the device was closed (PortAudio probing it)
                        wr = None
                with contextlib.suppress(BlockingIOError):
                    data = os.read(rd, OUT_CHUNK)
                    if data:
                        if self.first_heard is None:
                            self.first_heard = time.monotonic()
                        self.heard += data
                tick += 0.020
                time.sleep(max(0.0, tick - time.monotonic()))
        finally:
            os.close(rd)
            if wr is not None:
                os.close(wr)


def left_channel(raw: bytes) -> np.ndarray:
    """The left channel of S32_LE stereo, scaled to 16 bits."""
    return (np.frombuffer(raw[: len(raw) // 8 * 8], "<i4")[::2] >> 16).astype(np.float64)


def dominant_frequencies(audio: np.ndarray) -> list[float | None]:
    """The dominant frequency of each 100 ms window (None when silent)."""
    win = OUT_RATE // 10
    out: list[float | None] = []
    for i in range(0, len(audio) - win + 1, win):
        w = audio[i : i + win]
        if np.abs(w).max() < 500:
            out.append(None)
            continue
        spectrum = np.abs(np.fft.rfft(w * np.hanning(win), n=win * 4))
        out.append(float(np.argmax(spectrum) * OUT_RATE / (win * 4)))
    return out


def wait_line(proc: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    """Read the process's stdout until a line matches (bounded in time)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout * TIMEOUT_FACTOR
    seen = []
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            seen.append(line)
            if m := re.search(pattern, line):
                return m
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.02)
    raise AssertionError(f"no line matching {pattern!r}; got {''.join(seen)!r}")


def test_a_tone_goes_through_real_portaudio_from_talker_via_hub_to_listener(tmp_path: Path) -> None:
    t = np.arange(RATE * 2) / RATE
    tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    talker_card = SoundCard(tmp_path / "talker-mic", tmp_path / "talker-spk", tone).start()
    listener_card = SoundCard(tmp_path / "bob-mic", tmp_path / "bob-spk", np.zeros(RATE, np.int16)).start()
    env = {**os.environ, "KORINET_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "korinet_audio.cli"]
    procs: list[subprocess.Popen[str]] = []

    def spawn(*args: str, alsa: Path | None = None) -> subprocess.Popen[str]:
        penv = dict(env)
        if alsa is not None:
            penv["ALSA_CONFIG_PATH"] = str(alsa)
        proc = subprocess.Popen(
            [*cmd, *args], env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        procs.append(proc)
        return proc

    try:
        hub = spawn("serve", "127.0.0.1:0", "--no-client-auth")
        port = wait_line(hub, r"hub on 127\.0\.0\.1:(\d+)", 15).group(1)
        talker_alsa = alsa_config(tmp_path / "talker.conf", talker_card.capture, talker_card.playback)
        talker = spawn("talk", f"127.0.0.1:{port}", "--name", "alice", "--no-tui", alsa=talker_alsa)
        wait_line(talker, r"joined #lobby as alice", 20)
        listener_alsa = alsa_config(tmp_path / "bob.conf", listener_card.capture, listener_card.playback)
        listener = spawn(
            "talk", f"127.0.0.1:{port}", "--name", "bob", "--no-tui", "--duration", "4", alsa=listener_alsa
        )
        wait_line(listener, r"joined #lobby as bob", 20)
        summary = wait_line(listener, r"latency p50 (\d+) ms p99 (\d+) ms", 15 + 4)
        assert listener.wait(10 * TIMEOUT_FACTOR) == 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        talker_card.stop()
        listener_card.stop()

    audio = left_channel(bytes(listener_card.heard))
    seconds = len(audio) / OUT_RATE
    assert seconds >= 3.0, f"the listener's speaker played only {seconds:.2f} s (PortAudio not paced?)"
    freqs = dominant_frequencies(audio)
    on_tone = [f for f in freqs if f is not None and abs(f - 440) <= 5]
    share = len(on_tone) / len(freqs)
    assert share >= 0.8, f"only {share:.0%} of the listener's output is the 440 Hz tone: {freqs}"
    # no gaps: once the tone has started, (almost) every 20 ms block carries it
    blocks = audio[: len(audio) // 960 * 960].reshape(-1, 960)
    loud = np.abs(blocks).max(axis=1) > 500
    started = int(np.argmax(loud))
    gaps = 1 - loud[started:].mean()
    assert gaps <= 0.05, f"{gaps:.0%} of the 20 ms blocks after the start are silent"
    p50, p99 = int(summary.group(1)), int(summary.group(2))
    print(
        f"listener heard {seconds:.2f} s, {share:.0%} of 100 ms windows at 440 Hz, {gaps:.1%} silent"
        f" 20 ms blocks after the first, latency p50 {p50} ms p99 {p99} ms"
    )
    # The promise (docs/AUDIO.md, "The latency path"): a frame leaves within the sender's
    # deadline and waits in the jitter buffer at most its cap, so capture-to-playout stays
    # under their sum. Typically p50 is about 85 ms; a run whose start jitters (PortAudio
    # opening devices, the test's pacing thread) settles deeper, and a continuous tone has
    # no pause to shrink the buffer in (it never drops sound to shrink): p50 143 ms was seen.
    bound = DEADLINE_MS + inspect.signature(Receiver).parameters["max_ms"].default
    assert p50 <= bound and p99 <= bound, (p50, p99, bound)
