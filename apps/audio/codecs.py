"""Audio codecs: Opus (when libopus is there) and PCM16 (always), as plugins.

A codec turns 20 ms of 16 kHz mono int16 samples into a payload and back, and
conceals a missing frame. Each talker encodes with one codec instance and each
listener keeps one decoder instance per talker (Opus carries state between frames).

Codecs are found in :data:`REGISTRY` (name -> factory): :func:`register_codec` adds
one, as a third party would. Which codec a call uses is negotiated when a talker
joins a channel: the first of the talker's preferences that every member can
decode (:func:`negotiate`); PCM16 is the floor every member has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from .frames import FRAME_SAMPLES, SAMPLE_RATE

__all__ = [
    "PCM16",
    "REGISTRY",
    "AudioCodec",
    "CodecUnavailable",
    "PayloadError",
    "available",
    "create",
    "negotiate",
    "opus_missing_reason",
    "register_codec",
]

logger = logging.getLogger(__name__)

Samples = npt.NDArray[np.int16]

PCM16: Final = "pcm16"
OPUS: Final = "opus"


class PayloadError(ValueError):
    """A payload this codec cannot decode (a peer's bug or a forged frame)."""


class CodecUnavailable(RuntimeError):
    """The codec's library is not installed."""


class AudioCodec(Protocol):
    """20 ms of 16 kHz mono int16 in, a payload out; and back."""

    name: str

    def encode(self, samples: Samples) -> bytes: ...

    def decode(self, payload: bytes) -> Samples:
        """Raises PayloadError for a payload that is not a valid frame."""
        ...

    def conceal(self) -> Samples:
        """A stand-in for a missing frame."""
        ...


class PCM16Codec:
    """Raw little-endian 16-bit samples: 256 kbit/s, no state, silence as concealment."""

    name = PCM16
    _BYTES: Final = FRAME_SAMPLES * 2

    def __init__(self) -> None:
        self._silence = np.zeros(FRAME_SAMPLES, np.int16)

    def encode(self, samples: Samples) -> bytes:
        return samples.astype("<i2", copy=False).tobytes()

    def decode(self, payload: bytes) -> Samples:
        if len(payload) != self._BYTES:
            raise PayloadError(f"a pcm16 frame is {self._BYTES} bytes, not {len(payload)}")
        return np.frombuffer(payload, "<i2").astype(np.int16)

    def conceal(self) -> Samples:
        return self._silence


class OpusCodec:
    """Opus over libopus (opuslib-next), tuned for speech: VoIP mode, 24 kbit/s,
    packet-loss concealment from the decoder's state."""

    name = OPUS

    def __init__(self, bitrate: int = 24000) -> None:
        try:
            import opuslib_next  # type: ignore[import-untyped]
            import opuslib_next.api.decoder  # type: ignore[import-untyped]
        except Exception as exc:  # ImportError, or OSError/Exception when libopus is missing
            raise CodecUnavailable(f"opus needs opuslib-next and libopus0: {exc}") from exc
        self._lib = opuslib_next
        self._plc = opuslib_next.api.decoder.decode
        self._encoder = opuslib_next.Encoder(SAMPLE_RATE, 1, opuslib_next.APPLICATION_VOIP)
        self._encoder.bitrate = bitrate
        self._decoder = opuslib_next.Decoder(SAMPLE_RATE, 1)

    def encode(self, samples: Samples) -> bytes:
        data: bytes = self._encoder.encode(samples.astype("<i2", copy=False).tobytes(), FRAME_SAMPLES)
        return data

    def decode(self, payload: bytes) -> Samples:
        if not payload:
            raise PayloadError("an empty opus frame")
        try:
            pcm = self._decoder.decode(payload, FRAME_SAMPLES)
        except self._lib.OpusError as exc:
            raise PayloadError(f"opus: {exc}") from None
        if len(pcm) != FRAME_SAMPLES * 2:
            raise PayloadError(f"an opus frame of {len(pcm) // 2} samples, not {FRAME_SAMPLES}")
        return np.frombuffer(pcm, "<i2").astype(np.int16)

    def conceal(self) -> Samples:
        pcm = self._plc(self._decoder.decoder_state, None, 0, FRAME_SAMPLES, False, channels=1)
        return np.frombuffer(pcm, "<i2").astype(np.int16)


#: name -> factory, in order of preference (best first).
REGISTRY: dict[str, Callable[[], AudioCodec]] = {OPUS: OpusCodec, PCM16: PCM16Codec}
_unavailable: dict[str, str] = {}


def register_codec(name: str, factory: Callable[[], Any], *, preferred: bool = False) -> None:
    """Add a codec (a third party's, say). ``preferred`` puts it first."""
    if preferred:
        items = [(name, factory), *((n, f) for n, f in REGISTRY.items() if n != name)]
        REGISTRY.clear()
        REGISTRY.update(items)
    else:
        REGISTRY[name] = factory
    _unavailable.pop(name, None)


def create(name: str) -> AudioCodec:
    """A new instance of codec ``name``.

    Raises:
        CodecUnavailable: unknown name, or its library is missing.
    """
    factory = REGISTRY.get(name)
    if factory is None:
        raise CodecUnavailable(f"no codec named {name!r} (known: {', '.join(REGISTRY)})")
    return factory()


def available() -> list[str]:
    """Codecs this process can use, best first (each is tried once)."""
    names = []
    for name in REGISTRY:
        if name in _unavailable:
            continue
        try:
            create(name)
        except CodecUnavailable as exc:
            _unavailable[name] = str(exc)
            logger.info("codec %s unavailable: %s", name, exc)
            continue
        names.append(name)
    return names


def opus_missing_reason() -> str | None:
    """Why Opus cannot be used here, or None when it can."""
    return None if OPUS in available() else _unavailable.get(OPUS, "not registered")


def negotiate(preferences: Sequence[str], members: Iterable[Sequence[str]]) -> str:
    """The first codec of ``preferences`` that every member can decode (PCM16 at worst)."""
    decodable = [set(m) for m in members]
    for name in preferences:
        if all(name in d for d in decodable):
            return name
    return PCM16
