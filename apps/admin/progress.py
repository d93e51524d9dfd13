"""A transfer's progress on a terminal, as ``scp`` and ``rsync --progress`` show it:
bytes done of the total, percent, rate and time left, redrawn in place on stderr
at most a few times a second; nothing at all when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Meter", "human_size"]


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Meter:
    """Call it with ``(done, total)`` as bytes are confirmed; ``finish()`` ends the line.

    The rate is over the whole transfer so far, not counting bytes a resumed
    transfer already had (the first call's ``done``)."""

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.2,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.clock = clock
        self.interval = interval
        self._start: float | None = None
        self._base = 0
        self._last_draw = float("-inf")
        self._last: tuple[int, int] | None = None
        self._width = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if self._start is None:
            self._start, self._base = now, done
        self._last = (done, total)
        if now - self._last_draw >= self.interval or done >= total:
            self._draw(now)

    def line(self, now: float) -> str:
        assert self._last is not None and self._start is not None
        done, total = self._last
        elapsed = now - self._start
        rate = (done - self._base) / elapsed if elapsed > 0 else 0.0
        percent = 100 * done // total if total else 100
        parts = [self.label, f"{human_size(done)} / {human_size(total)}", f"{percent:3d}%"]
        if rate > 0:
            parts.append(f"{human_size(rate)}/s")
            parts.append(f"{_clock((total - done) / rate)} left" if done < total else _clock(elapsed))
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        self._last_draw = now
        text = self.line(now)
        pad = " " * max(0, self._width - len(text))  # erase what a longer line left
        self._width = len(text)
        self.stream.write(f"\r{text}{pad}")
        self.stream.flush()

    def finish(self) -> None:
        """End the progress line (drawing the last state), so what follows starts clean."""
        if self.enabled and self._last is not None:
            self._draw(self.clock())
            self.stream.write("\n")
            self.stream.flush()
