"""An open session pair: messages, acknowledgements, windows, realtime, close."""

from __future__ import annotations

import pytest
from session_helpers import SessionPair, close_code, codecs, frames_in, of_type, split_frames

from korinet.exceptions import (
    CodecError,
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidState,
    MessageTooLarge,
    RemoteProtocolError,
    SendBufferFull,
)
from korinet.session import (
    CLIENT,
    CLOSED,
    DETACHED,
    OPEN,
    SERVER,
    CloseCode,
    HandshakeOutcome,
    LinkFailed,
    LinkOpened,
    MessageReceived,
    MessagesAcked,
    PeerClosed,
    RealtimeReceived,
    ServerHandshake,
    Session,
    SessionConfig,
)
from korinet.session.handshake import encode_close
from korinet.wire.frames import Frame, FrameType, MessageFlags, encode_frame, encode_message, encode_u64


def msg_frame(seq: int, payload: bytes = b"\xc0", mtype: str = "") -> bytes:
    return encode_message(FrameType.MSG, seq, 0, 0, mtype, payload)


# ---------------------------------------------------------------------- opening


def test_first_link_opens_a_new_session_on_both_sides() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    assert pair.client.state is OPEN and server.state is OPEN
    assert pair.client.session_id == server.session_id is not None
    assert pair.client.token == server.token is not None
    (c_open,) = of_type(pair.client_events, LinkOpened)
    (s_open,) = of_type(pair.server_events, LinkOpened)
    assert c_open == LinkOpened(server.session_id, False, 3, "msgpack", 0)
    assert s_open == LinkOpened(server.session_id, False, 3, "msgpack", 0)
    assert pair.failures() == []


def test_session_ids_and_tokens_are_fresh() -> None:
    a, b = SessionPair().open(), SessionPair().open()
    assert a.client.session_id != b.client.session_id
    assert a.client.token != b.client.token


def test_client_preferring_json_talks_json() -> None:
    pair = SessionPair(SessionConfig(codecs=("json", "msgpack"))).open()
    assert pair.client.codec is not None and pair.client.codec.name == "json"
    pair.client.send_message({"a": [1, "é"]}, "t")
    wire = pair.client.data_to_send()
    assert b'{"a":[1,"\xc3\xa9"]}' in wire
    pair.to_server += wire
    pair.pump()
    assert pair.server_app.inbox == [{"a": [1, "é"]}]


# ---------------------------------------------------------------------- messages


def test_messages_both_ways_arrive_in_order() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    sent_c = [{"n": i, "from": "client"} for i in range(20)]
    sent_s = [[i, b"\x00" * i] for i in range(15)]
    for i, obj in enumerate(sent_c):
        assert pair.client.send_message(obj, "c.msg") == i + 1
    for i, obj in enumerate(sent_s):
        assert server.send_message(obj, "s.msg") == i + 1
    pair.pump(chunk=7)
    got = of_type(pair.server_events, MessageReceived)
    assert [(m.seq, m.type, m.obj) for m in got] == [(i + 1, "c.msg", o) for i, o in enumerate(sent_c)]
    got = of_type(pair.client_events, MessageReceived)
    assert [(m.seq, m.type, m.obj) for m in got] == [(i + 1, "s.msg", o) for i, o in enumerate(sent_s)]
    assert pair.client.stats.messages_sent == 20 and server.stats.messages_received == 20


def test_flags_and_correlation_id_reach_the_peer() -> None:
    pair = SessionPair().open()
    pair.client.send_message("q", "rpc", flags=MessageFlags.REQUEST, corr=41)
    pair.client.send_message("plain", "")
    pair.pump()
    first, second = of_type(pair.server_events, MessageReceived)
    assert (first.flags, first.corr, first.type, first.obj) == (MessageFlags.REQUEST, 41, "rpc", "q")
    assert (second.flags, second.corr, second.type, second.obj) == (0, 0, "", "plain")


def test_no_ack_before_delivery_then_one_ack_after() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    pair.client.send_message("hello")
    pair.pump()
    assert len(of_type(pair.server_events, MessageReceived)) == 1
    # Received is not delivered: nothing is acknowledged, however long we wait.
    assert server.data_to_send() == b""
    assert of_type(pair.client_events, MessagesAcked) == []
    assert pair.client.unacked == 1 and pair.client.acked == 0
    server.message_delivered(1)
    out = server.data_to_send()
    assert split_frames(out) == [Frame(FrameType.ACK, encode_u64(1))]
    assert server.data_to_send() == b""  # the ack is not repeated
    pair.to_client += out
    pair.pump()
    assert of_type(pair.client_events, MessagesAcked) == [MessagesAcked(1)]
    assert pair.client.unacked == 0 and pair.client.acked == 1 and pair.client.unacked_bytes == 0


def test_acks_are_cumulative_and_coalesced() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    for i in range(100):
        pair.client.send_message(i)
    pair.pump()
    for seq in range(1, 101):
        server.message_delivered(seq)
    out = server.data_to_send()
    assert frames_in(out) == [FrameType.ACK]
    assert split_frames(out)[0].body == encode_u64(100)
    pair.to_client += out
    pair.pump()
    assert of_type(pair.client_events, MessagesAcked) == [MessagesAcked(100)]
    assert pair.client.unacked == 0


def test_out_of_order_deliveries_still_ack_cumulatively() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    for i in range(6):
        pair.client.send_message(i)
    pair.pump()
    server.message_delivered(3)
    server.message_delivered(2)
    assert server.data_to_send() == b""  # 1 is still with the application
    assert server.delivered == 0
    server.message_delivered(1)
    assert split_frames(server.data_to_send())[0].body == encode_u64(3)
    server.message_delivered(6)
    server.message_delivered(5)
    assert server.data_to_send() == b""
    server.message_delivered(4)
    assert split_frames(server.data_to_send())[0].body == encode_u64(6)


def test_bogus_delivery_reports_are_ignored() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    pair.client.send_message("x")
    pair.pump()
    server.message_delivered(2)  # never received
    server.message_delivered(0)
    assert server.data_to_send() == b""
    server.message_delivered(1)
    server.message_delivered(1)  # twice
    assert frames_in(server.data_to_send()) == [FrameType.ACK]
    assert server.data_to_send() == b""


def test_duplicate_message_is_dropped_and_counted() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    pair.client.send_message("once")
    wire = pair.client.data_to_send()
    server.receive_data(wire, 0.0)
    server.receive_data(wire, 0.0)  # a replay of the same frame
    server.receive_data(msg_frame(1, b"\xa5other"), 0.0)  # same seq, other content
    assert [e.obj for e in of_type(server.events_received(), MessageReceived)] == ["once"]
    assert server.stats.duplicates_dropped == 2
    assert server.stats.messages_received == 1
    assert server.state is OPEN


def test_send_before_the_first_handshake_is_invalid() -> None:
    client = Session(CLIENT, codecs())
    with pytest.raises(InvalidState):
        client.send_message("too early")
    client.connection_made(0.0)
    with pytest.raises(InvalidState):
        client.send_message("still too early")


def test_unencodable_object_raises_and_consumes_no_sequence_number() -> None:
    pair = SessionPair(SessionConfig(codecs=("json",))).open()
    with pytest.raises(CodecError):
        pair.client.send_message(b"bytes are not json")
    assert pair.client.send_message("fine") == 1
    assert pair.client.unacked == 1


def test_message_over_the_peer_frame_limit_is_refused_locally() -> None:
    pair = SessionPair(server_config=SessionConfig(max_frame_size=1000)).open()
    with pytest.raises(MessageTooLarge) as info:
        pair.client.send_message(b"x" * 1000)
    assert info.value.limit == 1000
    assert pair.client.unacked == 0
    assert pair.client.send_message(b"x" * 900) == 1
    pair.pump()
    assert len(of_type(pair.server_events, MessageReceived)) == 1
    assert pair.failures() == []


# ---------------------------------------------------------------------- windows


def test_send_buffer_full_at_the_window_then_free_after_acks() -> None:
    pair = SessionPair(SessionConfig(window=3)).open()
    server = pair.server
    assert server is not None
    for i in range(3):
        pair.client.send_message(i)
    assert not pair.client.can_send()
    with pytest.raises(SendBufferFull):
        pair.client.send_message("one too many")
    assert pair.client.unacked == 3
    pair.pump()
    server.message_delivered(1)
    pair.pump()
    assert pair.client.can_send()
    assert pair.client.send_message("now fits") == 4
    with pytest.raises(SendBufferFull):
        pair.client.send_message("full again")


def test_the_smaller_of_both_windows_applies() -> None:
    pair = SessionPair(SessionConfig(window=100), SessionConfig(window=2)).open()
    assert pair.client.send_window == 2
    assert pair.server is not None and pair.server.send_window == 2
    pair.client.send_message(1)
    pair.client.send_message(2)
    with pytest.raises(SendBufferFull):
        pair.client.send_message(3)


def test_window_applies_while_detached_too() -> None:
    pair = SessionPair(SessionConfig(window=2)).open()
    pair.cut()
    pair.client.send_message(1)
    pair.client.send_message(2)
    with pytest.raises(SendBufferFull):
        pair.client.send_message(3)


def test_byte_window() -> None:
    pair = SessionPair(SessionConfig(window_bytes=100)).open()
    payload = b"x" * 50  # 52 bytes once msgpack-encoded
    pair.client.send_message(payload)
    assert pair.client.unacked_bytes == 52
    assert not pair.client.can_send(52)
    with pytest.raises(SendBufferFull):
        pair.client.send_message(payload)
    assert pair.client.can_send(48)


def test_one_message_larger_than_the_byte_window_goes_alone() -> None:
    pair = SessionPair(SessionConfig(window_bytes=100), SessionConfig(window_bytes=100)).open()
    server = pair.server
    assert server is not None
    pair.client.send_message(b"x" * 500)
    with pytest.raises(SendBufferFull):
        pair.client.send_message(b"")
    pair.pump()
    assert [e.obj for e in of_type(pair.server_events, MessageReceived)] == [b"x" * 500]
    assert pair.failures() == []


def test_receiver_rejects_a_peer_exceeding_its_message_window() -> None:
    pair = SessionPair(server_config=SessionConfig(window=2)).open()
    server = pair.server
    assert server is not None
    server.receive_data(msg_frame(1) + msg_frame(2), 1.0)
    assert server.state is OPEN and server.data_to_send() == b""
    server.receive_data(msg_frame(3), 1.0)
    assert server.state is CLOSED
    assert server.close_expected()
    assert close_code(server.data_to_send()) == CloseCode.PROTOCOL_ERROR
    (failed,) = of_type(server.events_received(), LinkFailed)
    assert failed.session_ended
    assert isinstance(failed.error, RemoteProtocolError) and "window" in str(failed.error)
    assert server.failure is failed.error
    assert server.received == 2  # the offending message was not taken


def test_window_counts_undelivered_not_unacknowledged() -> None:
    pair = SessionPair(server_config=SessionConfig(window=2)).open()
    server = pair.server
    assert server is not None
    server.receive_data(msg_frame(1) + msg_frame(2), 1.0)
    server.message_delivered(1)
    server.receive_data(msg_frame(3), 1.0)  # 2 undelivered again: within the window
    assert server.state is OPEN
    assert server.received == 3


def test_receiver_rejects_a_peer_exceeding_its_byte_window() -> None:
    pair = SessionPair(server_config=SessionConfig(window_bytes=100)).open()
    server = pair.server
    assert server is not None
    big = b"\xc4\x3c" + b"x" * 60  # msgpack bin8 of 60 bytes: 62 payload bytes
    server.receive_data(msg_frame(1, big), 1.0)
    assert server.state is OPEN
    server.receive_data(msg_frame(2, big), 1.0)
    assert server.state is CLOSED
    assert close_code(server.data_to_send()) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("frames", "what"),
    [
        (msg_frame(2), "gap"),
        (msg_frame(1) + msg_frame(3), "gap"),
        (encode_frame(FrameType.ACK, encode_u64(1)), "never sent"),
        (encode_frame(FrameType.ACK, b"\x01"), "8-byte"),
        (msg_frame(1, b"\xc1"), "msgpack"),  # the payload does not decode
        (encode_frame(FrameType.MSG, b"\x00" * 5), "truncated"),
        (encode_frame(FrameType.HELLO, b"\x80"), "HELLO"),
        (encode_frame(FrameType.WELCOME, b"\x80"), "WELCOME"),
        (b"\x00\x00\x00\x01\x42", "unknown frame type"),
        (b"\x00\x00\x00\x00\x03", "length 0"),
    ],
)
def test_protocol_violations_close_the_session(frames: bytes, what: str) -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    server.events_received()
    server.receive_data(frames, 1.0)
    (failed,) = of_type(server.events_received(), LinkFailed)
    assert isinstance(failed.error, RemoteProtocolError)
    assert what in str(failed.error)
    assert server.state is CLOSED and server.close_expected()
    out = server.data_to_send()
    assert close_code(out) == CloseCode.PROTOCOL_ERROR
    # and the client, fed that CLOSE, ends too
    pair.to_client += out
    pair.pump()
    assert pair.client.state is CLOSED
    assert isinstance(pair.client.failure, ConnectionClosedError)
    assert pair.client.failure.code == CloseCode.PROTOCOL_ERROR


def test_oversize_frame_closes_with_frame_too_large() -> None:
    pair = SessionPair(server_config=SessionConfig(max_frame_size=1000)).open()
    server = pair.server
    assert server is not None
    server.receive_data(b"\xff\xff\xff\xff\x03", 1.0)
    assert server.state is CLOSED
    assert close_code(server.data_to_send()) == CloseCode.FRAME_TOO_LARGE


def test_an_oversize_frame_that_arrives_whole_in_one_read_is_refused_too() -> None:
    # A read holding exactly one frame skips the receive buffer (the request-response
    # fast path); the frame-size limit must hold on that path as well.
    pair = SessionPair(server_config=SessionConfig(max_frame_size=1000)).open()
    server = pair.server
    assert server is not None
    server.receive_data(encode_message(FrameType.MSG, 1, 0, 0, "", b"x" * 1000), 1.0)
    assert server.state is CLOSED
    assert close_code(server.data_to_send()) == CloseCode.FRAME_TOO_LARGE
    assert not of_type(server.events_received(), MessageReceived)


def test_nothing_is_processed_after_a_violation() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    server.events_received()
    server.receive_data(msg_frame(5) + msg_frame(1), 1.0)
    server.receive_data(msg_frame(1), 1.0)
    assert of_type(server.events_received(), MessageReceived) == []
    assert server.received == 0


# ---------------------------------------------------------------------- realtime


def test_realtime_while_open_is_delivered_and_not_acknowledged() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    assert pair.client.send_realtime({"pcm": b"\x01\x02"}, "audio", flags=MessageFlags.NONE)
    pair.pump()
    expected = RealtimeReceived(0, "audio", {"pcm": b"\x01\x02"})
    assert of_type(pair.server_events, RealtimeReceived) == [expected]
    assert of_type(pair.server_events, MessageReceived) == []
    assert pair.client.unacked == 0
    assert server.received == 0
    assert server.data_to_send() == b""  # no ACK for realtime
    assert (pair.client.stats.realtime_sent, server.stats.realtime_received) == (1, 1)


def test_realtime_does_not_consume_sequence_numbers() -> None:
    pair = SessionPair().open()
    pair.client.send_realtime("rt")
    assert pair.client.send_message("reliable") == 1


def test_realtime_while_detached_is_dropped_and_never_replayed() -> None:
    pair = SessionPair().open()
    pair.cut()
    assert pair.client.state is DETACHED
    assert pair.client.send_realtime("stale") is False
    assert pair.client.stats.realtime_dropped == 1
    pair.connect()
    pair.pump()
    assert pair.client.state is OPEN
    assert of_type(pair.server_events, RealtimeReceived) == []


def test_realtime_queued_on_a_link_that_dies_is_not_replayed() -> None:
    pair = SessionPair().open()
    assert pair.client.send_realtime("lost with the link")
    pair.client.send_message("reliable")
    pair.cut()  # nothing was written yet
    pair.connect()
    pair.pump()
    assert of_type(pair.server_events, RealtimeReceived) == []
    assert [e.obj for e in of_type(pair.server_events, MessageReceived)] == ["reliable"]


def test_realtime_before_any_link_returns_false() -> None:
    client = Session(CLIENT, codecs())
    assert client.send_realtime("x") is False
    client.connection_made(0.0)
    assert client.send_realtime("x") is False  # still CONNECTING


def test_undecodable_realtime_payload_is_counted_not_fatal() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    server.receive_data(encode_message(FrameType.RT, 0, 0, 0, "audio", b"\xc1"), 1.0)
    assert server.state is OPEN
    assert server.stats.realtime_malformed == 1
    assert of_type(server.events_received(), RealtimeReceived) == []


# ---------------------------------------------------------------------- close


def test_orderly_close_ends_both_sessions() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    pair.client.close(CloseCode.NORMAL, "bye")
    assert pair.client.state is CLOSED and pair.client.close_expected()
    pair.pump()
    assert server.state is CLOSED and server.close_expected()
    assert of_type(pair.server_events, PeerClosed) == [PeerClosed(CloseCode.NORMAL, "bye")]
    assert isinstance(server.failure, ConnectionClosedOK)
    assert not pair.connected  # the pair dropped the link as both asked
    with pytest.raises(InvalidState):
        pair.client.send_message("after close")
    with pytest.raises(InvalidState):
        server.send_message("after close")
    with pytest.raises(InvalidState):
        pair.client.connection_made(9.0)


def test_server_going_away_closes_the_client() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    server.close(CloseCode.GOING_AWAY, "shutdown")
    server.close(CloseCode.GOING_AWAY, "shutdown")  # idempotent: no second CLOSE
    out = server.data_to_send()
    assert frames_in(out) == [FrameType.CLOSE]
    pair.client.receive_data(out, 1.0)
    assert pair.client.state is CLOSED
    assert pair.client.events_received() == [PeerClosed(CloseCode.GOING_AWAY, "shutdown")]
    assert isinstance(pair.client.failure, ConnectionClosedOK)
    assert pair.client.failure.code == CloseCode.GOING_AWAY


def test_close_flushes_the_pending_ack_first() -> None:
    # The application took the message, then closed: the sender must learn that the
    # message arrived rather than see its send() fail with ConnectionClosed.
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    pair.client.send_message("last words")
    pair.pump()
    server.message_delivered(1)
    server.close(CloseCode.NORMAL, "done")
    assert frames_in(server.data_to_send()) == [FrameType.ACK, FrameType.CLOSE]


def test_close_while_detached_sends_nothing() -> None:
    pair = SessionPair().open()
    pair.cut()
    pair.client.close()
    assert pair.client.state is CLOSED
    assert pair.client.data_to_send() == b""


def test_client_takes_a_close_in_the_middle_of_a_stream() -> None:
    pair = SessionPair().open()
    client = pair.client
    client.receive_data(msg_frame(1, b"\x01") + encode_close(1000, "bye") + msg_frame(2, b"\x02"), 1.0)
    events = client.events_received()
    assert [type(e) for e in events] == [MessageReceived, PeerClosed]
    assert client.state is CLOSED


def test_try_again_later_leaves_the_session_resumable() -> None:
    pair = SessionPair().open()
    pair.cut()
    client = pair.client
    client.connection_made(1.0)
    client.data_to_send()
    client.receive_data(encode_close(CloseCode.TRY_AGAIN_LATER, "busy"), 1.0)
    assert client.state is DETACHED and client.close_expected()
    (failed,) = of_type(client.events_received(), LinkFailed)
    assert not failed.session_ended
    client.connection_lost(1.0)
    pair.connected = False
    pair.connect()
    pair.pump()
    assert client.state is OPEN
    assert of_type(pair.client_events, LinkOpened)[-1].resumed


# ---------------------------------------------------------------------- API misuse


def test_api_misuse_raises_invalid_state() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    with pytest.raises(InvalidState):
        server.connection_made(0.0)  # servers accept, they do not connect
    with pytest.raises(InvalidState):
        pair.client.connection_made(0.0)  # a link is already open
    # a second HELLO for the same server session object
    other = Session(CLIENT, codecs())
    other.connection_made(0.0)
    hs = ServerHandshake(SessionConfig(), ("msgpack", "json"))
    assert hs.receive_data(other.data_to_send()) is HandshakeOutcome.HELLO
    assert hs.hello is not None
    with pytest.raises(InvalidState):
        server.accept(hs.hello, 0.0)  # already a session
    with pytest.raises(InvalidState):
        pair.client.accept(hs.hello, 0.0)  # clients do not accept
    with pytest.raises(InvalidState):
        Session(SERVER, codecs()).resume(hs.hello, 0.0)  # nothing to resume
    assert isinstance(InvalidState("x"), AssertionError)


# ---------------------------------------------------------------------- lazy acks


def received_requests(n: int) -> SessionPair:
    pair = SessionPair().open()
    for i in range(n):
        pair.client.send_message(i, "rpc", flags=MessageFlags.REQUEST, corr=i + 1)
    pair.pump()
    return pair


def test_lazy_delivery_waits_for_another_frame() -> None:
    pair = received_requests(2)
    server = pair.server
    assert server is not None
    server.message_delivered(1, lazy=True)
    server.message_delivered(2, lazy=True)
    assert server.ack_pending
    assert server.data_to_send() == b""  # no write of its own for a lazy ACK
    server.send_message("reply", "rpc", flags=MessageFlags.REPLY, corr=1)
    assert frames_in(server.data_to_send()) == [FrameType.MSG, FrameType.ACK]
    assert not server.ack_pending


def test_flush_ack_sends_a_lazy_ack_alone() -> None:
    pair = received_requests(1)
    server = pair.server
    assert server is not None
    server.message_delivered(1, lazy=True)
    assert server.data_to_send() == b""
    server.flush_ack()
    out = server.data_to_send()
    assert split_frames(out) == [Frame(FrameType.ACK, encode_u64(1))]
    server.flush_ack()
    assert server.data_to_send() == b""  # nothing new to acknowledge


def test_an_urgent_delivery_after_lazy_ones_acks_them_all() -> None:
    pair = received_requests(3)
    server = pair.server
    assert server is not None
    server.message_delivered(1, lazy=True)
    server.message_delivered(2, lazy=True)
    server.message_delivered(3)
    assert split_frames(server.data_to_send()) == [Frame(FrameType.ACK, encode_u64(3))]


def test_many_lazy_deliveries_are_acknowledged_without_a_flush() -> None:
    from korinet.session.session import LAZY_ACK_MAX

    pair = received_requests(LAZY_ACK_MAX)
    server = pair.server
    assert server is not None
    for seq in range(1, LAZY_ACK_MAX):
        server.message_delivered(seq, lazy=True)
    assert server.data_to_send() == b""
    server.message_delivered(LAZY_ACK_MAX, lazy=True)
    assert split_frames(server.data_to_send()) == [Frame(FrameType.ACK, encode_u64(LAZY_ACK_MAX))]


def test_lazy_ack_is_sent_at_once_on_a_new_link() -> None:
    pair = received_requests(1)
    server = pair.server
    assert server is not None
    server.message_delivered(1, lazy=True)
    pair.cut()
    pair.connect()
    pair.pump()
    assert pair.client.unacked == 0
    assert of_type(pair.client_events, MessagesAcked)[-1] == MessagesAcked(1)
