"""Each codec round trip, concealment, bad payloads, and negotiation."""

from __future__ import annotations

import numpy as np
import pytest
from korinet_audio import codecs
from korinet_audio.codecs import PCM16, PayloadError, negotiate
from korinet_audio.frames import FRAME_SAMPLES, SAMPLE_RATE

OPUS_REASON = codecs.opus_missing_reason()
needs_opus = pytest.mark.skipif(
    OPUS_REASON is not None,
    reason=f"Opus unavailable ({OPUS_REASON}); install libopus0 and opuslib-next (pip install -e '.[opus]')",
)


def tone(frames: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(frames * FRAME_SAMPLES) / SAMPLE_RATE
    return (np.sin(2 * np.pi * freq * t) * 8000).astype(np.int16)


def dominant(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    return float(np.argmax(spectrum) * SAMPLE_RATE / len(samples))


def test_pcm16_round_trip_is_exact() -> None:
    codec = codecs.create(PCM16)
    samples = tone(1)
    payload = codec.encode(samples)
    assert len(payload) == 640
    assert np.array_equal(codec.decode(payload), samples)
    assert not codec.conceal().any()
    with pytest.raises(PayloadError):
        codec.decode(b"\x00" * 639)


@needs_opus
def test_opus_round_trip_keeps_the_tone_at_speech_bitrate() -> None:
    encoder, decoder = codecs.create("opus"), codecs.create("opus")
    samples = tone(50)
    payloads = [encoder.encode(samples[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]) for i in range(50)]
    kbps = sum(map(len, payloads)) * 8 / 1.0 / 1000
    assert 10 <= kbps <= 32, kbps
    decoded = np.concatenate([decoder.decode(p) for p in payloads])
    assert decoded.dtype == np.int16 and len(decoded) == len(samples)
    assert abs(dominant(decoded[FRAME_SAMPLES * 10 :]) - 440) <= 5
    concealed = decoder.conceal()  # packet-loss concealment continues the tone
    assert len(concealed) == FRAME_SAMPLES and np.abs(concealed).max() > 1000


@needs_opus
@pytest.mark.parametrize("bad", [b"", b"\xff\xff\xff", b"\x00" * 1400])
def test_opus_refuses_bad_payloads_with_payload_error(bad: bytes) -> None:
    decoder = codecs.create("opus")
    with pytest.raises(PayloadError):
        decoder.decode(bad)


def test_available_lists_pcm16_last_and_create_refuses_unknown() -> None:
    assert codecs.available()[-1] == PCM16
    with pytest.raises(codecs.CodecUnavailable):
        codecs.create("nope")


def test_negotiate_picks_the_best_codec_every_member_decodes() -> None:
    assert negotiate(["opus", PCM16], [["opus", PCM16], ["opus", PCM16]]) == "opus"
    assert negotiate(["opus", PCM16], [["opus", PCM16], [PCM16]]) == PCM16
    assert negotiate(["opus", PCM16], []) == "opus"
    assert negotiate(["x"], [["y"]]) == PCM16


def test_a_third_party_codec_registers_and_negotiates() -> None:
    class Loud(codecs.PCM16Codec):
        name = "loud"

    codecs.register_codec("loud", Loud, preferred=True)
    try:
        assert codecs.available()[0] == "loud"
        assert codecs.create("loud").name == "loud"
    finally:
        del codecs.REGISTRY["loud"]
