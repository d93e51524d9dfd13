"""The sans-I/O session layer: handshake, sequencing, acks, resume, heartbeats."""

from __future__ import annotations

from .events import (
    Event,
    LinkFailed,
    LinkOpened,
    MessageReceived,
    MessagesAcked,
    PeerClosed,
    PongReceived,
    RealtimeReceived,
    SessionExpiredEvent,
)
from .handshake import HandshakeOutcome, Hello, ServerHandshake
from .negotiation import choose_codec, choose_version
from .session import PreparedMessage, Session, SessionStats
from .state import (
    CLIENT,
    CLOSED,
    CONNECTING,
    DETACHED,
    OPEN,
    PROTOCOL_VERSIONS,
    SERVER,
    CloseCode,
    SessionConfig,
    Side,
    State,
)

__all__ = [
    "CLIENT",
    "CLOSED",
    "CONNECTING",
    "DETACHED",
    "OPEN",
    "PROTOCOL_VERSIONS",
    "SERVER",
    "CloseCode",
    "Event",
    "HandshakeOutcome",
    "Hello",
    "LinkFailed",
    "LinkOpened",
    "MessageReceived",
    "MessagesAcked",
    "PeerClosed",
    "PongReceived",
    "PreparedMessage",
    "RealtimeReceived",
    "ServerHandshake",
    "Session",
    "SessionConfig",
    "SessionExpiredEvent",
    "SessionStats",
    "Side",
    "State",
    "choose_codec",
    "choose_version",
]
