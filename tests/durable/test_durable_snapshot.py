"""Session.snapshot() / Session.restore(): the pure half of the durable store.

A side is "crashed" by throwing its Session away and building a new one from the
snapshot taken at the crash; the pair then reconnects and both applications must
end with every message exactly once, in order (docs/PROTOCOL.md §6.4).
"""

from __future__ import annotations

import pytest
from durable_pair import DurablePair, codecs
from hypothesis import given, settings
from hypothesis import strategies as st

from korinet.exceptions import InvalidState
from korinet.session import CLIENT, DETACHED, SERVER, LinkFailed, PeerClosed, Session, SessionExpiredEvent
from korinet.session.snapshot import SessionSnapshot


def failures(pair: DurablePair) -> list[object]:
    events = pair.client.events + (pair.server.events if pair.server else [])
    return [e for e in events if isinstance(e, (LinkFailed, PeerClosed))]


def test_snapshot_restore_round_trip_is_exact() -> None:
    pair = DurablePair().open()
    assert pair.server is not None
    for i in range(5):
        pair.client.session.send_message({"c": i})
        pair.server.session.send_message(["s", i], "typed.name")
    pair.pump()
    pair.server.deliver(2)
    pair.client.deliver(3)
    pair.pump()
    pair.client.session.send_message("not yet acked")
    for side, kind in ((pair.client, CLIENT), (pair.server, SERVER)):
        snap = side.session.snapshot()
        fresh = Session(kind, codecs())
        fresh.restore(snap)
        assert fresh.snapshot() == snap
        assert fresh.state is DETACHED
        assert fresh.last_seq == side.session.last_seq
        assert fresh.unacked == side.session.unacked
        assert fresh.unacked_bytes == side.session.unacked_bytes
        assert fresh.received == fresh.delivered == side.session.delivered
    assert pair.client.session.snapshot().delivered == 3
    assert pair.server.session.snapshot().delivered == 2
    assert pair.client.session.snapshot(messages=False).messages == ()


def test_next_seq_follows_from_acked_and_messages() -> None:
    base = dict(side=CLIENT, session_id="s", token="t", version=3, codec="msgpack", epoch=0, delivered=0)
    assert SessionSnapshot(**base, acked=0).next_seq == 1  # type: ignore[arg-type]
    assert SessionSnapshot(**base, acked=7).next_seq == 8  # type: ignore[arg-type]
    messages = ((8, b"frame8", 1), (9, b"frame9", 1))
    assert SessionSnapshot(**base, acked=7, messages=messages).next_seq == 10  # type: ignore[arg-type]


def test_restored_server_gets_the_undelivered_again_and_nothing_twice() -> None:
    pair = DurablePair().open()
    server = pair.server
    assert server is not None
    sent = [{"n": i} for i in range(1, 11)]
    for obj in sent:
        pair.client.session.send_message(obj)
    pair.pump()
    server.deliver(6)  # the application has 1..6; 7..10 wait in its inbox
    snap = server.session.snapshot()  # as committed before the ACK for 6 left
    pair.pump()
    assert pair.client.session.acked == 6
    taken_before = list(server.taken)

    restored = pair.crash_server(snap)  # 7..10 die with the process
    pair.open()
    assert pair.server is restored  # the same session, resumed
    restored.deliver()
    pair.pump()
    assert taken_before + restored.taken == sent
    assert pair.client.session.acked == 10 and pair.client.session.unacked == 0
    assert failures(pair) == []


def test_restored_client_gets_replays_and_resends_only_the_unacked() -> None:
    pair = DurablePair().open()
    server = pair.server
    assert server is not None
    for i in range(1, 6):
        server.session.send_message(i)
    pair.pump()
    pair.client.deliver(2)  # the client application has 1, 2
    for i in range(1, 4):
        pair.client.session.send_message(f"c{i}")
    pair.pump()
    server.deliver()
    pair.pump()  # c1..c3 acknowledged
    pair.client.session.send_message("c4")  # accepted, never written: the link is idle
    snap = pair.client.session.snapshot()
    assert [seq for seq, _, _ in snap.messages] == [4]

    client = pair.crash_client(snap)
    pair.open()
    client.deliver()
    server.deliver()
    pair.pump()
    assert client.taken == [3, 4, 5]  # 1, 2 were taken before the crash
    assert server.taken == ["c1", "c2", "c3", "c4"]
    assert server.session.acked == 5 and client.session.acked == 4
    assert failures(pair) == []


def test_an_ack_for_a_message_sent_just_before_the_crash_is_accepted() -> None:
    """A restored session counts every buffered message as sent: the peer may well
    have it, and its ACK must not look like a protocol violation."""
    pair = DurablePair().open()
    assert pair.server is not None
    for i in range(3):
        pair.client.session.send_message(i)
    snap = pair.client.session.snapshot()
    pair.pump()
    pair.server.deliver()
    pair.server.session.flush_ack()
    pair.server.session.data_to_send()  # the ACK is lost with the crash
    client = pair.crash_client(snap)
    pair.open()
    assert failures(pair) == []
    assert client.session.acked == 3 and client.session.unacked == 0


def test_messages_taken_out_of_order_before_the_crash_are_not_redelivered() -> None:
    pair = DurablePair().open()
    server = pair.server
    assert server is not None
    for i in range(1, 6):
        pair.client.session.send_message(i)
    pair.pump()
    # A handler took 2 and 4 at once; the inbox still held 1, 3, 5; then 1 was taken.
    by_seq = {ev.seq: ev for ev in server.pending}
    for seq in (2, 4, 1):
        server.taken.append(by_seq[seq].obj)
        server.session.message_delivered(seq, 0)
    server.pending = []
    snap = server.session.snapshot()
    assert snap.delivered == 2 and snap.delivered_early == (4,)

    restored = pair.crash_server(snap)
    pair.open()  # the client replays 3, 4, 5
    assert [ev.obj for ev in restored.pending] == [3, 5]
    restored.deliver()
    pair.pump()
    assert sorted(server.taken + restored.taken) == [1, 2, 3, 4, 5]
    assert restored.session.delivered == 5
    assert pair.client.session.acked == 5
    assert failures(pair) == []


def test_a_restored_client_whose_server_forgot_it_voids_every_buffered_message() -> None:
    """After a crash the client cannot tell which buffered messages left: on expiry
    all of them may have been seen, so none is carried into the new session."""
    pair = DurablePair().open()
    pair.client.session.send_message("maybe seen")
    pair.client.session.send_message("maybe seen too")
    snap = pair.client.session.snapshot()
    pair.server = None  # the server lost it (restarted without a store)
    client = pair.crash_client(snap)
    pair.open()
    expired = [e for e in client.events if isinstance(e, SessionExpiredEvent)]
    assert len(expired) == 1
    assert expired[0].unconfirmed_through == 2 and dict(expired[0].renumbered) == {}
    assert client.session.unacked == 0 and client.session.epoch == 1
    assert client.session.session_id != snap.session_id


def test_restore_refuses_what_it_cannot_continue() -> None:
    pair = DurablePair().open()
    snap = pair.client.session.snapshot()
    with pytest.raises(InvalidState):
        pair.client.session.restore(snap)  # not fresh
    with pytest.raises(InvalidState):
        Session(SERVER, codecs()).restore(snap)  # the other side's
    only_json = {"json": codecs()["json"]}
    with pytest.raises(KeyError):
        Session(CLIENT, only_json).restore(snap)  # its codec is gone
    with pytest.raises(InvalidState):
        Session(CLIENT, codecs()).snapshot()  # nothing to resume before a handshake


def test_unacked_after_is_the_tail() -> None:
    pair = DurablePair().open()
    for i in range(5):
        pair.client.session.send_message(i)
    assert [seq for seq, _, _ in pair.client.session.unacked_after(0)] == [1, 2, 3, 4, 5]
    assert [seq for seq, _, _ in pair.client.session.unacked_after(3)] == [4, 5]
    assert pair.client.session.unacked_after(5) == []


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30),
    delivered_at_crash=st.integers(0, 30),
    crash_server=st.booleans(),
)
def test_any_crash_point_delivers_exactly_once(n: int, delivered_at_crash: int, crash_server: bool) -> None:
    """Both sides send n messages; one side crashes after its application took some;
    after the restart both applications hold all n exactly once, in order."""
    pair = DurablePair().open()
    server = pair.server
    assert server is not None
    for i in range(n):
        pair.client.session.send_message(("c", i))
        server.session.send_message(("s", i))
    pair.pump()
    victim = server if crash_server else pair.client
    victim.deliver(min(delivered_at_crash, len(victim.pending)))
    snap = victim.session.snapshot()
    pair.pump()  # its ACK (at most what the snapshot holds) may leave
    taken_before = list(victim.taken)
    restored = pair.crash_server(snap) if crash_server else pair.crash_client(snap)
    other = pair.client if crash_server else server
    for _ in range(3):
        if not pair.connected:
            pair.connect()
        pair.pump()
        restored.deliver()
        other.deliver()
        pair.pump()
    expected_by_victim = [("s" if not crash_server else "c", i) for i in range(n)]
    expected_by_other = [("c" if not crash_server else "s", i) for i in range(n)]
    assert [tuple(x) for x in taken_before + restored.taken] == expected_by_victim
    assert [tuple(x) for x in other.taken] == expected_by_other
    assert failures(pair) == []
