"""Hostile input to an open session: events or a closed link, never an exception,
and memory bounded by one maximum frame plus the last read."""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from session_helpers import SessionPair, split_frames

from korinet.exceptions import ConnectionClosedError
from korinet.session import (
    CLOSED,
    DETACHED,
    OPEN,
    CloseCode,
    LinkFailed,
    LinkOpened,
    MessageReceived,
    MessagesAcked,
    PeerClosed,
    PongReceived,
    RealtimeReceived,
    Session,
    SessionConfig,
    SessionExpiredEvent,
)
from korinet.session.handshake import encode_control
from korinet.wire.frames import HEADER_SIZE, FrameType, encode_frame, encode_message, encode_u64

MAX_FRAME = 512

control_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
close_maps = st.fixed_dictionaries(
    {"code": st.integers(0, 2000) | control_values},
    optional={
        "reason": st.text(max_size=10) | control_values,
        "versions": control_values,
        "codecs": control_values,
    },
)
frame_types = st.sampled_from(list(FrameType)) | st.integers(0, 255)

one_frame = st.one_of(
    # raw bytes, anything at all
    st.binary(max_size=64),
    # a well-formed header with a random body
    st.builds(lambda t, b: encode_frame(t, b), frame_types, st.binary(max_size=40)),
    # a plausible message, sometimes in sequence
    st.builds(
        lambda ft, seq, flags, corr, name, payload: encode_message(ft, seq, flags, corr, name, payload),
        st.sampled_from([FrameType.MSG, FrameType.RT]),
        st.integers(0, 4) | st.integers(0, 2**64 - 1),
        st.integers(0, 255),
        st.integers(0, 2**64 - 1),
        st.text(max_size=5),
        st.binary(max_size=20) | control_values.map(lambda v: msgpack.packb(v)),
    ),
    st.builds(
        lambda n: encode_frame(FrameType.ACK, encode_u64(n)), st.integers(0, 3) | st.integers(0, 2**64 - 1)
    ),
    st.builds(lambda m: encode_control(FrameType.CLOSE, m), close_maps),
    st.builds(
        lambda m: encode_control(FrameType.WELCOME, m), st.dictionaries(st.text(max_size=8), control_values)
    ),
    # a length prefix over the limit, or just under it
    st.builds(lambda n: n.to_bytes(4, "big") + b"\x03", st.integers(MAX_FRAME - 2, 2**32 - 1)),
)


def open_pair() -> SessionPair:
    config = SessionConfig(max_frame_size=MAX_FRAME)
    pair = SessionPair(config, config).open()
    pair.client.send_message("one in flight")  # so that an ACK 1 is legal
    pair.client.data_to_send()
    pair.client.events_received()
    assert pair.server is not None
    pair.server.events_received()
    return pair


ALLOWED = (MessageReceived, MessagesAcked, RealtimeReceived, PongReceived, PeerClosed, LinkFailed)


def feed_garbage(session: Session, pieces: list[bytes], splits: list[int]) -> list[Any]:
    stream = b"".join(pieces)
    events: list[Any] = []
    bounds = sorted({0, len(stream), *(s % (len(stream) + 1) for s in splits)})
    for a, b in itertools.pairwise(bounds):
        chunk = stream[a:b]
        session.receive_data(chunk, 1.0)  # must never raise
        events += session.events_received()
        decoder = session._decoder  # no public accessor; the bound is the point of the test
        if decoder is not None:
            # at most one maximum frame (header included) plus the last read
            assert decoder.buffered <= session.config.max_frame_size + HEADER_SIZE + len(chunk)
    return events


def check_outcome(session: Session, events: list[Any]) -> None:
    assert all(isinstance(e, ALLOWED) for e in events), events
    out = session.data_to_send()
    frames = split_frames(out)
    failed = [e for e in events if isinstance(e, LinkFailed)]
    closed_by_peer = [e for e in events if isinstance(e, PeerClosed)]
    if failed:
        assert len(failed) == 1 and events[-1] is failed[0]  # nothing after the failure
        assert session.close_expected()
        if failed[0].session_ended:  # a violation: we close
            assert session.state is CLOSED
            assert session.failure is failed[0].error
            assert frames and frames[-1].type is FrameType.CLOSE
        else:  # the peer said TRY_AGAIN_LATER: this link ends, the session may resume
            assert isinstance(failed[0].error, ConnectionClosedError)
            assert failed[0].error.code == CloseCode.TRY_AGAIN_LATER
            assert session.state is DETACHED
    elif closed_by_peer:
        assert events[-1] is closed_by_peer[0]
        assert session.state in (CLOSED, DETACHED) and session.close_expected()
    else:
        assert session.state is OPEN and not session.close_expected()
        assert all(f.type in (FrameType.PONG, FrameType.ACK) for f in frames)


@given(st.lists(one_frame, min_size=1, max_size=8), st.lists(st.integers(0, 10_000), max_size=6))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_garbage_to_an_open_client(pieces: list[bytes], splits: list[int]) -> None:
    pair = open_pair()
    events = feed_garbage(pair.client, pieces, splits)
    check_outcome(pair.client, events)


@given(st.lists(one_frame, min_size=1, max_size=8), st.lists(st.integers(0, 10_000), max_size=6))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_garbage_to_an_open_server(pieces: list[bytes], splits: list[int]) -> None:
    pair = open_pair()
    assert pair.server is not None
    events = feed_garbage(pair.server, pieces, splits)
    check_outcome(pair.server, events)


@given(st.binary(min_size=1, max_size=4096))
@settings(max_examples=100, deadline=None)
def test_random_bytes_in_one_large_read(data: bytes) -> None:
    pair = open_pair()
    events = feed_garbage(pair.client, [data], [])
    check_outcome(pair.client, events)


@given(st.lists(one_frame, min_size=1, max_size=6))
@settings(max_examples=100, deadline=None)
def test_garbage_instead_of_a_welcome(pieces: list[bytes]) -> None:
    pair = SessionPair().open()
    pair.cut()
    pair.client.connection_made(1.0)
    pair.client.data_to_send()
    pair.client.events_received()
    events = feed_garbage(pair.client, pieces, [])
    assert all(isinstance(e, (*ALLOWED, LinkOpened, SessionExpiredEvent)) for e in events), events
    failed = [e for e in events if isinstance(e, LinkFailed)]
    if failed and failed[0].session_ended:
        assert pair.client.state is CLOSED
        assert split_frames(pair.client.data_to_send())[-1].type is FrameType.CLOSE


def test_buffer_stays_bounded_under_a_slow_maximum_frame() -> None:
    pair = open_pair()
    client = pair.client
    header = (MAX_FRAME).to_bytes(4, "big") + bytes([FrameType.PING])
    client.receive_data(header, 1.0)
    for _ in range(MAX_FRAME - 2):
        client.receive_data(b"\x00", 1.0)
        assert client._decoder is not None and client._decoder.buffered <= MAX_FRAME + HEADER_SIZE
    client.receive_data(b"\x00", 1.0)  # completes the frame: a PING of 511 bytes is answered
    assert split_frames(client.data_to_send())[-1].type is FrameType.PONG
    assert client._decoder is not None and client._decoder.buffered == 0
