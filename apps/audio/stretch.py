"""Play queued audio faster than real time without changing its pitch (WSOLA).

A listener who comes back from a cut catches up on what was said meanwhile by
playing it at 1.5x (talk.py). Dropping samples would raise the pitch; WSOLA
(waveform-similarity overlap-add) keeps it: the output is built from 20 ms windows
overlapping by half (Hann windows, which add up to exactly one), each taken from
the input about ``speed`` x 10 ms after the previous one, the exact start searched
within ±5 ms for the one that best continues the waveform already played, so the
overlaps add up in phase. At speed 1 the natural continuation is taken every time
and the output is the input, sample for sample.

Pure numpy, no clock: samples go in with :meth:`Stretcher.feed`, come out with
:meth:`Stretcher.read`; :meth:`Stretcher.flush` gives back what is left, unstretched.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["Stretcher"]

Samples = npt.NDArray[np.int16]

#: Output hop: 10 ms at 16 kHz. Windows are two hops long and overlap by one.
HOP: Final = 160
WIN: Final = 2 * HOP
#: How far from the nominal position a window may start, either way (5 ms).
SEEK: Final = 80
_WINDOW: Final = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN) / WIN)).astype(np.float32)


def _to_int16(samples: npt.NDArray[np.float32]) -> Samples:
    return np.clip(np.rint(samples), -32768, 32767).astype(np.int16)


class Stretcher:
    """WSOLA over a queue of int16 samples (see the module docstring)."""

    def __init__(self) -> None:
        self._in = np.zeros(0, np.float32)  # input from absolute index self._base on
        self._base = 0
        self._pos = 0.0  # nominal start of the next window (absolute)
        self._prev: int | None = None  # start of the last window taken (absolute)
        self._tail = np.zeros(HOP, np.float32)  # its second half, windowed, to overlap
        self._out = np.zeros(0, np.float32)  # made but not read yet

    @property
    def position(self) -> int:
        """Absolute index of the input sample being played about now."""
        return self._prev + HOP if self._prev is not None else self._base

    @property
    def buffered(self) -> int:
        """Input samples not played yet."""
        return self._base + len(self._in) - self.position

    def rest_level(self) -> float:
        """Peak of what is queued but not played yet (is it a pause?)."""
        rest = self._in[self.position - self._base :]
        return float(max(np.abs(rest).max(initial=0.0), np.abs(self._out).max(initial=0.0)))

    def feed(self, samples: Samples) -> None:
        self._in = np.concatenate([self._in, samples.astype(np.float32)])

    def can_read(self, n: int, speed: float) -> bool:
        """Whether :meth:`read` of ``n`` samples at ``speed`` has the input it needs."""
        steps = -(-max(0, n - len(self._out)) // HOP)
        if not steps:
            return True
        start = self._pos if self._prev is not None else float(self._base)
        seek = SEEK if speed > 1 else 0
        needed = start + (steps - 1) * HOP * max(speed, 1.0) + seek + WIN
        return needed <= self._base + len(self._in)

    def read(self, n: int, speed: float) -> Samples:
        """``n`` samples played at ``speed`` (1 or more); check :meth:`can_read` first.

        Raises:
            ValueError: not enough input.
        """
        if not self.can_read(n, speed):
            raise ValueError("not enough input to stretch")
        while len(self._out) < n:
            self._step(speed)
        out, self._out = self._out[:n], self._out[n:]
        return _to_int16(out)

    def flush(self) -> Samples:
        """What was made and what is left of the input, at speed 1; then empty."""
        rest = self._in[self.position - self._base :]
        out = np.concatenate([self._out, rest])
        self._in, self._out = np.zeros(0, np.float32), np.zeros(0, np.float32)
        self._base, self._pos, self._prev = 0, 0.0, None
        self._tail = np.zeros(HOP, np.float32)
        return _to_int16(out)

    def _step(self, speed: float) -> None:
        if self._prev is None:
            x = self._base
        elif speed <= 1.0:
            x = self._prev + HOP  # the natural continuation: the output is the input
        else:
            x = self._seek(round(self._pos))
        seg = self._in[x - self._base : x - self._base + WIN] * _WINDOW
        self._out = np.concatenate([self._out, self._tail + seg[:HOP]])
        self._tail = seg[HOP:]
        self._prev = x
        self._pos = x + HOP if speed <= 1.0 else self._pos + HOP * speed
        self._trim()

    def _seek(self, nominal: int) -> int:
        """The window start within ±SEEK of ``nominal`` that best continues the last one."""
        assert self._prev is not None
        lo = max(nominal - SEEK, self._prev + 1)
        hi = nominal + SEEK
        b = self._base
        target = self._in[self._prev + HOP - b : self._prev + WIN - b]
        region = self._in[lo - b : hi + HOP - b]
        corr = np.correlate(region, target, "valid")
        energy = np.convolve(region * region, np.ones(HOP, np.float32), "valid") + 1e-3
        best = int(np.argmax(corr / np.sqrt(energy)))
        return lo + best

    def _trim(self) -> None:
        assert self._prev is not None
        keep_from = min(self._prev + HOP, int(self._pos) - SEEK)
        drop = keep_from - self._base
        if drop > 4096:  # now and then: copying the queue every step would cost more
            self._in = self._in[drop:]
            self._base = keep_from
