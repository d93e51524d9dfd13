"""Session states and settings.

Theory of operation (docs/PROTOCOL.md §4): a *session* outlives the TCP connections
that carry it. Each connection ("link") starts with a handshake; while a link is
OPEN, MSG frames flow both ways and are acknowledged cumulatively. When a link is
lost the session is DETACHED: it keeps every unacknowledged message, and the next
link resumes it, replaying what the peer did not receive. A session ends in CLOSED,
by an orderly CLOSE, a protocol violation, or expiry.

    DETACHED --connection_made--> CONNECTING --WELCOME/accept--> OPEN
        ^                              |                          |
        +-------- link lost -----------+--------------------------+
    any state --CLOSE sent/received, protocol error, expiry--> CLOSED (terminal)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CLIENT",
    "CLOSED",
    "CONNECTING",
    "DETACHED",
    "OPEN",
    "PROTOCOL_VERSIONS",
    "SERVER",
    "CloseCode",
    "SessionConfig",
    "Side",
    "State",
]

#: Protocol versions this implementation speaks, best last. 2 is the legacy wire,
#: served separately (korinet.protocol.legacy), never negotiated in a HELLO.
PROTOCOL_VERSIONS: Final = (3,)


class Side(enum.IntEnum):
    CLIENT = 0
    SERVER = 1


CLIENT: Final = Side.CLIENT
SERVER: Final = Side.SERVER


class State(enum.IntEnum):
    DETACHED = 0
    CONNECTING = 1
    OPEN = 2
    CLOSED = 3


DETACHED: Final = State.DETACHED
CONNECTING: Final = State.CONNECTING
OPEN: Final = State.OPEN
CLOSED: Final = State.CLOSED


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Limits and timings of one side. Every buffer here is bounded.

    Attributes:
        versions: protocol versions offered (client) or accepted (server).
        codecs: codec names in order of preference (the client's order wins); None
            (the default) offers every installed codec, best first by its declared
            preference, msgpack last (korinet.codecs.base.default_offer).
        max_frame_size: largest frame accepted, in bytes (checked before allocating).
        heartbeat_interval: seconds between PINGs on an open link.
        dead_after: a link with nothing received for ``dead_after`` times the *peer's*
            heartbeat interval is declared dead (2.5 keeps detection under 3 intervals).
        handshake_timeout: seconds a link may spend in the handshake.
        window: most unacknowledged messages in flight each way. Full: backpressure
            (the runtime's send waits) or SendBufferFull for non-waiting callers.
        window_bytes: most unacknowledged payload bytes in flight each way.
        max_peer_heartbeat: the longest heartbeat interval we believe from a peer;
            one announcing more is still declared dead after ``dead_after`` times this.
    """

    versions: tuple[int, ...] = PROTOCOL_VERSIONS
    codecs: tuple[str, ...] | None = None
    max_frame_size: int = 16 * 1024 * 1024
    heartbeat_interval: float = 5.0
    dead_after: float = 2.5
    handshake_timeout: float = 10.0
    window: int = 4096
    window_bytes: int = 64 * 1024 * 1024
    max_peer_heartbeat: float = 60.0


class CloseCode(enum.IntEnum):
    """Codes of a CLOSE frame (docs/PROTOCOL.md §7)."""

    NORMAL = 1000  # the session ends by agreement; nothing more will come
    GOING_AWAY = 1001  # the server shuts down; the session ends
    PROTOCOL_ERROR = 1002  # malformed frame, bad state, window exceeded...
    UNSUPPORTED_VERSION = 1003  # no common protocol version
    UNSUPPORTED_CODEC = 1004  # no common codec
    FRAME_TOO_LARGE = 1005
    SESSION_UNKNOWN = 1006  # reserved: resume refused (WELCOME with "expired" is used instead)
    AUTH_FAILED = 1007
    HANDSHAKE_TIMEOUT = 1008
    TRY_AGAIN_LATER = 1009  # a connection limit; retry with backoff
    INTERNAL_ERROR = 1011
    HEARTBEAT_TIMEOUT = 1012  # local only: the peer went silent (never sent)
    LINK_LOST = 1013  # local only: the TCP connection dropped (never sent)
