"""Events a Session reports to its driver (docs/PROTOCOL.md §4).

Treat them as read-only. They are not frozen because frozen dataclasses cost a
microsecond more to build, and one MessageReceived is built per message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..exceptions import KoriNetError

__all__ = [
    "Event",
    "LinkFailed",
    "LinkOpened",
    "MessageReceived",
    "MessagesAcked",
    "PeerClosed",
    "PongReceived",
    "RealtimeReceived",
    "SessionExpiredEvent",
]


class Event:
    """Base class of session events."""

    __slots__ = ()


@dataclass(slots=True)
class LinkOpened(Event):
    """The handshake finished; messages flow. ``resumed`` is False for a new session."""

    session_id: str
    resumed: bool
    version: int
    codec: str
    replayed: int


@dataclass(slots=True)
class SessionExpiredEvent(Event):
    """(client) The server no longer knew our session; a new one replaced it.

    Messages up to ``unconfirmed_through`` were sent and never acknowledged: their
    fate is unknown and they are dropped. Later ones were never sent and carry on in
    the new session: ``renumbered`` maps their old seq to the new one, and ``failed``
    lists those the new session's codec cannot carry (dropped with ``failure``).
    """

    old_session_id: str
    unconfirmed_through: int
    unconfirmed: int
    renumbered: dict[int, int] = field(default_factory=dict)
    failed: tuple[int, ...] = ()
    failure: str = ""


@dataclass(slots=True)
class MessageReceived(Event):
    """A reliable message, new (never a duplicate). Call ``message_delivered(seq)``
    once the application has it; only then is it acknowledged."""

    seq: int
    flags: int
    corr: int
    type: str
    obj: Any


@dataclass(slots=True)
class RealtimeReceived(Event):
    """A realtime message: unacknowledged, never replayed."""

    flags: int
    type: str
    obj: Any


@dataclass(slots=True)
class MessagesAcked(Event):
    """The peer's application has every message up to and including ``seq``."""

    seq: int


@dataclass(slots=True)
class PongReceived(Event):
    rtt: float


@dataclass(slots=True)
class PeerClosed(Event):
    """The peer ended the session with a CLOSE frame."""

    code: int
    reason: str


@dataclass(slots=True)
class LinkFailed(Event):
    """This link must be dropped: ``error`` says why. If ``session_ended`` the
    session is CLOSED too (protocol violation); otherwise it may resume."""

    error: KoriNetError
    session_ended: bool
