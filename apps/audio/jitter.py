"""An adaptive jitter buffer for one talker: pure, deterministic, time passed in.

Theory of operation (docs/AUDIO.md, "Jitter buffer"):

* Frames go in with :meth:`JitterBuffer.push` as they arrive, in any order; the
  playout clock takes one 20 ms frame out per tick with :meth:`JitterBuffer.pop`,
  which answers a frame, a concealment (a frame is missing: the decoder invents
  one) or silence (nothing to play). The *device* clock drives ``pop``, the
  *talker's* clock drives ``push``; nothing here reads a clock.
* Depth is the audio between the playout point and the newest frame received. It
  starts at the target (40 ms by default: two frames) and is kept there:
  - above the hard cap (120 ms) the oldest frames are dropped at once and playout
    jumps to ``target`` behind the newest frame: the live edge;
  - the talker's clock running fast makes depth creep up: when its average stays a
    frame above target, one frame should go;
  - after a jitter spike or a freeze the buffer can be left a frame or more deeper
    than its (by then lower again) target needs, for good: so when the smallest depth
    over the last second never came down to the nominal one, a frame should go too,
    one per second at most, until it does;
  - a frame that should go is not dropped here: the buffer cannot hear whether it
    holds speech. It says so (:attr:`JitterBuffer.shrink_due`) until its caller, who
    decodes, finds a quiet frame and calls :meth:`JitterBuffer.skip` (NetEQ
    accelerates in pauses too), or the margin is gone;
  - the talker's clock running slow (or a jitter spike) empties the buffer: the
    missing frame is concealed *without* moving the playout point, so the frame
    still plays if it comes a little late and depth grows back by one frame;
  - the target itself follows the measured jitter (RFC 3550 estimator), from
    ``target_ms`` up to one frame below the cap.
* A frame whose seq is behind the playout point is *late*, one whose transit time
  (arrival minus capture) exceeds the smallest recent transit by more than the cap
  is *stale*: both are dropped and counted. Stale frames are what a link replays
  after an outage; they never reach the speaker.
* After ``idle_after_ms`` with nothing to play the buffer goes idle and plays
  silence; the next frames start it again at the live edge. A new ``stream`` id
  (the talker restarted) resets everything.
* Every frame it accepted and then let go unplayed (over the cap, a restart at the
  live edge, :meth:`JitterBuffer.go_live`), and every stale one, is kept in
  :attr:`JitterBuffer.discarded` until the caller takes it: live speech is better
  lost than late, but a push-to-talk listener plays them in its catch-up instead.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Final

from .frames import FRAME_MS, AudioFrame

__all__ = ["JitterBuffer", "JitterStats", "Playout", "PlayoutKind", "PushResult"]

#: Pops between two drift corrections, so one correction is seen before the next.
DRIFT_HOLD: Final = 25
#: Pops over which the smallest depth is watched to see whether a frame can go.
SHRINK_WINDOW: Final = 50
#: Consecutive stale frames after which the talker's clock is taken to have jumped.
STALE_RESET: Final = 25
#: Transits remembered to find the smallest (the base network delay): 2 s of frames.
TRANSIT_WINDOW: Final = 100
#: Discarded frames kept for a caller that does not take them: 10 s of frames.
DISCARDED_KEPT: Final = 500


class PlayoutKind(enum.Enum):
    FRAME = "frame"  # play this frame
    CONCEAL = "conceal"  # a frame is missing: conceal it (Opus PLC, silence for PCM)
    SILENCE = "silence"  # nothing to play (not started, or idle)


class PushResult(enum.Enum):
    ACCEPTED = "accepted"
    LATE = "late"  # its playout time has passed
    STALE = "stale"  # too old to be played within the cap (a backlog)
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class Playout:
    kind: PlayoutKind
    frame: AudioFrame | None = None


_SILENCE: Final = Playout(PlayoutKind.SILENCE)
_CONCEAL: Final = Playout(PlayoutKind.CONCEAL)


@dataclass(slots=True)
class JitterStats:
    """Counters since the buffer was made (they survive resets)."""

    received: int = 0
    played: int = 0
    concealed: int = 0
    late: int = 0
    stale: int = 0
    duplicate: int = 0
    overflow: int = 0  # dropped to get back under the cap
    skipped: int = 0  # taken out of turn to come back down (a fast talker clock, a spike)
    idle: int = 0  # times the buffer ran dry and went idle
    resets: int = 0  # new streams


class JitterBuffer:
    """The jitter buffer of one talker (see the module docstring).

    Args:
        frame_ms: duration of one frame.
        target_ms: the depth kept when the network is steady.
        max_ms: the hard cap on depth, hence on the latency the buffer adds.
        idle_after_ms: go idle after this long with nothing to play.
    """

    def __init__(
        self,
        *,
        frame_ms: int = FRAME_MS,
        target_ms: int = 40,
        max_ms: int = 120,
        idle_after_ms: int = 120,
    ) -> None:
        if not frame_ms <= target_ms < max_ms:
            raise ValueError("need frame_ms <= target_ms < max_ms")
        self.frame = frame_ms / 1000
        self.min_target = max(1, round(target_ms / frame_ms))
        self.cap = max(self.min_target + 1, max_ms // frame_ms)
        self.max_age = max_ms / 1000
        self.idle_after = max(1, math.ceil(idle_after_ms / frame_ms))
        self.stats = JitterStats()
        #: RFC 3550 interarrival jitter estimate, seconds
        self.jitter = 0.0
        #: latency of the last frame popped: the ``now`` given to pop minus its capture time
        self.last_latency: float | None = None
        self._stream: int | None = None
        self._frames: dict[int, AudioFrame] = {}
        self._next = 0  # playout point; also the "late" threshold while idle
        self._newest = -1
        self._playing = False
        self._starved = 0
        self._avg_depth = 0.0
        self._hold = 0
        self._window = 0  # pops watched since the last shrink decision
        self._min_depth = 0  # smallest depth over those pops
        self._shrink = False  # a frame should go, at the caller's next quiet one
        self._transits: deque[float] = deque(maxlen=TRANSIT_WINDOW)
        self._last_transit: float | None = None
        self._stale_run = 0
        #: frames received but let go unplayed (over the cap, a live-edge restart,
        #: go_live, stale): the caller takes them (:meth:`take_discarded`)
        self.discarded: deque[AudioFrame] = deque(maxlen=DISCARDED_KEPT)

    # ------------------------------------------------------------------ status

    @property
    def playing(self) -> bool:
        return self._playing

    @property
    def target(self) -> int:
        """Target depth in frames: the configured one, more when jitter is high."""
        wanted = math.ceil(3 * self.jitter / self.frame) + 1
        return min(max(self.min_target, wanted), self.cap - 1)

    @property
    def shrink_due(self) -> bool:
        """Whether a frame should go to bring depth back down: the caller drops the
        frame :meth:`pop` gave with :meth:`skip` if it is quiet, else plays it."""
        return self._shrink

    @property
    def depth(self) -> int:
        """Frames between the playout point and the newest frame (gaps included)."""
        if self._playing:
            return max(0, self._newest - self._next + 1)
        if not self._frames:
            return 0
        return self._newest - min(self._frames) + 1

    @property
    def depth_ms(self) -> float:
        return self.depth * self.frame * 1000

    # ------------------------------------------------------------------ input

    def push(self, frame: AudioFrame, now: float) -> PushResult:
        """Take a frame that arrived at ``now`` (seconds, the clock of ``capture_us``)."""
        if frame.stream != self._stream:
            self._new_stream(frame.stream)
        transit = now - frame.capture_time
        if self._transits and transit > min(self._transits) + self.max_age:
            self._stale_run += 1
            if self._stale_run < STALE_RESET:
                self.stats.stale += 1
                self.discarded.append(frame)
                return PushResult.STALE
            self._transits.clear()  # that many in a row: the talker's clock jumped
            self._last_transit = None
        self._stale_run = 0
        self._transits.append(transit)
        if self._last_transit is not None:
            self.jitter += (abs(transit - self._last_transit) - self.jitter) / 16
        self._last_transit = transit
        seq = frame.seq
        if seq < self._next:
            self.stats.late += 1
            return PushResult.LATE
        if seq in self._frames:
            self.stats.duplicate += 1
            return PushResult.DUPLICATE
        self._frames[seq] = frame
        self.stats.received += 1
        if seq > self._newest:
            self._newest = seq
            self._enforce_cap()
        return PushResult.ACCEPTED

    def _new_stream(self, stream: int) -> None:
        if self._stream is not None:
            self.stats.resets += 1
        self._stream = stream
        self._frames.clear()
        self._next = 0
        self._newest = -1
        self._playing = False
        self._shrink = False
        self._transits.clear()
        self._last_transit = None
        self._stale_run = 0
        self.jitter = 0.0

    def _enforce_cap(self) -> None:
        oldest = self._next if self._playing else min(self._frames)
        if self._newest - oldest + 1 <= self.cap:
            return
        self._drop_before(self._newest - self.target + 1, overflow=True)

    def _drop_before(self, seq: int, *, overflow: bool = False) -> None:
        for old in sorted(s for s in self._frames if s < seq):
            self.discarded.append(self._frames.pop(old))
            if overflow:
                self.stats.overflow += 1
        self._next = max(self._next, seq)

    def take_discarded(self) -> list[AudioFrame]:
        """The frames let go unplayed since the last call (see :attr:`discarded`)."""
        out = list(self.discarded)
        self.discarded.clear()
        return out

    def go_live(self) -> None:
        """Forget buffered frames and start again at the live edge (after a reconnect)."""
        if self._newest >= 0:
            self._drop_before(self._newest + 1)
        self._playing = False
        self._shrink = False

    # ------------------------------------------------------------------ output

    def pop(self, now: float) -> Playout:
        """The next 20 ms to play; ``now`` is when it will be heard (for latency)."""
        if not self._playing:
            if not self._frames or self._newest - min(self._frames) + 1 < self.target:
                return _SILENCE
            self._drop_before(self._newest - self.target + 1)  # start at the live edge
            self._playing = True
            self._shrink = False
            self._starved = 0
            self._avg_depth = float(self.depth)
            self._hold = DRIFT_HOLD
            self._window, self._min_depth = 0, self.cap
        frame = self._frames.pop(self._next, None)
        if frame is not None:
            self._next += 1
            self._starved = 0
            self.stats.played += 1
            self.last_latency = now - frame.capture_time
            self._follow_drift()
            return Playout(PlayoutKind.FRAME, frame)
        self.stats.concealed += 1
        if self._frames:
            # later frames are here: this one is lost or late past saving
            self._next += 1
            self._starved = 0
            self._follow_drift()
            return _CONCEAL
        # Nothing buffered: we are ahead of the talker (slow clock, jitter spike, a
        # pause). Conceal without moving on, so the frame still plays if it comes.
        self._starved += 1
        if self._starved >= self.idle_after:
            self._playing = False
            self.stats.idle += 1
        return _CONCEAL

    def _follow_drift(self) -> None:
        depth = self.depth
        self._avg_depth += (depth - self._avg_depth) / 16
        self._min_depth = min(self._min_depth, depth)
        self._window += 1
        if self._shrink:
            # waiting for a quiet frame; right after a pop, depth is target - 1 when
            # frames come on time: below target, the margin is gone by itself
            self._shrink = depth >= self.target
            return
        if self._hold:
            self._hold -= 1
            return
        if self._avg_depth > self.target + 1 and depth > self.target:
            # the talker's clock is ahead of ours: a frame should go to stay near the target
            self._shrink = True
        elif self._window >= SHRINK_WINDOW:
            # Never below target for a whole window: a frame of margin that the jitter
            # of the last second did not use (left by a spike or a freeze). One goes.
            self._shrink = self._min_depth >= self.target
            self._window, self._min_depth = 0, self.cap

    def skip(self, now: float) -> Playout:
        """The next frame, in the same 20 ms as the one :meth:`pop` just gave: one
        frame nearer the live edge. The caller drops that one (it was quiet), or a
        catch-up plays both. Call only when :attr:`shrink_due`; ``now`` as for pop."""
        self.stats.skipped += 1
        self._shrink = False
        self._avg_depth -= 1
        self._hold = DRIFT_HOLD
        self._window, self._min_depth = 0, self.cap
        return self.pop(now)
