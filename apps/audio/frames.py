"""The audio frame and the utterance: what korinet-audio puts on the wire (docs/AUDIO.md).

An *audio frame* is 20 ms of one talker's audio, sent on the realtime lane. On the
wire it is a msgpack array, short on purpose (50 of them a second)::

    [1, stream, seq, capture_us, codec, payload, src]

* ``stream``: a random 32-bit id chosen when a talker starts; a new id tells the
  receiver to forget what it knew of that talker (seq restarted).
* ``seq``: frame counter within the stream (a gap = a lost or late frame).
* ``capture_us``: the talker's wall clock, in microseconds, when the frame was
  captured. Receivers only use differences of it (jitter, staleness); end-to-end
  latency is exact only where both clocks agree (one host, or NTP on a LAN).
* ``codec``: the codec name (``"opus"``, ``"pcm16"``), ``payload`` its bytes.
* ``src``: who spoke; empty from the talker, filled in by the hub.

An *utterance part* (push-to-talk only) carries up to PART_FRAMES consecutive
frames of one utterance on the reliable lane, so that a listener who was away hears
them once afterwards. Parsing never trusts the peer: every field is checked and a bad
object raises :class:`MalformedFrame` (a ``ValueError``, which the runtime counts).

Pure code, no numpy: the plugin module imports it in every KoriNet process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "FRAME_MS",
    "FRAME_SAMPLES",
    "MAX_PAYLOAD",
    "PART_FRAMES",
    "SAMPLE_RATE",
    "AudioFrame",
    "MalformedFrame",
    "UtterancePart",
]

SAMPLE_RATE: Final = 16000
FRAME_MS: Final = 20
FRAME_SAMPLES: Final = SAMPLE_RATE * FRAME_MS // 1000  # 320
#: Largest payload accepted: 20 ms of 16-bit PCM (640 bytes) with room for any Opus packet.
MAX_PAYLOAD: Final = 1500
#: Frames per reliable utterance part (0.5 s): small messages, quick catch-up.
PART_FRAMES: Final = 25

WIRE_VERSION: Final = 1
_U32: Final = 2**32
_U63: Final = 2**63
_CODEC_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,15}\Z")
_MAX_SRC = 64


class MalformedFrame(ValueError):
    """A peer sent an audio frame or utterance that does not follow the format."""


def _int(value: Any, what: str, limit: int) -> int:
    # bool is an int subclass; a peer sending true for a seq is still wrong
    if type(value) is not int or not 0 <= value < limit:
        raise MalformedFrame(f"{what} must be an integer in [0, {limit})")
    return value


def _codec(value: Any) -> str:
    if type(value) is not str or not _CODEC_NAME.match(value):
        raise MalformedFrame("codec must be a short lowercase name")
    return value


def _src(value: Any) -> str:
    if type(value) is not str or len(value) > _MAX_SRC:
        raise MalformedFrame(f"src must be a string of at most {_MAX_SRC} characters")
    return value


def _payload(value: Any) -> bytes:
    if type(value) is not bytes or len(value) > MAX_PAYLOAD:
        raise MalformedFrame(f"payload must be bytes, at most {MAX_PAYLOAD}")
    return value


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """20 ms of one talker's audio (see the module docstring for the fields)."""

    stream: int
    seq: int
    capture_us: int
    codec: str
    payload: bytes
    src: str = ""

    def to_wire(self) -> list[Any]:
        return [WIRE_VERSION, self.stream, self.seq, self.capture_us, self.codec, self.payload, self.src]

    def with_src(self, src: str) -> AudioFrame:
        return AudioFrame(self.stream, self.seq, self.capture_us, self.codec, self.payload, src)

    @property
    def capture_time(self) -> float:
        """Capture time in seconds of the talker's wall clock."""
        return self.capture_us / 1e6

    @classmethod
    def parse(cls, obj: Any) -> AudioFrame:
        """Check a decoded wire object and build the frame.

        Raises:
            MalformedFrame: anything but a well-formed version-1 frame.
        """
        if not isinstance(obj, list | tuple) or len(obj) != 7:
            raise MalformedFrame("an audio frame is an array of 7 items")
        version, stream, seq, capture_us, codec, payload, src = obj
        if version != WIRE_VERSION or type(version) is not int:
            raise MalformedFrame(f"unsupported audio frame version {version!r}")
        return cls(
            _int(stream, "stream", _U32),
            _int(seq, "seq", _U63),
            _int(capture_us, "capture_us", _U63),
            _codec(codec),
            _payload(payload),
            _src(src),
        )


@dataclass(frozen=True, slots=True)
class UtterancePart:
    """Consecutive frames of one push-to-talk utterance, sent on the reliable lane.

    Attributes:
        stream, first_seq: the live frames these payloads were sent as
            (``first_seq``, ``first_seq + 1``, ...): a listener compares them with
            what it received live to decide whether it missed them.
        utterance: counter of utterances within the stream.
        capture_us: capture time of the first frame.
        final: the last part of its utterance.
    """

    stream: int
    utterance: int
    first_seq: int
    capture_us: int
    codec: str
    payloads: tuple[bytes, ...]
    final: bool = False
    src: str = ""

    @property
    def seqs(self) -> range:
        return range(self.first_seq, self.first_seq + len(self.payloads))

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": WIRE_VERSION,
            "stream": self.stream,
            "utterance": self.utterance,
            "first_seq": self.first_seq,
            "capture_us": self.capture_us,
            "codec": self.codec,
            "payloads": list(self.payloads),
            "final": self.final,
            "src": self.src,
        }

    def with_src(self, src: str) -> UtterancePart:
        return UtterancePart(
            self.stream, self.utterance, self.first_seq, self.capture_us, self.codec, self.payloads,
            self.final, src,
        )  # fmt: skip

    @classmethod
    def parse(cls, obj: Any) -> UtterancePart:
        """Check a decoded wire object and build the part.

        Raises:
            MalformedFrame: anything but a well-formed version-1 part.
        """
        if not isinstance(obj, dict):
            raise MalformedFrame("an utterance part is a map")
        if obj.get("v") != WIRE_VERSION:
            raise MalformedFrame(f"unsupported utterance version {obj.get('v')!r}")
        payloads = obj.get("payloads")
        if not isinstance(payloads, list | tuple) or not 0 < len(payloads) <= PART_FRAMES:
            raise MalformedFrame(f"payloads must be a list of 1 to {PART_FRAMES} frames")
        final = obj.get("final", False)
        if type(final) is not bool:
            raise MalformedFrame("final must be a boolean")
        return cls(
            _int(obj.get("stream"), "stream", _U32),
            _int(obj.get("utterance"), "utterance", _U63),
            _int(obj.get("first_seq"), "first_seq", _U63),
            _int(obj.get("capture_us"), "capture_us", _U63),
            _codec(obj.get("codec")),
            tuple(_payload(p) for p in payloads),
            final,
            _src(obj.get("src", "")),
        )
