"""The talk screen: a few status lines redrawn in place with plain ANSI, and keys.

:func:`render` is pure (a call's figures in, lines out), so tests check it without a
terminal; :class:`StatusScreen` owns the terminal (cbreak mode, key reader, redraw)
and gives it back as it found it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import termios
import tty
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TextIO

if TYPE_CHECKING:
    from .talk import Call

__all__ = ["PushToTalkKey", "StatusScreen", "meter", "percentile", "render", "summary"]

REDRAW_EVERY: Final = 0.2
#: Keys are polled this often (a held push-to-talk key is released within it).
POLL_EVERY: Final = 0.05
_METER_WIDTH: Final = 24


class PushToTalkKey:
    """A key for push-to-talk, held or tapped (pure: time is passed in).

    A terminal reports key presses, and the auto-repeat of a held key, never releases.
    A press while silent starts talking. A press soon after the previous one
    (within REPEAT_GAP, longer than any auto-repeat delay) is a repeat: the key is
    held, and talking stops once the repeats stop (nothing for RELEASE_AFTER). A
    press after a longer pause stops talking: the key was tapped, it toggles.
    """

    REPEAT_GAP: Final = 0.7
    RELEASE_AFTER: Final = 0.25

    def __init__(self) -> None:
        self.talking = False
        self.held = False
        self._last = 0.0

    def press(self, now: float) -> bool:
        """The key was pressed (or repeated) at ``now``; returns whether to talk."""
        if not self.talking:
            self.talking, self.held = True, False
        elif now - self._last <= self.REPEAT_GAP:
            self.held = True
        else:
            self.talking = self.held = False
        self._last = now
        return self.talking

    def poll(self, now: float) -> bool:
        """Returns whether to talk at ``now`` (a held key's repeats may have stopped)."""
        if self.held and now - self._last > self.RELEASE_AFTER:
            self.talking = self.held = False
        return self.talking


def meter(dbfs: float, width: int = _METER_WIDTH) -> str:
    """A level bar from -60 dBFS (empty) to 0 dBFS (full)."""
    filled = round(max(0.0, min(1.0, (dbfs + 60) / 60)) * width)
    return "#" * filled + "-" * (width - filled)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def render(call: Call, *, connected: bool, rtt: float | None) -> list[str]:
    """The status lines for ``call``."""
    stats, sender, receiver = call.stats, call.sender, call.receiver
    link = f"link up (rtt {_ms(rtt)} ms)" if connected else "link DOWN, reconnecting..."
    members = ", ".join(receiver.members) or "-"
    if sender.muted:
        mode = "MUTED"
    elif sender.ptt:
        mode = "TALKING" if sender.talking else "listening (space to talk)"
    else:
        mode = "live"
    keys = "space: hold or tap to talk" if sender.ptt else "m: mute"
    heard = "live"
    if receiver.replaying:  # missed push-to-talk audio, then what was said meanwhile
        heard = f"catching up on {receiver.replaying}, {receiver.missed_pending * 0.020:.1f} s behind"
    latencies = list(stats.latencies)[-100:]
    return [
        f"korinet-audio  #{call.channel} as {call.joined_as or call.name}  codec {call.codec}  {link}",
        f"members: {members}",
        f"mic [{meter(sender.level)}] {sender.level:6.1f} dBFS  {mode}",
        f"spk [{meter(receiver.level)}] {receiver.level:6.1f} dBFS  {heard}",
        f"latency {_ms(latencies[-1] if latencies else None)} ms"
        f" (p50 {_ms(percentile(latencies, 0.5))}, p99 {_ms(percentile(latencies, 0.99))})"
        f"  jitter buffer {receiver.depth_ms:.0f} ms (target {receiver.buffer_target_ms:.0f})"
        f"  concealed {receiver.concealed}"
        f"  late {receiver.late}",
        f"sent {stats.frames_sent}  dropped {stats.dropped_deadline + stats.dropped_offline}"
        f"  malformed {stats.malformed + stats.undecodable}  reconnects {stats.reconnects}"
        f"  missed replayed {stats.missed_parts_played}   [{keys}, q: quit]",
    ]


def summary(call: Call) -> str:
    """One line for the end of a call (and for headless runs)."""
    stats, receiver = call.stats, call.receiver
    latencies = list(stats.latencies)
    return (
        f"#{call.channel} as {call.joined_as or call.name}, codec {call.codec}: sent {stats.frames_sent}"
        f" frames (dropped {stats.dropped_deadline} late, {stats.dropped_offline} offline),"
        f" received {stats.frames_received}, concealed {receiver.concealed}, jitter buffer target"
        f" {receiver.buffer_target_ms:.0f} ms, malformed"
        f" {stats.malformed + stats.undecodable}, latency p50 {_ms(percentile(latencies, 0.5))} ms"
        f" p99 {_ms(percentile(latencies, 0.99))} ms, reconnects {stats.reconnects},"
        f" missed parts replayed {stats.missed_parts_played}"
    )


class StatusScreen:
    """Draws :func:`render` every REDRAW_EVERY seconds and reads keys: space is the
    push-to-talk key, held or tapped (it mutes in full duplex), m mutes, q quits."""

    def __init__(self, call: Call, on_quit: Callable[[], None], out: TextIO = sys.stdout) -> None:
        self.call = call
        self.on_quit = on_quit
        self.out = out
        self._drawn = 0
        self._saved: list[Any] | None = None
        self.ptt = PushToTalkKey()

    def _key(self) -> None:
        try:
            key = sys.stdin.read(1)
        except (OSError, ValueError):
            return
        sender = self.call.sender
        if key in ("q", "Q", ""):
            self.on_quit()
        elif key == " " and sender.ptt:
            self.call.set_talking(self.ptt.press(asyncio.get_running_loop().time()))
        elif key in ("m", "M") or key == " ":
            sender.muted = not sender.muted

    def draw(self) -> None:
        client = self.call.client
        lines = render(self.call, connected=client.is_connected, rtt=client.rtt)
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        self.out.flush()
        self._drawn = len(lines)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        fd = sys.stdin.fileno()
        with contextlib.suppress(termios.error):
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        loop.add_reader(fd, self._key)
        polls_per_draw = round(REDRAW_EVERY / POLL_EVERY)
        try:
            for tick in itertools.count():
                if self.call.sender.ptt and self.call.sender.talking != self.ptt.poll(loop.time()):
                    self.call.set_talking(self.ptt.talking)  # a held key was let go
                if tick % polls_per_draw == 0:
                    self.draw()
                await asyncio.sleep(POLL_EVERY)
        finally:
            loop.remove_reader(fd)
            if self._saved is not None:
                termios.tcsetattr(fd, termios.TCSADRAIN, self._saved)
            self.draw()
