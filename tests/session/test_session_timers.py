"""Heartbeats, dead-peer detection and the handshake timeout, on a fake clock."""

from __future__ import annotations

import pytest
from session_helpers import SessionPair, codecs, frames_in, of_type, split_frames

from korinet.exceptions import ConnectionClosedError, KoriNetTimeout
from korinet.session import (
    CLIENT,
    CONNECTING,
    DETACHED,
    OPEN,
    CloseCode,
    LinkFailed,
    LinkOpened,
    PongReceived,
    Session,
    SessionConfig,
)
from korinet.wire.frames import FrameType, encode_frame, encode_u64

HB = 5.0


def test_ping_every_heartbeat_interval_and_pong_reply() -> None:
    pair = SessionPair(SessionConfig(heartbeat_interval=HB)).open()
    client, server = pair.client, pair.server
    assert server is not None
    assert client.next_deadline() == pytest.approx(HB)
    client.tick(HB - 0.01)
    assert client.data_to_send() == b""
    pings = 0
    for k in range(1, 6):
        pair.now = k * HB
        client.tick(pair.now)
        out = client.data_to_send()
        assert frames_in(out) == [FrameType.PING], k
        pings += 1
        assert client.next_deadline() == pytest.approx(pair.now + HB)
        client.tick(pair.now + HB / 2)  # not yet time for the next one
        assert client.data_to_send() == b""
        pair.now += 0.25
        server.receive_data(out, pair.now)
        reply = server.data_to_send()
        assert split_frames(reply)[0].type is FrameType.PONG
        assert split_frames(reply)[0].body == split_frames(out)[0].body
        pair.now += 0.25
        client.receive_data(reply, pair.now)
        assert of_type(client.events_received(), PongReceived) == [PongReceived(pytest.approx(0.5))]
    assert pings == 5
    assert client.state is OPEN


def test_stale_pong_is_ignored() -> None:
    pair = SessionPair(SessionConfig(heartbeat_interval=HB)).open()
    client = pair.client
    client.tick(HB)
    client.data_to_send()
    client.receive_data(encode_frame(FrameType.PONG, encode_u64(999)), HB + 1)
    assert of_type(client.events_received(), PongReceived) == []
    assert client.state is OPEN


def run_until_link_failed(session: Session, start: float, limit: float) -> tuple[float, LinkFailed]:
    """Call tick() at each next_deadline(), sending nothing anywhere, until LinkFailed."""
    now = start
    while now <= limit:
        deadline = session.next_deadline()
        assert deadline is not None and deadline > now - 1e-9
        now = deadline
        session.tick(now)
        session.data_to_send()  # the pings go nowhere
        failed = of_type(session.events_received(), LinkFailed)
        if failed:
            return now, failed[0]
    raise AssertionError(f"no LinkFailed by t={limit}")


@pytest.mark.parametrize("side", ["client", "server"])
def test_silent_peer_detected_within_three_intervals(side: str) -> None:
    pair = SessionPair(SessionConfig(heartbeat_interval=HB), SessionConfig(heartbeat_interval=HB)).open()
    session = pair.client if side == "client" else pair.server
    assert session is not None
    session.events_received()
    # Nothing ever arrives again from the peer.
    detected_at, failed = run_until_link_failed(session, 0.0, 10 * HB)
    assert HB < detected_at <= 3 * HB
    assert not failed.session_ended
    assert isinstance(failed.error, ConnectionClosedError)
    assert failed.error.code == CloseCode.HEARTBEAT_TIMEOUT
    assert session.close_expected()
    assert session.state is DETACHED  # resumable
    assert session.stats.heartbeat_timeouts == 1
    assert session.next_deadline() is None


def test_detection_uses_the_peer_heartbeat_interval() -> None:
    # The server pings every second: a client waiting 2.5 x its own 10 s would be far too slow.
    pair = SessionPair(SessionConfig(heartbeat_interval=10.0), SessionConfig(heartbeat_interval=1.0)).open()
    detected_at, _ = run_until_link_failed(pair.client, 0.0, 100.0)
    assert detected_at <= 3 * 1.0
    pair = SessionPair(SessionConfig(heartbeat_interval=1.0), SessionConfig(heartbeat_interval=10.0)).open()
    detected_at, _ = run_until_link_failed(pair.client, 0.0, 100.0)
    assert 10.0 < detected_at <= 30.0  # a slow pinger is not declared dead early


def test_live_peers_never_time_out() -> None:
    pair = SessionPair(SessionConfig(heartbeat_interval=HB), SessionConfig(heartbeat_interval=2.0)).open()
    server = pair.server
    assert server is not None
    for _ in range(2000):
        deadlines = [d for d in (pair.client.next_deadline(), server.next_deadline()) if d is not None]
        pair.now = min(deadlines)
        pair.client.tick(pair.now)
        server.tick(pair.now)
        pair.pump()
    assert pair.now > 100 * HB
    assert of_type(pair.client_events + pair.server_events, LinkFailed) == []
    assert pair.client.state is OPEN and server.state is OPEN


def test_any_traffic_counts_as_life() -> None:
    pair = SessionPair(SessionConfig(heartbeat_interval=HB), SessionConfig(heartbeat_interval=HB)).open()
    server = pair.server
    assert server is not None
    for i in range(1, 40):
        pair.now = i * HB
        server.send_message(i)  # the server never ticks, so it never pings; messages suffice
        pair.pump()
        pair.client.tick(pair.now)
    assert pair.client.state is OPEN
    assert of_type(pair.client_events, LinkFailed) == []


def test_dead_link_ignores_further_bytes_until_replaced() -> None:
    pair = SessionPair().open()
    run_until_link_failed(pair.client, 0.0, 1000.0)
    pair.client.receive_data(encode_frame(FrameType.PING, encode_u64(1)), 999.0)
    assert pair.client.data_to_send() == b""  # no PONG from a link declared dead
    pair.cut()
    pair.connect()
    pair.pump()
    assert pair.client.state is OPEN
    assert of_type(pair.client_events, LinkOpened)[-1].resumed


def test_handshake_timeout() -> None:
    client = Session(CLIENT, codecs(), SessionConfig(handshake_timeout=10.0))
    client.connection_made(100.0)
    client.data_to_send()
    assert client.state is CONNECTING
    assert client.next_deadline() == 110.0
    client.tick(109.9)
    assert client.events_received() == []
    assert not client.close_expected()
    client.tick(110.0)
    (failed,) = client.events_received()
    assert isinstance(failed, LinkFailed) and isinstance(failed.error, KoriNetTimeout)
    assert isinstance(failed.error, TimeoutError)
    assert not failed.session_ended
    assert client.close_expected()
    assert client.state is DETACHED
    client.connection_lost(110.0)
    client.connection_made(111.0)  # and it may try again
    assert client.state is CONNECTING


def test_partial_welcome_does_not_stop_the_handshake_timer() -> None:
    pair = SessionPair(SessionConfig(handshake_timeout=10.0))
    pair.connect()
    pair.pump()
    pair.cut()
    pair.connect()  # resume attempt; the server's answer trickles in and stalls
    pair.collect()
    pair._feed_server(bytes(pair.to_server))
    pair.to_server.clear()
    pair.collect()
    pair.client.receive_data(bytes(pair.to_client[:7]), 1.0)
    pair.client.tick(10.0)
    assert of_type(pair.client.events_received(), LinkFailed)
    assert pair.client.close_expected()


def test_no_deadline_while_detached() -> None:
    client = Session(CLIENT, codecs())
    assert client.next_deadline() is None
    client.tick(1e9)
    assert client.events_received() == [] and client.data_to_send() == b""
