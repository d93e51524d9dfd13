"""Resume across lost links: exactly-once, in-order delivery both ways, and expiry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from session_helpers import SessionPair, of_type, split_frames

from korinet.codecs import JsonCodec
from korinet.session import (
    DETACHED,
    OPEN,
    LinkOpened,
    MessageReceived,
    MessagesAcked,
    SessionConfig,
    SessionExpiredEvent,
)
from korinet.wire.frames import FrameType

N = 6  # messages each way in the exhaustive tests


def loaded_pair() -> tuple[SessionPair, list[object], list[object]]:
    """An open pair with N messages queued each way, nothing yet written."""
    pair = SessionPair().open()
    assert pair.server is not None
    sent_c: list[object] = [{"c": i, "pad": "x" * i} for i in range(N)]
    sent_s: list[object] = [["s", i, b"\x00" * i] for i in range(N)]
    for obj in sent_c:
        pair.client.send_message(obj, "from.client")
    for obj in sent_s:
        pair.server.send_message(obj, "from.server")
    return pair, sent_c, sent_s


def assert_exactly_once(pair: SessionPair, sent_c: list[object], sent_s: list[object]) -> None:
    server = pair.server
    assert server is not None
    assert pair.server_app.inbox == sent_c
    assert pair.client_app.inbox == sent_s
    assert pair.server_app.seqs == list(range(1, len(sent_c) + 1))
    assert pair.client_app.seqs == list(range(1, len(sent_s) + 1))
    assert pair.client.unacked == 0 and server.unacked == 0
    assert pair.client.acked == len(sent_c) and server.acked == len(sent_s)
    assert pair.failures() == []
    assert len(pair.servers) == 1  # one session all along
    assert pair.client.state is OPEN and server.state is OPEN
    for seqs in (
        [e.seq for e in of_type(pair.client_events, MessagesAcked)],
        [e.seq for e in of_type(pair.server_events, MessagesAcked)],
    ):
        assert seqs == sorted(set(seqs))  # acks only move forward


def run_with_cut(budget: int | None, *, chunk: int | None = None, frames: bool = False) -> int:
    """Exchange the loaded messages (applications delivering promptly, so acks flow
    too), cutting the first link once ``budget`` bytes/frames went through; then
    heal and check. Returns how much the first link carried."""
    pair, sent_c, sent_s = loaded_pair()
    moved = (lambda: pair.frames_moved) if frames else (lambda: pair.bytes_moved)
    start = moved()
    for _ in range(3):  # send, deliver and ack, ack the acks: quiet after that
        left = None if budget is None else budget - (moved() - start)
        if pair.pump(budget=left, chunk=chunk, frames=frames):
            break
        pair.deliver_all()
    carried = moved() - start
    if pair.connected and budget is not None:
        pair.cut()
    pair.settle()
    assert_exactly_once(pair, sent_c, sent_s)
    return carried


def test_resume_replays_what_the_peer_missed() -> None:
    pair, sent_c, sent_s = loaded_pair()
    server = pair.server
    assert server is not None
    pair.cut()  # nothing was written: everything must be replayed
    assert pair.client.state is DETACHED and server.state is DETACHED
    pair.connect()
    pair.pump()
    c_open = of_type(pair.client_events, LinkOpened)[-1]
    s_open = of_type(pair.server_events, LinkOpened)[-1]
    assert c_open.resumed and s_open.resumed
    assert c_open.session_id == s_open.session_id == server.session_id
    assert (c_open.replayed, s_open.replayed) == (N, N)
    assert pair.client.stats.resumes == 1 and server.stats.resumes == 1
    pair.settle()
    assert_exactly_once(pair, sent_c, sent_s)


def test_resume_replays_nothing_the_peer_already_received() -> None:
    pair, sent_c, sent_s = loaded_pair()
    pair.pump()  # all received, none delivered, so none acknowledged
    assert pair.client.unacked == N
    pair.cut()
    pair.connect()
    pair.pump()
    assert of_type(pair.client_events, LinkOpened)[-1].replayed == 0
    assert of_type(pair.server_events, LinkOpened)[-1].replayed == 0
    assert pair.client.unacked == N  # still waiting for the application
    pair.settle()
    assert_exactly_once(pair, sent_c, sent_s)


def test_delivery_while_detached_is_acknowledged_on_the_next_link() -> None:
    pair, sent_c, sent_s = loaded_pair()
    pair.pump()
    pair.cut()
    pair.deliver_all()  # the applications take their messages while the link is down
    assert pair.client.unacked == N
    pair.connect()
    pair.pump()
    assert pair.client.unacked == 0
    assert_exactly_once(pair, sent_c, sent_s)


def test_ack_lost_with_the_link_is_announced_again() -> None:
    pair, sent_c, sent_s = loaded_pair()
    pair.pump()
    pair.deliver_all()
    pair.collect()
    pair.to_client.clear()  # the server's ACK is lost...
    pair.to_server.clear()  # ...and so is the client's
    pair.cut()
    assert pair.client.unacked == N
    pair.connect()
    pair.pump()
    assert pair.client.unacked == 0
    assert_exactly_once(pair, sent_c, sent_s)


def test_cut_after_each_whole_frame() -> None:
    total = run_with_cut(None, frames=True)
    assert total >= 2 * N + 2  # N messages each way and at least an ack each way
    for k in range(total + 1):
        run_with_cut(k, frames=True)


@pytest.mark.parametrize("chunk", [None, 1, 3, 64])
def test_cut_at_every_byte_offset(chunk: int | None) -> None:
    total = run_with_cut(None, chunk=chunk)
    assert total > 200
    for offset in range(total + 1):
        run_with_cut(offset, chunk=chunk)


def test_cut_during_every_resume_handshake() -> None:
    pair, sent_c, sent_s = loaded_pair()
    pair.cut()
    for budget in range(0, 400, 7):  # each reconnection dies a little later
        pair.connect()
        pair.pump(budget=budget, chunk=5)
        if pair.connected:
            pair.cut()
    pair.settle()
    assert_exactly_once(pair, sent_c, sent_s)
    assert pair.client.stats.links > 50


def test_replayed_frames_arriving_twice_are_dropped_and_counted() -> None:
    pair, sent_c, sent_s = loaded_pair()
    pair.pump()
    first_link_to_client = b"".join(d for side, d in pair.wire_log if side == "s2c")
    msgs = [f for f in split_frames(first_link_to_client) if f.type is FrameType.MSG]
    assert len(msgs) == N
    pair.cut()
    pair.connect()
    pair.pump()
    # A stale copy of every message (say from a link the network kept alive) arrives again.
    pair.client.receive_data(b"".join(f.serialize() for f in msgs), pair.now)
    pair.collect()
    assert pair.client.stats.duplicates_dropped == N
    assert pair.client.stats.messages_received == N
    pair.settle()
    assert_exactly_once(pair, sent_c, sent_s)


@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_exactly_once_in_order_across_random_cuts_and_delivery_timing(data: st.DataObject) -> None:
    pair = SessionPair(SessionConfig(window=8), SessionConfig(window=5)).open()
    server = pair.server
    assert server is not None
    n_c = data.draw(st.integers(0, 25), label="client messages")
    n_s = data.draw(st.integers(0, 25), label="server messages")
    sent_c: list[object] = []
    sent_s: list[object] = []
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        action = data.draw(st.sampled_from(["send_c", "send_s", "deliver_c", "deliver_s", "link", "link"]))
        if action == "send_c" and len(sent_c) < n_c:
            for _ in range(data.draw(st.integers(1, 5))):
                if len(sent_c) < n_c and pair.client.can_send(100):
                    obj = {"c": len(sent_c), "blob": b"b" * data.draw(st.integers(0, 40))}
                    pair.client.send_message(obj, "t")
                    sent_c.append(obj)
        elif action == "send_s" and len(sent_s) < n_s:
            for _ in range(data.draw(st.integers(1, 5))):
                if len(sent_s) < n_s and server.can_send(100):
                    obj = ["s", len(sent_s)]
                    server.send_message(obj)
                    sent_s.append(obj)
        elif action in ("deliver_c", "deliver_s"):
            app, session = (
                (pair.client_app, pair.client) if action == "deliver_c" else (pair.server_app, server)
            )
            if app.pending:
                chosen = data.draw(st.lists(st.sampled_from(app.pending), unique=True))
                for seq, epoch in chosen:
                    session.message_delivered(seq, epoch)
                    app.pending.remove((seq, epoch))
                pair.collect()
        elif action == "link":
            if not pair.connected:
                pair.connect()
            budget = data.draw(st.none() | st.integers(0, 300), label="budget")
            chunk = data.draw(st.none() | st.integers(1, 40), label="chunk")
            pair.pump(budget=budget, chunk=chunk)
            if pair.connected and data.draw(st.booleans(), label="drop now"):
                pair.cut()
    # the network heals; keep sending what the window held back
    while len(sent_c) < n_c or len(sent_s) < n_s:
        pair.settle()
        while len(sent_c) < n_c and pair.client.can_send(100):
            sent_c.append({"c": len(sent_c)})
            pair.client.send_message(sent_c[-1], "t")
        while len(sent_s) < n_s and server.can_send(100):
            sent_s.append(["s", len(sent_s)])
            server.send_message(sent_s[-1])
    pair.settle()
    assert_exactly_once(pair, sent_c, sent_s)


@pytest.mark.parametrize("budget", range(0, 120, 3))
def test_cut_during_the_first_handshake_starts_afresh(budget: int) -> None:
    pair = SessionPair()
    pair.connect()
    pair.pump(budget=budget, chunk=4)
    if pair.connected:
        pair.cut()
    had_session = pair.client.session_id is not None
    pair.settle()
    assert pair.client.state is OPEN
    assert pair.client.session_id == pair.servers[-1].session_id
    # a client that never saw a WELCOME has nothing to resume and nothing expired
    assert of_type(pair.client_events, SessionExpiredEvent) == []
    assert of_type(pair.client_events, LinkOpened)[-1].resumed == had_session
    if had_session:  # the WELCOME got through: the same session goes on
        assert len(pair.servers) == 1
    pair.client.send_message("after")
    pair.servers[-1].send_message("after")
    pair.settle()
    assert pair.server_app.inbox == ["after"] and pair.client_app.inbox == ["after"]


# ---------------------------------------------------------------------- expiry


def expire_scenario() -> tuple[SessionPair, str]:
    """Client: 1 acknowledged, 2-3 sent but unacknowledged, 4-6 queued while detached.
    Then the server forgets the session and the client reconnects."""
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    old_id = pair.client.session_id
    assert old_id is not None
    for i in (1, 2, 3):
        pair.client.send_message(f"m{i}")
    pair.pump()
    server.message_delivered(1)
    pair.pump()
    assert pair.client.acked == 1
    pair.cut()
    for i in (4, 5, 6):
        pair.client.send_message(f"m{i}")
    pair.forget_server = True
    pair.connect()
    pair.pump()
    return pair, old_id


def test_expiry_reports_the_unconfirmed_messages() -> None:
    pair, old_id = expire_scenario()
    expired = of_type(pair.client_events, SessionExpiredEvent)
    assert expired == [
        SessionExpiredEvent(old_id, unconfirmed_through=3, unconfirmed=2, renumbered={4: 1, 5: 2, 6: 3})
    ]
    opened = of_type(pair.client_events, LinkOpened)[-1]
    assert not opened.resumed
    assert opened.session_id != old_id and opened.session_id == pair.client.session_id
    # the event comes before the new link opens
    assert pair.client_events.index(expired[0]) < pair.client_events.index(opened)
    assert pair.client.epoch == 1
    assert len(pair.servers) == 2


def test_expiry_carries_unsent_messages_renumbered_from_one() -> None:
    pair, _ = expire_scenario()
    new_server = pair.servers[-1]
    got = [(e.seq, e.obj) for e in of_type(pair.server_events, MessageReceived)][3:]
    assert got == [(1, "m4"), (2, "m5"), (3, "m6")]
    assert new_server.received == 3
    # delivered once, acknowledged in the new numbering
    pair.settle()
    assert pair.client.acked == 3 and pair.client.unacked == 0
    assert of_type(pair.client_events, MessagesAcked)[-1] == MessagesAcked(3)
    assert [e.obj for e in of_type(pair.server_events, MessageReceived)].count("m4") == 1
    assert pair.client.send_message("m7") == 4


def test_expiry_voids_unconfirmed_messages() -> None:
    pair, _ = expire_scenario()
    pair.settle()
    new_inbox = [e.obj for e in of_type(pair.server_events, MessageReceived)][3:]
    assert new_inbox == ["m4", "m5", "m6"]  # m2 and m3 are not sent again


def test_deliveries_from_the_old_epoch_are_ignored() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None
    server.send_message("old")
    pair.pump()
    assert pair.client_app.pending == [(1, 0)]
    pair.cut()
    pair.forget_server = True
    pair.connect()
    pair.pump()
    new_server = pair.servers[-1]
    new_server.send_message("new")
    pair.pump()
    assert pair.client_app.pending == [(1, 0), (1, 1)]
    pair.client.message_delivered(1, 0)  # the old "1": must not acknowledge the new "1"
    pair.pump()
    assert new_server.unacked == 1
    pair.client.message_delivered(1, 1)
    pair.pump()
    assert new_server.unacked == 0


def test_expiry_with_nothing_pending() -> None:
    pair = SessionPair().open()
    pair.cut()
    pair.forget_server = True
    pair.connect()
    pair.pump()
    (expired,) = of_type(pair.client_events, SessionExpiredEvent)
    assert (expired.unconfirmed_through, expired.unconfirmed) == (0, 0)
    assert pair.client.state is OPEN


def test_expiry_reencodes_carried_messages_when_the_codec_changes() -> None:
    pair = SessionPair().open()
    pair.cut()
    pair.client.send_message({"k": [1, "two"]})
    pair.forget_server = True
    pair.server_codecs = {"json": JsonCodec()}  # the restarted server only speaks json
    pair.connect()
    pair.pump()
    assert pair.client.codec is not None and pair.client.codec.name == "json"
    assert [e.obj for e in of_type(pair.server_events, MessageReceived)] == [{"k": [1, "two"]}]
    assert pair.failures() == []


def test_expiry_with_a_message_the_new_codec_cannot_carry() -> None:
    pair = SessionPair().open()
    pair.cut()
    pair.client.send_message(b"bytes: fine in msgpack, not in json")
    pair.client.send_message("text: fine in both")
    pair.forget_server = True
    pair.server_codecs = {"json": JsonCodec()}
    pair.connect()
    pair.pump()  # must not raise
    assert pair.client.state is OPEN
    (expired,) = of_type(pair.client_events, SessionExpiredEvent)
    assert expired.failed == (1,) and "JSON cannot encode" in expired.failure
    assert expired.renumbered == {2: 1}
    pair.settle()
    assert [e.obj for e in of_type(pair.server_events, MessageReceived)] == ["text: fine in both"]
