"""The hub's memory: rooms, their messages and per-room sequence numbers, in SQLite.

One file (or ``:memory:``), stdlib ``sqlite3`` only. Sequence numbers are given
here, inside the insert's transaction, so that they never repeat or skip even
across hub restarts: a client that saw ``#general`` up to 41 asks for "since 41"
and gets exactly what it missed. ``mid`` (the sender's own id of a message) is
unique, which makes a re-sent message a no-op that answers with the first copy.

A hub on a cluster bus does not number messages itself: the room's log on the bus
does, and :meth:`History.put` stores each entry under the log's number.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, TypedDict

__all__ = ["History", "StoredMessage"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    name TEXT PRIMARY KEY,
    head INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    nick TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    mid TEXT,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_mid ON messages (mid) WHERE mid IS NOT NULL;
"""


class StoredMessage(TypedDict):
    room: str
    seq: int
    ts: float
    nick: str
    kind: str
    text: str
    mid: str | None


def _row(row: tuple[Any, ...]) -> StoredMessage:
    room, seq, ts, nick, kind, text, mid = row
    return {"room": room, "seq": seq, "ts": ts, "nick": nick, "kind": kind, "text": text, "mid": mid}


_COLUMNS = "room, seq, ts, nick, kind, text, mid"


class History:
    """Rooms and messages. Every method is a short synchronous query (the hub calls
    them from its event loop: each is microseconds on an indexed table)."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        # WAL + NORMAL: a commit costs no fsync (only checkpoints do); a power cut may
        # lose the last instants of history, never corrupt it.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self._heads: dict[str, int] = dict(self.db.execute("SELECT name, head FROM rooms").fetchall())

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ rooms

    def head(self, room: str) -> int | None:
        """The last sequence number of ``room``, or None if there is no such room."""
        return self._heads.get(room)

    def rooms(self) -> dict[str, int]:
        return dict(self._heads)

    def create_room(self, room: str, now: float) -> bool:
        """Create ``room``; False if it existed."""
        if room in self._heads:
            return False
        self.db.execute("INSERT OR IGNORE INTO rooms (name, head, created) VALUES (?, 0, ?)", (room, now))
        self._heads[room] = 0
        return True

    def import_room(self, room: str, head: int, messages: list[StoredMessage], now: float) -> None:
        """Make ``room`` what another hub handed over: these messages, this head (its
        sequence numbers go on from there). What this file held of the room is
        replaced, and so is any message with one of the same mids."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM messages WHERE room = ?", (room,))
            self.db.executemany(
                "INSERT OR REPLACE INTO messages (room, seq, ts, nick, kind, text, mid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(room, m["seq"], m["ts"], m["nick"], m["kind"], m["text"], m["mid"]) for m in messages],
            )
            self.db.execute(
                "INSERT INTO rooms (name, head, created) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET head = excluded.head",
                (room, head, now),
            )
        self._heads[room] = head

    # ------------------------------------------------------------------ messages

    def append(
        self, room: str, nick: str, text: str, kind: str, mid: str | None, ts: float
    ) -> tuple[StoredMessage, bool]:
        """Store a message; returns it with its sequence number, and whether it was
        already there (same ``mid``: the first copy is returned, nothing is stored)."""
        if mid is not None:
            found = self.db.execute(f"SELECT {_COLUMNS} FROM messages WHERE mid = ?", (mid,)).fetchone()
            if found is not None:
                return _row(found), True
        seq = self._heads[room] + 1
        with self.db:  # one transaction: the head and the message move together
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO messages (room, seq, ts, nick, kind, text, mid) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (room, seq, ts, nick, kind, text, mid),
            )
            self.db.execute("UPDATE rooms SET head = ? WHERE name = ?", (seq, room))
        self._heads[room] = seq
        return {
            "room": room,
            "seq": seq,
            "ts": ts,
            "nick": nick,
            "kind": kind,
            "text": text,
            "mid": mid,
        }, False

    def find(self, mid: str) -> StoredMessage | None:
        """The message stored under the sender's id ``mid``, if any."""
        found = self.db.execute(f"SELECT {_COLUMNS} FROM messages WHERE mid = ?", (mid,)).fetchone()
        return None if found is None else _row(found)

    def put(
        self, room: str, seq: int, nick: str, text: str, kind: str, mid: str | None, ts: float
    ) -> StoredMessage | None:
        """Store a message under a number given elsewhere (the room's log on the cluster
        bus); None if ``seq`` is not above the head (stored already).

        ``seq`` must be the head + 1: the log has no gaps, and a hole here would hold
        every client's display at it for ever. A ``mid`` already stored (a re-send the
        bus took again, later than its duplicate window) is kept without its ``mid``:
        the number stays taken, the unique index stays whole."""
        head = self._heads.get(room)
        if head is None:
            self.create_room(room, ts)
            head = 0
        if seq <= head:
            return None
        if seq != head + 1:
            raise ValueError(f"{room}: entry {seq} after {head} (the log skipped entries)")
        if mid is not None and self.find(mid) is not None:
            mid = None
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO messages (room, seq, ts, nick, kind, text, mid) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (room, seq, ts, nick, kind, text, mid),
            )
            self.db.execute("UPDATE rooms SET head = ? WHERE name = ?", (seq, room))
        self._heads[room] = seq
        return {"room": room, "seq": seq, "ts": ts, "nick": nick, "kind": kind, "text": text, "mid": mid}

    def since(self, room: str, seq: int, limit: int) -> list[StoredMessage]:
        """Messages of ``room`` after ``seq``, oldest first, at most ``limit``."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq > ? ORDER BY seq LIMIT ?",
            (room, seq, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def last(self, room: str, limit: int, before: int | None = None) -> list[StoredMessage]:
        """The last ``limit`` messages of ``room`` (before seq ``before``), oldest first."""
        top = before if before is not None else (self._heads.get(room, 0) + 1)
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (room, top, limit),
        ).fetchall()
        return [_row(r) for r in reversed(rows)]

    def search(self, query: str, rooms: list[str], limit: int) -> list[StoredMessage]:
        """Messages of ``rooms`` containing ``query`` (case-insensitive for ASCII),
        the newest ``limit`` of them, oldest first."""
        if not rooms:
            return []
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        marks = ",".join("?" * len(rooms))
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE room IN ({marks}) AND text LIKE ? ESCAPE '\\' "
            "ORDER BY ts DESC LIMIT ?",
            (*rooms, pattern, limit),
        ).fetchall()
        return [_row(r) for r in reversed(rows)]
