"""SessionStore / StoredSession: what goes into the SQLite file and when."""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from durable_pair import DurablePair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from korinet.runtime.store import CLIENT_KEY, SCHEMA_VERSION, SessionStore, StoreError
from korinet.session import CLIENT, SERVER, Session


@dataclass
class FakePeer:
    """What a StoredSession reads from its Peer."""

    session: Session
    next_corr: int = 1
    identity: Any = None


@dataclass
class Fingerprinted:
    fingerprint: str


def rows(path: Path, table: str) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = SessionStore(tmp_path / "sessions.db")
    yield s
    s.close()


def test_a_commit_writes_the_session_and_a_reload_gives_it_back(store: SessionStore, tmp_path: Path) -> None:
    pair = DurablePair().open()
    assert pair.server is not None
    for i in range(4):
        pair.client.session.send_message({"n": i})
        pair.server.session.send_message(i)
    pair.pump()
    pair.client.deliver(3)
    peer = FakePeer(pair.client.session, next_corr=42)
    stored = store.attach(peer, CLIENT_KEY)  # type: ignore[arg-type]
    stored.touch()
    store.commit()
    record = store.load(CLIENT_KEY)
    assert record is not None
    assert record.snapshot == pair.client.session.snapshot()
    assert record.corr == 42 and record.identity is None
    assert store.records(CLIENT) == [record]
    assert store.records(SERVER) == []
    assert rows(tmp_path / "sessions.db", "korinet_messages") == 4  # committed: visible to others


def test_only_changes_are_written_and_acked_messages_are_deleted(store: SessionStore, tmp_path: Path) -> None:
    pair = DurablePair().open()
    assert pair.server is not None
    stored = store.attach(FakePeer(pair.client.session), CLIENT_KEY)  # type: ignore[arg-type]
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    pair.client.session.send_message("one")
    stored.touch()
    store.commit()
    assert sum("INSERT OR REPLACE INTO korinet_messages" in s for s in statements) == 1
    statements.clear()
    stored.touch()
    store.commit()  # nothing changed: nothing written
    assert not any(s.startswith(("INSERT", "DELETE", "UPDATE")) for s in statements)
    pair.client.session.send_message("two")
    pair.pump()
    pair.server.deliver()
    pair.pump()  # both acknowledged
    stored.touch()
    store.commit()
    assert rows(tmp_path / "sessions.db", "korinet_messages") == 0
    record = store.load(CLIENT_KEY)
    assert record is not None and record.snapshot.acked == 2 and record.snapshot.next_seq == 3


def test_a_replaced_session_is_rewritten(store: SessionStore) -> None:
    pair = DurablePair().open()
    assert pair.server is not None
    stored = store.attach(FakePeer(pair.client.session), CLIENT_KEY)  # type: ignore[arg-type]
    old_id = pair.client.session.session_id
    pair.client.session.send_message("a")
    pair.client.session.send_message("b")
    pair.pump()
    pair.server.deliver()
    pair.pump()  # 1 and 2 acknowledged
    pair.cut()
    for i in range(3):
        pair.client.session.send_message(i)  # 3, 4, 5: queued while detached, never sent
    stored.touch()
    store.commit()
    pair.server = None  # the server forgot the session
    pair.open()
    stored.touch()
    store.commit()
    record = store.load(CLIENT_KEY)
    assert record is not None
    assert record.snapshot.session_id != old_id and record.snapshot.epoch == 1
    # renumbered 1, 2, 3 in the new session, and nothing left of the old one
    assert record.snapshot == pair.client.session.snapshot()
    assert [seq for seq, _, _ in record.snapshot.messages] == [1, 2, 3]


def test_the_first_message_of_a_replacing_session_is_stored(store: SessionStore) -> None:
    """Found by the property test below: an expiry that voids every message, then a
    new message numbered 1 again, which the store must not take for one it has."""
    pair = DurablePair().open()
    stored = store.attach(FakePeer(pair.client.session), CLIENT_KEY)  # type: ignore[arg-type]
    pair.client.session.send_message("sent, then lost with the link")
    stored.touch()
    store.commit()
    pair.cut()
    pair.server = None
    pair.open()  # expired: the message is voided, the new session starts at seq 1
    stored.touch()
    store.commit()
    pair.client.session.send_message("first of the new session")
    stored.touch()
    store.commit()
    record = store.load(CLIENT_KEY)
    assert record is not None and record.snapshot == pair.client.session.snapshot()
    assert len(record.snapshot.messages) == 1


def test_forget_deletes_and_server_sessions_are_listed(store: SessionStore) -> None:
    pair = DurablePair().open()
    assert pair.server is not None
    pair.server.session.send_message("x")
    peer = FakePeer(pair.server.session, identity=Fingerprinted("SHA256:abc"))
    stored = store.attach(peer, None)  # type: ignore[arg-type]  # keyed by the session id
    stored.touch()
    store.commit()
    (record,) = store.records(SERVER)
    assert record.key == pair.server.session.session_id
    assert record.identity == "SHA256:abc"
    stored.forget()
    assert store.records(SERVER) == []
    stored.touch()
    store.commit()  # a forgotten session is never written again
    assert store.records(SERVER) == []


def test_application_writes_commit_with_the_delivery_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    store = SessionStore(path)
    pair = DurablePair().open()
    assert pair.server is not None
    stored = store.attach(FakePeer(pair.server.session), None)  # type: ignore[arg-type]
    store.db.execute("CREATE TABLE seen (n INTEGER)")
    store.commit()
    pair.client.session.send_message(1)
    pair.client.session.send_message(2)
    pair.pump()
    pair.server.deliver(1)
    stored.touch()
    store.db.execute("INSERT INTO seen VALUES (1)")
    store.commit()  # delivery 1 and its row, together
    pair.server.deliver(1)
    stored.touch()
    store.db.execute("INSERT INTO seen VALUES (2)")
    # The process dies here, before the next commit: neither delivery 2 nor row 2.
    store.db.close()
    store._unlock()
    store.closed = True
    again = SessionStore(path)
    try:
        (record,) = again.records(SERVER)
        assert record.snapshot.delivered == 1
        assert [n for (n,) in again.db.execute("SELECT n FROM seen")] == [1]
    finally:
        again.close()


def test_one_process_per_store(tmp_path: Path) -> None:
    first = SessionStore(tmp_path / "s.db")
    with pytest.raises(StoreError, match="in use by another process"):
        SessionStore(tmp_path / "s.db")
    first.close()
    SessionStore(tmp_path / "s.db").close()  # released on close (and by the kernel on death)


def test_a_store_of_another_schema_is_refused(tmp_path: Path) -> None:
    SessionStore(tmp_path / "s.db").close()
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute("UPDATE korinet_store SET value = ? WHERE name = 'schema'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version"):
        SessionStore(tmp_path / "s.db")


def test_synchronous_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SessionStore(tmp_path / "a.db", synchronous="sometimes")
    full = SessionStore(tmp_path / "b.db", synchronous="full")
    try:
        assert full.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert full.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        full.close()
    normal = SessionStore(tmp_path / "c.db")
    try:
        assert normal.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        normal.close()


def test_a_closed_store_refuses_to_commit(store: SessionStore) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.commit()
    store.close()  # twice is fine


def test_an_unwritable_place_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open the session store"):
        SessionStore(tmp_path / "file" / "s.db")


def test_the_files_are_private(tmp_path: Path) -> None:
    """They hold resume tokens: readable by their owner only."""
    old = os.umask(0o022)
    try:
        store = SessionStore(tmp_path / "s.db")
        pair = DurablePair().open()
        stored = store.attach(FakePeer(pair.client.session), CLIENT_KEY)  # type: ignore[arg-type]
        stored.touch()
        store.commit()
        for name in ("s.db", "s.db-wal", "s.db.lock"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        store.close()
    finally:
        os.umask(old)


OPS = st.lists(
    st.sampled_from(["client_sends", "server_sends", "pump", "deliver", "cut", "reopen", "forget_server"]),
    max_size=40,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_what_is_committed_is_always_the_session(tmp_path: Path, ops: list[str]) -> None:
    """Whatever happened (sends, acks, deliveries, cuts, an expiry that renumbers),
    reading the store back after a commit gives exactly the live session's state."""
    path = tmp_path / f"prop-{len(list(tmp_path.iterdir()))}.db"
    store = SessionStore(path)
    try:
        pair = DurablePair().open()
        assert pair.server is not None
        client_peer = FakePeer(pair.client.session)
        server_peer = FakePeer(pair.server.session)
        stored = [store.attach(client_peer, CLIENT_KEY), store.attach(server_peer, None)]  # type: ignore[arg-type]
        for i, op in enumerate(ops):
            if op == "client_sends":
                pair.client.session.send_message({"i": i})
            elif op == "server_sends" and pair.server is not None:
                pair.server.session.send_message([i])
            elif op == "pump":
                pair.pump()
            elif op == "deliver":
                pair.client.deliver()
                if pair.server is not None:
                    pair.server.deliver()
            elif op == "cut" and pair.connected:
                pair.cut()
            elif op == "reopen" and not pair.connected:
                pair.open()
            elif op == "forget_server" and not pair.connected:
                pair.server = None  # expired: the client's next link starts a new session
            for s in stored:
                s.touch()
            store.commit()
            record = store.load(CLIENT_KEY)
            assert record is not None
            assert record.snapshot == pair.client.session.snapshot()
            assert record.snapshot.next_seq == pair.client.session.last_seq + 1
            # (after an expiry the store still follows the first server session only)
            if pair.server is not None and pair.server.session is server_peer.session:
                (server_record,) = [
                    r for r in store.records(SERVER) if r.key == pair.server.session.session_id
                ]
                assert server_record.snapshot == pair.server.session.snapshot()
    finally:
        store.close()
