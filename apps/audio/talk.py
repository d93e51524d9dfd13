"""A call: one talker's client session, its sender, its receiver, and the audio clock.

* :class:`Sender` turns captured frames into audio frames on the realtime lane. A
  frame older than the deadline when it is about to leave is dropped, not sent late
  (:func:`past_deadline`); while the link is down the runtime drops frames at once.
  With push-to-talk it also posts each utterance, a part per half second, on the
  reliable lane.
* :class:`Receiver` keeps a jitter buffer and a decoder per talker heard, mixes
  them into one 20 ms frame per tick of the playback clock. A push-to-talk
  utterance missed while the link was down is played once, followed by what the
  talker said meanwhile, at 1.5x (:mod:`.stretch`) until it meets the live edge:
  nothing is lost and nothing plays twice.
* :class:`Call` wires both to a KoriNet client, a capture and a playback (devices or
  WAV files), and runs the clock: every 5 ms it sends what was captured and tops up
  the playback. After a reconnect every jitter buffer restarts at the live edge.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from korinet import Client, KoriNetError

from . import codecs as codec_registry
from .codecs import AudioCodec, CodecUnavailable, PayloadError
from .frames import (
    FRAME_MS,
    FRAME_SAMPLES,
    PART_FRAMES,
    SAMPLE_RATE,
    AudioFrame,
    MalformedFrame,
    UtterancePart,
)
from .jitter import JitterBuffer, PlayoutKind, PushResult
from .plugin import FRAME, JOIN, UTTERANCE, receivers
from .stretch import Stretcher

__all__ = [
    "Call",
    "CallStats",
    "Capture",
    "Playback",
    "Receiver",
    "Sender",
    "level_dbfs",
    "past_deadline",
    "run_calls",
]

logger = logging.getLogger(__name__)

Samples = npt.NDArray[np.int16]

#: A captured frame this old when it is about to be sent is dropped instead.
DEADLINE_MS: Final = 60
#: The audio clock's tick: capture is drained and playback topped up this often.
TICK: Final = 0.005
#: Talkers a listener keeps state for; more are ignored (and counted).
MAX_SOURCES: Final = 16
#: Seqs remembered per talker (received, played), to tell what an utterance part adds.
HEARD_MEMORY: Final = 1500
#: Frames of an utterance part not received live that make a listener catch up on it
#: (fewer are a glitch the jitter buffer concealed, not worth falling behind for).
MIN_MISSED: Final = 3
#: Frames a listener may be behind while catching up (60 s); the oldest go beyond.
MAX_CATCH_UP: Final = 3000
#: Speed of the catch-up while the talker is still talking live.
CATCH_UP_SPEED: Final = 1.5
#: Peak level under which a frame is a pause, and can go (-36 dBFS): the last bit of a
#: catch-up, or a frame the jitter buffer wants to shrink by. Frames played at the
#: edge of a catch-up waiting for a pause, before the rest goes anyway (0.5 s).
QUIET: Final = 500
JOIN_WAIT: Final = 25


def past_deadline(captured: float, now: float, deadline_ms: float = DEADLINE_MS) -> bool:
    """Whether a frame captured at ``captured`` is too old to send at ``now``."""
    return (now - captured) * 1000 > deadline_ms


def _peak(samples: Samples) -> int:
    return int(np.abs(samples.astype(np.int32)).max(initial=0))


def level_dbfs(samples: Samples) -> float:
    """RMS level in dBFS (-90 for silence)."""
    if not len(samples):
        return -90.0
    rms = math.sqrt(float(np.mean(np.square(samples.astype(np.float32)))))
    return max(-90.0, 20 * math.log10(rms / 32768)) if rms > 0 else -90.0


class Capture(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def read(self, now: float) -> list[tuple[Samples, float]]: ...


class Playback(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def wanted(self, now: float) -> int: ...
    def delay(self) -> float: ...
    def write(self, samples: Samples) -> None: ...


@dataclass(slots=True)
class CallStats:
    frames_captured: int = 0
    frames_sent: int = 0
    dropped_deadline: int = 0
    dropped_offline: int = 0  # the runtime had no link (or a backed-up one)
    parts_sent: int = 0
    parts_dropped: int = 0
    frames_received: int = 0
    malformed: int = 0
    undecodable: int = 0
    ignored_sources: int = 0
    missed_parts_played: int = 0
    missed_parts_heard: int = 0  # arrived reliably but were already heard live
    missed_parts_dropped: int = 0  # more missed audio waiting than MAX_MISSED_PARTS
    frames_rescued: int = 0  # push-to-talk frames the jitter buffer let go, caught up on
    reconnects: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=500))


# ---------------------------------------------------------------------- sending


class Sender:
    """Captured frames in, audio frames out (see the module docstring)."""

    def __init__(
        self,
        send_realtime: Callable[[Any, str], bool],
        post: Callable[[Any, str], Any],
        stats: CallStats,
        *,
        codec: str = codec_registry.PCM16,
        ptt: bool = False,
        deadline_ms: float = DEADLINE_MS,
    ) -> None:
        self._send_realtime = send_realtime
        self._post = post
        self.stats = stats
        self.ptt = ptt
        self.deadline_ms = deadline_ms
        #: in push-to-talk mode, whether the key is down; otherwise always sending
        self.talking = not ptt
        self.muted = False
        self.stream = secrets.randbits(32)
        self.seq = 0
        self._last: Samples | None = None
        self.codec_name = codec
        self._encoder: AudioCodec = codec_registry.create(codec)
        self._utterance = 0
        self._part: list[bytes] = []
        self._part_first = 0
        self._part_capture = 0

    @property
    def level(self) -> float:
        """Level of the last frame captured, dBFS (computed when the screen asks)."""
        return level_dbfs(self._last) if self._last is not None else -90.0

    def use_codec(self, name: str) -> None:
        """Switch codec (the roster said so); an open utterance part is sent first."""
        if name == self.codec_name:
            return
        try:
            encoder = codec_registry.create(name)
        except CodecUnavailable as exc:
            logger.warning("cannot switch to codec %s: %s", name, exc)
            return
        self._flush_part(final=False)
        self.codec_name, self._encoder = name, encoder

    def set_talking(self, talking: bool) -> None:
        if self.talking and not talking and self.ptt:
            self._flush_part(final=True)
            self._utterance += 1
        self.talking = talking

    def capture(self, samples: Samples, captured: float, now: float) -> AudioFrame | None:
        """One captured frame; returns the frame sent, or None (not talking, too old,
        or no link). Every captured frame takes a seq: a gap means time passed."""
        seq = self.seq
        self.seq += 1
        self.stats.frames_captured += 1
        self._last = samples
        if not self.talking or self.muted:
            return None
        if past_deadline(captured, now, self.deadline_ms):
            self.stats.dropped_deadline += 1
            return None
        payload = self._encoder.encode(samples)
        frame = AudioFrame(self.stream, seq, int(captured * 1e6), self.codec_name, payload)
        if self._send_realtime(frame.to_wire(), FRAME):
            self.stats.frames_sent += 1
        else:
            self.stats.dropped_offline += 1
        if self.ptt:
            self._add_to_part(frame)
        return frame

    def _add_to_part(self, frame: AudioFrame) -> None:
        if self._part and frame.seq != self._part_first + len(self._part):
            self._flush_part(final=False)  # a hole (deadline drop): parts are contiguous
        if not self._part:
            self._part_first, self._part_capture = frame.seq, frame.capture_us
        self._part.append(frame.payload)
        if len(self._part) >= PART_FRAMES:
            self._flush_part(final=False)

    def _flush_part(self, *, final: bool) -> None:
        if not self._part:
            return
        part = UtterancePart(
            self.stream, self._utterance, self._part_first, self._part_capture, self.codec_name,
            tuple(self._part), final,
        )  # fmt: skip
        self._part = []
        try:
            self._post(part.to_wire(), UTTERANCE)
            self.stats.parts_sent += 1
        except KoriNetError as exc:  # window full after a long outage, or closed
            self.stats.parts_dropped += 1
            logger.warning("an utterance part could not be queued: %s", exc)


# ---------------------------------------------------------------------- receiving


class _Memory:
    """The last HEARD_MEMORY (stream, seq) keys added."""

    __slots__ = ("_keys", "_order")

    def __init__(self) -> None:
        self._keys: set[tuple[int, int]] = set()
        self._order: deque[tuple[int, int]] = deque()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: tuple[int, int]) -> None:
        if key in self._keys:
            return
        self._keys.add(key)
        self._order.append(key)
        if len(self._order) > HEARD_MEMORY:
            self._keys.discard(self._order.popleft())


class _CatchUp:
    """One talker's audio from a missed seq on, played faster until it meets the live
    edge: missed frames from utterance parts, live frames as the jitter buffer gives
    them, each seq once, in seq order, a gap (time the talker was silent) skipped.
    Payloads are decoded as they are played, by decoders of its own: in seq order
    whichever lane brought them, so Opus never jumps between two decoder states; they
    become the live decoders at the end, which go on from the last frame played."""

    def __init__(
        self, stream: int, first: int, decode: Callable[[dict[str, AudioCodec], str, bytes], Samples]
    ) -> None:
        self.stream = stream
        self.next = first  # next seq to play
        self.pending: dict[int, tuple[str, bytes, float]] = {}  # seq -> codec, payload, capture time
        self.decoders: dict[str, AudioCodec] = {}
        self.last_codec: str | None = None
        self._decode = decode
        self.stretcher = Stretcher()
        self.marks: deque[tuple[int, float]] = deque()  # (stretcher input index, capture time)
        self._fed = 0  # stretcher input index of the next sample fed
        self._waited = 0  # frames played at the live edge waiting for a pause

    def add(self, seq: int, codec: str, payload: bytes, captured: float) -> bool:
        if seq < self.next or seq in self.pending:
            return False
        self.pending[seq] = (codec, payload, captured)
        return True

    @property
    def behind(self) -> int:
        """Frames waiting to be played."""
        return len(self.pending) + self.stretcher.buffered // FRAME_SAMPLES

    def drop_oldest(self) -> None:
        self.next = min(self.pending) + 1
        for seq in [s for s in self.pending if s < self.next]:
            del self.pending[seq]

    def _feed(self, played: _Memory) -> None:
        while True:
            item = self.pending.pop(self.next, None)
            if item is not None:
                codec, payload, captured = item
                audio = self._decode(self.decoders, codec, payload)
                self.last_codec = codec
                played.add((self.stream, self.next))  # fed is as good as played: never twice
                self.marks.append((self._fed, captured))
                self.stretcher.feed(audio)
                self._fed += len(audio)
            elif (self.stream, self.next) not in played:
                return
            self.next += 1

    def read(self, played: _Memory, speed: float) -> Samples | None:
        """The next 20 ms, or None: caught up (then :meth:`finish`)."""
        self._feed(played)
        while not self.stretcher.can_read(FRAME_SAMPLES, speed) and self.pending:
            self.next = min(self.pending)  # a gap: the talker was silent, skip it
            self._feed(played)
        if self.stretcher.can_read(FRAME_SAMPLES, speed):
            return self.stretcher.read(FRAME_SAMPLES, speed)
        if (
            self.stretcher.can_read(FRAME_SAMPLES, 1.0)
            and self.stretcher.rest_level() > QUIET
            and self._waited < JOIN_WAIT
        ):
            self._waited += 1
            return self.stretcher.read(FRAME_SAMPLES, 1.0)  # at the edge: join it in a pause
        return None

    def finish(self) -> Samples:
        """The last 20 ms; the rest of the backlog (under two frames, quiet unless the
        talker stopped) is dropped."""
        out = np.zeros(FRAME_SAMPLES, np.int16)
        rest = self.stretcher.flush()[:FRAME_SAMPLES]
        out[: len(rest)] = rest
        return out

    def capture_time(self) -> float | None:
        """Capture time of the audio played now (for the latency figures)."""
        position = self.stretcher.position
        while len(self.marks) > 1 and self.marks[1][0] <= position:
            self.marks.popleft()
        if not self.marks:
            return None
        index, captured = self.marks[0]
        return captured + (position - index) / SAMPLE_RATE


@dataclass(slots=True)
class _Source:
    """What a listener keeps per talker."""

    name: str
    jitter: JitterBuffer
    decoders: dict[str, AudioCodec] = field(default_factory=dict)
    last_codec: str | None = None
    heard: _Memory = field(default_factory=_Memory)  # received live
    played: _Memory = field(default_factory=_Memory)  # played, live or catching up
    last_heard: float = 0.0
    catch_up: _CatchUp | None = None
    ptt_stream: int | None = None  # the stream utterance parts came for: push-to-talk


class Receiver:
    """Jitter buffers, decoders, the mix, and missed utterances (module docstring).

    Args:
        stats: where counters go.
        clock: the wall clock, in the unit of capture times (seconds).
        target_ms, max_ms: for each talker's jitter buffer.
        on_roster: called with the hub's roster (members, codec to send with).
    """

    def __init__(
        self,
        stats: CallStats,
        *,
        clock: Callable[[], float] = time.time,
        target_ms: int = 40,
        max_ms: int = 120,
        on_roster: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.stats = stats
        self.clock = clock
        self.target_ms, self.max_ms = target_ms, max_ms
        self.on_roster_cb = on_roster
        self.sources: dict[str, _Source] = {}
        self.members: list[str] = []
        #: (heard_at, capture_time) of the last minute of frames played
        self.history: deque[tuple[float, float]] = deque(maxlen=3000)
        self._mix = np.zeros(FRAME_SAMPLES, np.int32)
        self._out = np.zeros(FRAME_SAMPLES, np.int16)

    # -- from the network (handlers of plugin.py, in the event loop)

    def on_frame(self, obj: Any) -> None:
        try:
            frame = AudioFrame.parse(obj)
        except MalformedFrame:
            self.stats.malformed += 1
            return
        source = self._source(frame.src)
        if source is None:
            return
        self.stats.frames_received += 1
        now = self.clock()
        source.last_heard = now
        result = source.jitter.push(frame, now)
        if result is PushResult.ACCEPTED or result is PushResult.DUPLICATE:
            source.heard.add((frame.stream, frame.seq))
        self._rescue(source)

    def _rescue(self, source: _Source) -> None:
        """Push-to-talk loses nothing: frames the jitter buffer let go unplayed (a
        burst over its cap after a stall, a restart at the live edge, stale ones) are
        played by the catch-up instead, faster, in seq order, each once. Live speech
        (no utterance parts) is better lost than late: they go."""
        discarded = source.jitter.take_discarded()
        if source.ptt_stream is None:
            return
        for frame in discarded:
            if frame.stream != source.ptt_stream or (frame.stream, frame.seq) in source.played:
                continue
            if source.catch_up is None:
                source.catch_up = _CatchUp(frame.stream, frame.seq, self._decode)
            catch_up = source.catch_up
            if catch_up.stream == frame.stream and catch_up.add(
                frame.seq, frame.codec, frame.payload, frame.capture_time
            ):
                self.stats.frames_rescued += 1

    def on_utterance(self, obj: Any) -> None:
        """A push-to-talk utterance part: the frames of it not played yet are caught up
        on, if enough of it was missed or a catch-up on its talker is under way."""
        try:
            part = UtterancePart.parse(obj)
        except MalformedFrame:
            self.stats.malformed += 1
            return
        source = self._source(part.src)
        if source is None:
            return
        source.ptt_stream = part.stream
        catch_up = source.catch_up
        if catch_up is None or catch_up.stream != part.stream:
            missed = [s for s in part.seqs if (part.stream, s) not in source.heard]
            if len(missed) < MIN_MISSED or catch_up is not None:
                self.stats.missed_parts_heard += 1  # or another stream's, after this one
                return
            # from the first frame not played yet (received ones may still be in the jitter buffer)
            first = next(s for s in part.seqs if (part.stream, s) not in source.played)
            catch_up = source.catch_up = _CatchUp(part.stream, first, self._decode)
            for seq, payload in zip(part.seqs, part.payloads, strict=True):
                if seq >= first:
                    break
                self._decode(catch_up.decoders, part.codec, payload)  # what comes before: Opus state
        added = 0
        for i, (seq, payload) in enumerate(zip(part.seqs, part.payloads, strict=True)):
            if (part.stream, seq) not in source.played:
                captured = part.capture_us / 1e6 + i * FRAME_MS / 1000
                added += catch_up.add(seq, part.codec, payload, captured)
        if not added:
            self.stats.missed_parts_heard += 1
            return
        self.stats.missed_parts_played += 1
        if catch_up.behind > MAX_CATCH_UP:
            while catch_up.behind > MAX_CATCH_UP and catch_up.pending:
                catch_up.drop_oldest()
            self.stats.missed_parts_dropped += 1

    def on_roster(self, obj: Any) -> None:
        self.members = [str(m) for m in obj.get("members", [])]
        if self.on_roster_cb is not None:
            self.on_roster_cb(obj)

    def _source(self, name: str) -> _Source | None:
        source = self.sources.get(name)
        if source is None:
            if len(self.sources) >= MAX_SOURCES:
                self._forget_quiet()
                if len(self.sources) >= MAX_SOURCES:
                    self.stats.ignored_sources += 1
                    return None
            source = self.sources[name] = _Source(
                name, JitterBuffer(target_ms=self.target_ms, max_ms=self.max_ms)
            )
        return source

    def _forget_quiet(self) -> None:
        now = self.clock()
        for name in [n for n, s in self.sources.items() if now - s.last_heard > 30]:
            del self.sources[name]

    def go_live(self) -> None:
        """After a reconnect: drop whatever was buffered, restart at the live edge."""
        for source in self.sources.values():
            source.jitter.go_live()
            self._rescue(source)

    # -- to the speaker (the audio clock, in the event loop)

    def next_frame(self, heard_at: float) -> Samples:
        """The next 20 ms to play; ``heard_at`` is when it reaches the ear."""
        mix = self._mix
        mix.fill(0)
        for source in self.sources.values():
            playout = source.jitter.pop(heard_at)
            frame = playout.frame
            samples: Samples | None = None
            if source.catch_up is not None and frame is not None and frame.stream != source.catch_up.stream:
                source.catch_up = None  # the talker restarted: live again, that backlog is gone
            if source.catch_up is not None:
                if frame is not None and source.jitter.shrink_due:
                    # the live edge moves on a frame; the catch-up plays both, none is lost
                    source.catch_up.add(frame.seq, frame.codec, frame.payload, frame.capture_time)
                    frame = source.jitter.skip(heard_at).frame
                if frame is not None:  # behind: the live frame waits its turn
                    source.catch_up.add(frame.seq, frame.codec, frame.payload, frame.capture_time)
                samples = self._catch_up(source, heard_at)
            elif playout.kind is not PlayoutKind.SILENCE:
                samples = self._render(source, frame)
                if frame is not None and source.jitter.shrink_due and _peak(samples) < QUIET:
                    # A frame should go to bring the delay down: this quiet one can (it was
                    # decoded, so Opus's state follows). Speech is never dropped (NetEQ).
                    source.played.add((frame.stream, frame.seq))
                    playout = source.jitter.skip(heard_at)
                    frame = playout.frame
                    samples = self._render(source, frame) if playout.kind is not PlayoutKind.SILENCE else None
                if frame is not None and source.jitter.last_latency is not None:
                    source.played.add((frame.stream, frame.seq))
                    self.stats.latencies.append(source.jitter.last_latency)
                    self.history.append((heard_at, frame.capture_time))
            self._rescue(source)  # what pop or skip let go, for the next 20 ms
            if samples is not None:
                mix += samples
        np.clip(mix, -32768, 32767, out=mix)
        self._out[:] = mix
        return self._out

    def _catch_up(self, source: _Source, heard_at: float) -> Samples:
        catch_up = source.catch_up
        assert catch_up is not None
        # faster while the talker talks on (the live edge runs away), else as spoken
        speed = CATCH_UP_SPEED if source.jitter.playing else 1.0
        captured = catch_up.capture_time()
        samples = catch_up.read(source.played, speed)
        if samples is None:
            samples = catch_up.finish()
            source.catch_up = None
            source.decoders.update(catch_up.decoders)  # they decoded up to the live edge
            source.last_codec = catch_up.last_codec or source.last_codec
        if captured is not None:
            self.stats.latencies.append(heard_at - captured)
            self.history.append((heard_at, captured))
        return samples

    @property
    def level(self) -> float:
        """Level of the last frame played, dBFS."""
        return level_dbfs(self._out)

    def _render(self, source: _Source, frame: AudioFrame | None) -> Samples:
        if frame is None:  # conceal with the decoder that played last
            decoder = source.decoders.get(source.last_codec) if source.last_codec else None
            return decoder.conceal() if decoder is not None else self._out * 0
        source.last_codec = frame.codec
        return self._decode(source.decoders, frame.codec, frame.payload)

    def _decode(self, decoders: dict[str, AudioCodec], codec: str, payload: bytes) -> Samples:
        """Decode with the decoder of ``decoders`` for ``codec`` (made on first use)."""
        decoder = decoders.get(codec)
        if decoder is None:
            try:
                decoder = decoders[codec] = codec_registry.create(codec)
            except CodecUnavailable:
                self.stats.undecodable += 1
                return self._out * 0
        return self._decode_or_conceal(decoder, payload)

    def _decode_or_conceal(self, decoder: AudioCodec, payload: bytes) -> Samples:
        try:
            return decoder.decode(payload)
        except PayloadError:
            self.stats.undecodable += 1
            return decoder.conceal()

    @property
    def replaying(self) -> str:
        """Who is being caught up on ("" when everything plays live)."""
        return ", ".join(s.name for s in self.sources.values() if s.catch_up is not None)

    @property
    def missed_pending(self) -> int:
        """Frames waiting in catch-ups (how far behind the live edge playback is)."""
        return sum(s.catch_up.behind for s in self.sources.values() if s.catch_up is not None)

    @property
    def depth_ms(self) -> float:
        playing = [s.jitter.depth_ms for s in self.sources.values() if s.jitter.playing]
        return max(playing, default=0.0)

    @property
    def buffer_target_ms(self) -> float:
        """The largest jitter buffer target among talkers heard (it adapts to jitter)."""
        return max((s.jitter.target * s.jitter.frame * 1000 for s in self.sources.values()), default=0.0)

    @property
    def concealed(self) -> int:
        return sum(s.jitter.stats.concealed for s in self.sources.values())

    @property
    def late(self) -> int:
        return sum(s.jitter.stats.late + s.jitter.stats.stale for s in self.sources.values())


# ---------------------------------------------------------------------- the call


class Call:
    """A talker in a channel: joins, runs the audio clock, rejoins after an expiry.

    Args:
        client: a connected KoriNet client (its plugins must include korinet_audio).
        channel, name: where to talk and as whom (the hub may add a suffix).
        capture: the microphone or a WAV file; None listens only.
        playback: the speaker or a WAV file; None talks only.
        ptt: push-to-talk (:meth:`set_talking`) instead of always sending.
        codecs: the codecs offered, best first (default: every available one).
    """

    def __init__(
        self,
        client: Client,
        channel: str,
        name: str,
        capture: Capture | None,
        playback: Playback | None,
        *,
        ptt: bool = False,
        codecs: Sequence[str] | None = None,
        deadline_ms: float = DEADLINE_MS,
        target_ms: int = 40,
        max_ms: int = 120,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.channel = channel
        self.name = name
        self.capture = capture
        self.playback = playback
        self.clock = clock
        self.codecs = list(codecs) if codecs is not None else codec_registry.available()
        self.stats = CallStats()
        self.sender = Sender(
            client.send_realtime, client.post, self.stats, ptt=ptt, deadline_ms=deadline_ms,
            codec=codec_registry.PCM16,
        )  # fmt: skip
        self.receiver = Receiver(
            self.stats, clock=clock, target_ms=target_ms, max_ms=max_ms, on_roster=self._roster
        )
        self.joined_as = ""
        self.joined_session: str | None = None
        self._links_seen = 0
        self._stopping = asyncio.Event()
        receivers[client] = self.receiver

    @property
    def codec(self) -> str:
        return self.sender.codec_name

    def _roster(self, roster: dict[str, Any]) -> None:
        codec = roster.get("codec")
        if isinstance(codec, str):
            self.sender.use_codec(codec)

    async def join(self, timeout: float = 10.0) -> None:
        """Join the channel (again, after the session expired).

        Raises:
            MessageRejected: the hub refused (the message says why).
            KoriNetTimeout: no answer.
        """
        reply = await self.client.request(
            {"channel": self.channel, "name": self.name, "codecs": self.codecs}, JOIN, timeout=timeout
        )
        self.joined_as = str(reply.get("name", self.name))
        self.joined_session = self.client.session_id
        self._links_seen = self.client.links_opened
        self.receiver.on_roster(reply)

    def set_talking(self, talking: bool) -> None:
        self.sender.set_talking(talking)

    def stop(self) -> None:
        self._stopping.set()

    @property
    def running(self) -> bool:
        return not self._stopping.is_set() and not self.client.is_closed

    async def run(self, duration: float | None = None) -> None:
        """Run the audio clock until :meth:`stop`, ``duration`` seconds, or the session ends."""
        await run_calls([self], duration)

    def start_devices(self) -> None:
        for device in (self.capture, self.playback):
            if device is not None:
                device.start()

    def stop_devices(self) -> None:
        self.sender.set_talking(False)  # a push-to-talk utterance in progress is posted
        for device in (self.capture, self.playback):
            if device is not None:
                device.stop()

    async def step(self) -> None:
        """One tick of the audio clock, then a rejoin at the live edge if the link changed."""
        self.tick()
        if self.client.links_opened != self._links_seen:
            await self._after_reconnect()

    def tick(self) -> None:
        """Send what was captured, play what is due."""
        now = self.clock()
        if self.capture is not None:
            for samples, captured in self.capture.read(now):
                self.sender.capture(samples, captured, now)
        playback = self.playback
        if playback is not None:
            for _ in range(10):  # bounded: a stalled loop catches up a little, not in a burst
                if playback.wanted(now) <= 0:
                    break
                playback.write(self.receiver.next_frame(now + playback.delay()))

    async def _after_reconnect(self) -> None:
        self._links_seen = self.client.links_opened
        self.stats.reconnects += 1
        self.receiver.go_live()
        if self.client.session_id != self.joined_session:  # a new session: the hub forgot us
            try:
                await self.join()
            except KoriNetError as exc:
                logger.warning("could not rejoin #%s: %s", self.channel, exc)


async def run_calls(calls: Sequence[Call], duration: float | None = None) -> None:
    """Drive several calls on one audio clock (one wake-up per tick for all of them)
    until each is stopped, ``duration`` seconds pass, or their sessions end."""
    loop = asyncio.get_running_loop()
    end = None if duration is None else loop.time() + duration
    for call in calls:
        call.start_devices()
    try:
        while any(call.running for call in calls):
            if end is not None and loop.time() >= end:
                break
            for call in calls:
                if call.running:
                    await call.step()
            await asyncio.sleep(TICK)  # stop() is seen within a tick
    finally:
        for call in calls:
            call.stop_devices()
