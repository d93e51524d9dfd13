"""A durable session store: one SQLite file, embedded (docs/ARCHITECTURE.md, "Durable
sessions"; docs/PROTOCOL.md §6.4).

With a store, a session survives the death of its process: ``Client(..., store=path)``
and ``Server(..., store=path)`` write each session's state here and read it back at
start, and the restarted process resumes the same session with its peer.

When it writes (the two rules that make ``kill -9`` lose nothing):

* a reliable message is committed before the call that accepts it returns
  (``send``, ``send_nowait``, ``post``, ``request``, ``reply``), unless the
  application groups them in :meth:`SessionStore.batch`;
* the session's state, ``delivered`` above all, is committed before any bytes leave
  for the link, so an ACK never announces a delivery the store does not hold.

Everything a peer changed since the last commit goes in one transaction: a flush of
a busy receiver commits once for all it delivered. Applications may keep their own
tables in :attr:`SessionStore.db`: what they write there in the loop turn in which
``recv()`` returned a message (before their next ``await``) commits atomically with
its delivery, which makes the application's effect exactly-once too.

WAL with ``synchronous=NORMAL`` (the default) survives the death of the process, not
of the machine: a power loss may take the last transactions. ``synchronous="FULL"``
syncs every commit to disk and survives power loss, at a cost per commit.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import InvalidState, KoriNetError
from ..session import CLIENT, Side
from ..session.snapshot import SessionSnapshot, StoredMessage

if TYPE_CHECKING:
    from .peer import Peer

__all__ = [
    "CLIENT_KEY",
    "SCHEMA_VERSION",
    "SessionStore",
    "StoreError",
    "StoredIdentity",
    "StoredRecord",
    "StoredSession",
]

logger = logging.getLogger(__name__)

#: The layout of the tables below; a file of another version is refused.
SCHEMA_VERSION: Final = 1
#: The key of a client's session (one client session per store file).
CLIENT_KEY: Final = "client"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS korinet_store (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS korinet_sessions (
    key TEXT PRIMARY KEY,
    side INTEGER NOT NULL,
    session_id TEXT NOT NULL,
    token TEXT NOT NULL,
    version INTEGER NOT NULL,
    codec TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    acked INTEGER NOT NULL,
    delivered INTEGER NOT NULL,
    early TEXT NOT NULL,
    corr INTEGER NOT NULL,
    identity TEXT
);
CREATE TABLE IF NOT EXISTS korinet_messages (
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    frame BLOB NOT NULL,
    PRIMARY KEY (key, seq)
) WITHOUT ROWID;
"""

_SYNCHRONOUS: Final = ("NORMAL", "FULL", "EXTRA")


class StoreError(KoriNetError):
    """The session store cannot be opened, read or written. A session whose store
    fails ends (its last committed state stays in the file, consistent)."""


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A session as read from the store."""

    key: str
    snapshot: SessionSnapshot
    #: the next request correlation id the peer may use (old replies may still come)
    corr: int
    #: the fingerprint of the identity that opened it (server side), or None
    identity: str | None


@dataclass(frozen=True, slots=True)
class StoredIdentity:
    """The identity of a restored server session until its client returns: only the
    fingerprint a resume must match. Roles come back with the client's certificate."""

    fingerprint: str
    roles: tuple[str, ...] = ()

    @classmethod
    def of(cls, fingerprint: str | None) -> StoredIdentity | None:
        return None if fingerprint is None else cls(fingerprint)


class SessionStore:
    """One SQLite file holding sessions (a client's, or a server's many).

    Args:
        path: the database file; created with its directory if missing.
        synchronous: ``"NORMAL"`` survives a killed process; ``"FULL"`` (or
            ``"EXTRA"``) also survives a power loss, slower.

    Raises:
        StoreError: the file is in use by another process, unreadable, or of
            another schema version.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL") -> None:
        sync = synchronous.upper()
        if sync not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = sync
        self._dirty: set[StoredSession] = set()
        self._batching = 0
        self._lock_fd = -1
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
            # Resume tokens live here: readable by the owner only. SQLite gives its -wal
            # and -shm files the mode of the database file.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            # The legacy transaction mode on purpose: the first write opens a transaction
            # that stays open until commit(), so an application's writes join ours.
            self.db = sqlite3.connect(self.path, isolation_level="DEFERRED")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={sync}")
            self.db.executescript(_SCHEMA)
            self._check_version()
        except (OSError, sqlite3.Error) as exc:
            self._unlock()
            raise StoreError(f"cannot open the session store {self.path}: {exc}") from exc
        self.closed = False

    def __repr__(self) -> str:
        return f"<SessionStore {str(self.path)!r}>"

    def _lock(self) -> None:
        """One process per store: two processes resuming one session would each
        replay and acknowledge on their own. The lock dies with the process."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"the session store {self.path} is in use by another process"
                " (or another SessionStore of this one: share that object instead)"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1

    def _check_version(self) -> None:
        row = self.db.execute("SELECT value FROM korinet_store WHERE name = 'schema'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO korinet_store VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            self.db.commit()
        elif row[0] != str(SCHEMA_VERSION):
            raise StoreError(
                f"the session store {self.path} has schema version {row[0]};"
                f" this KoriNet reads {SCHEMA_VERSION}"
            )

    # ------------------------------------------------------------------ reading

    def load(self, key: str) -> StoredRecord | None:
        """The session stored under ``key``, or None."""
        self._check_open()
        row = self.db.execute("SELECT * FROM korinet_sessions WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._record(row)

    def records(self, side: Side) -> list[StoredRecord]:
        """Every session of one side (a server's table at start-up)."""
        self._check_open()
        rows = self.db.execute("SELECT * FROM korinet_sessions WHERE side = ? ORDER BY key", (int(side),))
        return [self._record(row) for row in rows.fetchall()]

    def _record(self, row: tuple[Any, ...]) -> StoredRecord:
        key, side, session_id, token, version, codec, epoch, acked, delivered, early, corr, identity = row
        messages: tuple[StoredMessage, ...] = tuple(
            (seq, bytes(frame), size)
            for seq, size, frame in self.db.execute(
                "SELECT seq, size, frame FROM korinet_messages WHERE key = ? ORDER BY seq", (key,)
            )
        )
        snapshot = SessionSnapshot(
            Side(side),
            session_id,
            token,
            version,
            codec,
            epoch,
            acked,
            delivered,
            tuple(int(s) for s in early.split(",")) if early else (),
            messages,
        )
        return StoredRecord(key, snapshot, corr, identity)

    # ------------------------------------------------------------------ writing

    def attach(self, peer: Peer, key: str | None, record: StoredRecord | None = None) -> StoredSession:
        """Keep ``peer``'s session here under ``key`` (None: its session id, known
        after the first handshake). ``record`` is what the peer was restored from."""
        self._check_open()
        return StoredSession(self, peer, key, record)

    def forget(self, key: str) -> None:
        """Delete the session stored under ``key``, durably."""
        self._check_open()
        try:
            self.db.execute("DELETE FROM korinet_messages WHERE key = ?", (key,))
            self.db.execute("DELETE FROM korinet_sessions WHERE key = ?", (key,))
        except sqlite3.Error as exc:
            self._rollback()
            raise StoreError(f"cannot write the session store {self.path}: {exc}") from exc
        self.commit()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Accept messages without a commit each: inside the block, ``post()`` and the
        other accepting calls return before their message is durable; the block's
        end commits them all (and so does any write to a link before it, since
        nothing leaves before it is stored). After a crash inside the block, a
        restarted sender's ``last_seq`` tells which of them were kept.

        The trade: one commit per block (or per write to the link) instead of one
        per message; see bench/durable_store.py.
        """
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching and not self.closed:
                self.commit()

    @property
    def batching(self) -> bool:
        """True inside :meth:`batch`: accepting calls leave the commit to its end."""
        return self._batching > 0

    def commit(self) -> None:
        """Write every changed session, then commit (with the application's writes).

        Raises:
            StoreError: SQLite failed; nothing of this transaction is kept.
        """
        if self.closed:
            raise StoreError(f"the session store {self.path} is closed")
        try:
            while self._dirty:
                self._dirty.pop()._write()
            if self.db.in_transaction:
                self.db.commit()
        except sqlite3.Error as exc:
            self._rollback()
            raise StoreError(f"cannot write the session store {self.path}: {exc}") from exc

    def _rollback(self) -> None:
        try:
            self.db.rollback()
        except sqlite3.Error:
            pass

    def _check_open(self) -> None:
        if self.closed:
            raise StoreError(f"the session store {self.path} is closed")

    def close(self) -> None:
        """Commit what is pending and close the file (sessions stay in it)."""
        if self.closed:
            return
        try:
            self.commit()
        except StoreError as exc:
            logger.error("%r: %s", self, exc)
        self.closed = True
        self.db.close()
        self._unlock()


class StoredSession:
    """One session's rows in a :class:`SessionStore`, kept in step with its Peer.

    The peer calls :meth:`touch` when its session changed and ``store.commit()``
    when the change must be durable; writing compares with what was last written,
    so an unchanged session costs nothing and a new message costs one row.
    """

    __slots__ = ("_gone", "_meta", "_saved_high", "_trimmed", "key", "peer", "store")

    def __init__(self, store: SessionStore, peer: Peer, key: str | None, record: StoredRecord | None) -> None:
        self.store = store
        self.peer = peer
        self.key = key
        self._meta: tuple[object, ...] | None = None
        self._saved_high = 0  # the highest seq whose message is in the store
        self._trimmed = 0  # messages up to here were deleted (acknowledged)
        self._gone = False
        if record is not None:
            snapshot = record.snapshot
            self._meta = (*snapshot.meta(), record.corr, record.identity)
            self._saved_high = snapshot.next_seq - 1
            self._trimmed = snapshot.acked

    def __repr__(self) -> str:
        return f"<StoredSession {self.key}>"

    def touch(self) -> None:
        """The session changed: write it with the next commit."""
        if not self._gone:
            self.store._dirty.add(self)

    def _write(self) -> None:
        session = self.peer.session
        if self._gone or session.session_id is None:
            return  # nothing to resume before the first handshake
        try:
            snapshot = session.snapshot(messages=False)
        except InvalidState:
            return
        if self.key is None:
            self.key = snapshot.session_id
        key = self.key
        identity = getattr(self.peer.identity, "fingerprint", None) if session.side is not CLIENT else None
        meta = (*snapshot.meta(), self.peer.next_corr, identity)
        old = self._meta
        db = self.store.db
        if old is None or old[1] != snapshot.session_id or old[5] != snapshot.epoch:
            # A new session, or one that replaced an expired one (its messages renumbered).
            db.execute("DELETE FROM korinet_messages WHERE key = ?", (key,))
            self._saved_high = 0  # seqs start again: the old high-water mark means nothing
            self._insert(key, session.unacked_after(0))
            self._trimmed = snapshot.acked
        else:
            self._insert(key, session.unacked_after(self._saved_high))
            if snapshot.acked > self._trimmed:
                db.execute("DELETE FROM korinet_messages WHERE key = ? AND seq <= ?", (key, snapshot.acked))
                self._trimmed = snapshot.acked
        if meta != old:
            db.execute(
                "INSERT OR REPLACE INTO korinet_sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    int(snapshot.side),
                    snapshot.session_id,
                    snapshot.token,
                    snapshot.version,
                    snapshot.codec,
                    snapshot.epoch,
                    snapshot.acked,
                    snapshot.delivered,
                    ",".join(map(str, snapshot.delivered_early)),
                    self.peer.next_corr,
                    identity,
                ),
            )
            self._meta = meta

    def _insert(self, key: str, messages: Iterable[StoredMessage]) -> None:
        rows = [(key, seq, size, frame) for seq, frame, size in messages]
        if not rows:
            return
        if len(rows) == 1:
            self.store.db.execute("INSERT OR REPLACE INTO korinet_messages VALUES (?, ?, ?, ?)", rows[0])
        else:
            self.store.db.executemany("INSERT OR REPLACE INTO korinet_messages VALUES (?, ?, ?, ?)", rows)
        self._saved_high = rows[-1][1]

    def forget(self) -> None:
        """The session ended: delete it from the store, durably."""
        if self._gone:
            return
        self._gone = True
        store = self.store
        store._dirty.discard(self)
        key = self.key
        if key is None or store.closed:
            return
        try:
            store.forget(key)
        except StoreError as exc:
            logger.error("%r: cannot delete session %s: %s", store, key, exc)

    def detach(self) -> None:
        """Stop following the peer, leaving its last committed state in the store
        (a server that stops, a client that aborts: the session is resumed later)."""
        self._gone = True
        self.store._dirty.discard(self)
