"""A misbehaving peer cannot bend the session's rules (seq 0, unasked resumes, acks
for what was never sent, heartbeats that make it undetectable, byte drips)."""

from __future__ import annotations

import struct

from session_helpers import SessionPair, close_code, of_type

from korinet.session import CLOSED, LinkFailed, SessionConfig
from korinet.session.state import CloseCode
from korinet.wire.frames import FrameType, encode_frame, encode_u64

PLAIN = struct.Struct(">IBQBB")


def test_message_with_sequence_zero_is_a_protocol_error() -> None:
    pair = SessionPair().open()
    pair.client.receive_data(PLAIN.pack(11 + 1, FrameType.MSG, 0, 0, 0) + b"\xc0", pair.now)
    assert pair.client.state is CLOSED
    assert close_code(pair.client.data_to_send()) == CloseCode.PROTOCOL_ERROR


def test_ack_for_a_message_never_sent_is_a_protocol_error() -> None:
    pair = SessionPair().open()
    pair.client.receive_data(encode_frame(FrameType.ACK, encode_u64(1)), pair.now)
    assert pair.client.state is CLOSED
    assert any("never sent" in str(e.error) for e in of_type(pair.client.events_received(), LinkFailed))


def test_a_resume_the_client_did_not_ask_for_is_refused() -> None:
    from korinet.codecs import MsgpackCodec
    from korinet.session import CLIENT, Session
    from korinet.session.handshake import encode_control

    client = Session(CLIENT, {"msgpack": MsgpackCodec()})
    client.connection_made(0.0)
    welcome = {
        "version": 3,
        "codec": "msgpack",
        "session": "someone-elses",
        "token": "t",
        "resumed": True,
        "received": 0,
        "heartbeat": 5.0,
        "window": 10,
        "window_bytes": 1000,
        "max_frame": 1000,
        "expired": None,
    }
    client.receive_data(encode_control(FrameType.WELCOME, welcome), 0.0)
    assert client.state is CLOSED


def test_a_huge_announced_heartbeat_is_capped() -> None:
    pair = SessionPair(client_config=SessionConfig(heartbeat_interval=1e9, max_peer_heartbeat=60.0))
    pair.server_config = SessionConfig(max_peer_heartbeat=60.0)
    pair.open()
    server = pair.server
    assert server is not None
    deadline = server.next_deadline()
    assert deadline is not None and deadline <= pair.now + 2.5 * 60.0


def test_a_byte_drip_does_not_keep_a_link_alive() -> None:
    config = SessionConfig(heartbeat_interval=1.0)
    pair = SessionPair(client_config=config, server_config=config).open()
    server = pair.server
    assert server is not None
    server.receive_data(PLAIN.pack(1000, FrameType.MSG, 1, 0, 0)[:5], pair.now)  # a frame starts...
    for second in range(1, 5):  # ...and one byte a second follows
        server.receive_data(b"\x00", pair.now + second)
        server.tick(pair.now + second)
    assert any(isinstance(e, LinkFailed) for e in server.events_received())
    assert server.close_expected()
