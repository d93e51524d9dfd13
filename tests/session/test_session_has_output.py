"""Session.has_output: the drivers skip their flush after input when it is False
(after a lone ACK, or a message that waits in the inbox), so it must never be
False while data_to_send() has bytes or close_expected() is True."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from session_helpers import SessionPair

from korinet.exceptions import KoriNetError
from korinet.session import Session, SessionConfig


def check(session: Session | None) -> None:
    if session is not None and not session.has_output:
        assert not session.close_expected()
        assert session.data_to_send() == b""


class CheckedPair(SessionPair):
    """A SessionPair that checks both sessions before each collect()."""

    def collect(self) -> None:
        check(self.client)
        check(self.server)
        super().collect()


OPS = st.sampled_from(
    [
        "client_send",
        "server_send",
        "client_request",
        "pump",
        "pump_frames",
        "deliver_one",
        "deliver_lazy",
        "flush_ack",
        "cut",
        "reconnect",
        "tick",
        "client_close",
        "garbage",
    ]
)


@given(st.lists(OPS, max_size=40))
@settings(max_examples=150, deadline=None)
def test_has_output_is_never_false_when_there_is_output(ops: list[str]) -> None:
    config = SessionConfig(heartbeat_interval=1.0)
    pair = CheckedPair(client_config=config, server_config=config).open()
    for op in ops:
        server = pair.server
        try:
            if op == "client_send":
                pair.client.send_message(b"x")
            elif op == "server_send" and server is not None:
                server.send_message(b"y")
            elif op == "client_request":
                pair.client.send_message(b"r", "t", flags=1, corr=7)
            elif op == "pump":
                pair.pump()
            elif op == "pump_frames":
                pair.pump(frames=True)
            elif op in ("deliver_one", "deliver_lazy") and server is not None and pair.server_app.pending:
                seq, epoch = pair.server_app.pending.pop(0)
                server.message_delivered(seq, epoch, lazy=op == "deliver_lazy")
            elif op == "flush_ack" and server is not None:
                server.flush_ack()
            elif op == "cut" and pair.connected:
                pair.cut()
            elif op == "reconnect" and not pair.connected:
                pair.connect()
            elif op == "tick":
                pair.now += 0.7
                pair.client.tick(pair.now)
                if server is not None:
                    server.tick(pair.now)
            elif op == "client_close":
                pair.client.close()
            elif op == "garbage" and server is not None and pair.connected and pair.handshake is None:
                server.receive_data(b"\x00\x00\x00\x01\xc8", pair.now)  # an unknown frame type
        except KoriNetError:
            pass  # (a closed session refuses sends: fine, the invariant is what is checked)
        check(pair.client)
        check(pair.server)


def test_has_output_in_the_stop_and_wait_cycle() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    assert not pair.client.has_output and not server.has_output  # idle
    pair.client.send_message(b"m")
    assert pair.client.has_output  # the message to write
    pair.collect()
    assert not pair.client.has_output
    pair.pump()
    assert not server.has_output  # received, not yet taken: no ACK owed yet
    seq, epoch = pair.server_app.pending.pop()
    server.message_delivered(seq, epoch)
    assert server.has_output  # the ACK
    pair.pump()
    assert not server.has_output and not pair.client.has_output  # a lone ACK leaves nothing to do
    server.send_message(b"r")
    pair.pump()
    seq, epoch = pair.client_app.pending.pop()
    pair.client.message_delivered(seq, epoch, lazy=True)
    assert pair.client.has_output  # a lazy ACK is owed too: the driver arms its timer
    pair.client.close()
    pair.collect()
    assert pair.client.has_output  # closed: the driver must drop the link


def test_has_output_when_the_link_died_of_silence() -> None:
    config = SessionConfig(heartbeat_interval=1.0)
    pair = SessionPair(client_config=config, server_config=config).open()
    server = pair.server
    assert server is not None
    for _ in range(20):  # no byte comes back: the heartbeat gives up on the link
        pair.now += 1.0
        server.tick(pair.now)
        server.data_to_send()  # (the PINGs go nowhere)
    assert server.close_expected()
    assert server.has_output  # the driver must drop the link, even with nothing to write
