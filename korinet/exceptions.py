"""Every error KoriNet raises, in one tree.

.. code-block:: text

    KoriNetError
    ├── ProtocolError
    │   ├── LocalProtocolError        you called the library wrong
    │   │   ├── InvalidState          ... in a state that does not allow it (also AssertionError)
    │   │   └── MessageTooLarge       a message over the peer's maximum frame size
    │   └── RemoteProtocolError       the peer misbehaved
    │       ├── FrameTooLarge         a length prefix over the limit
    │       ├── UnknownFrameType
    │       └── NegotiationError      no common version or codec (names both lists)
    ├── CodecError                    an object that cannot be encoded / bytes that cannot be decoded
    ├── MessageRejected               the peer refused a message (unknown type, invalid, no role)
    ├── ConnectionClosed              the link is gone; carries ``code`` and ``reason``
    │   ├── ConnectionClosedOK        ... by an orderly close
    │   └── ConnectionClosedError     ... by an error or a lost link
    ├── SessionExpired                the peer no longer knows our session; unacked messages are void
    ├── SendBufferFull                a bounded buffer is full and the caller asked not to wait
    ├── AuthenticationError           the peer refused our identity, or we refused the peer's
    │   └── HostKeyChanged            a server's key differs from the one pinned in known_hosts
    └── KoriNetTimeout                a deadline set by the caller passed (also TimeoutError)

Data lives in attributes, not only in the message, so callers can act on it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AuthenticationError",
    "CodecError",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "FrameTooLarge",
    "HostKeyChanged",
    "InvalidState",
    "KoriNetError",
    "KoriNetTimeout",
    "LocalProtocolError",
    "MessageRejected",
    "MessageTooLarge",
    "NegotiationError",
    "ProtocolError",
    "RemoteProtocolError",
    "SendBufferFull",
    "SessionExpired",
    "UnknownFrameType",
]


class KoriNetError(Exception):
    """Base class of every KoriNet error."""


class ProtocolError(KoriNetError):
    """The protocol was violated, by us or by the peer."""


class LocalProtocolError(ProtocolError):
    """This side used the API wrongly (a bug in the caller)."""


class InvalidState(LocalProtocolError, AssertionError):
    """An operation was attempted in a state that does not allow it."""


class MessageTooLarge(LocalProtocolError):
    """A message would make a frame larger than the peer accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message frame of {size} bytes exceeds the peer's limit of {limit} bytes")
        self.size = size
        self.limit = limit


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class FrameTooLarge(RemoteProtocolError):
    """A frame announced a length over the limit; nothing was allocated for it."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the limit of {limit} bytes")
        self.length = length
        self.limit = limit


class UnknownFrameType(RemoteProtocolError):
    """A frame carried a type byte this version does not define."""

    def __init__(self, frame_type: int) -> None:
        super().__init__(f"unknown frame type 0x{frame_type:02x}")
        self.frame_type = frame_type


class NegotiationError(RemoteProtocolError):
    """The two sides have no protocol version (or codec) in common."""

    def __init__(self, what: str, local: Sequence[object], remote: Sequence[object]) -> None:
        super().__init__(f"no common {what}: we speak {list(local)!r}, the peer speaks {list(remote)!r}")
        self.what = what
        self.local = list(local)
        self.remote = list(remote)


class CodecError(KoriNetError):
    """An object could not be encoded, or bytes could not be decoded."""


class MessageRejected(KoriNetError):
    """The peer refused a message: unknown type, failed validation, missing role..."""

    def __init__(self, reason: str, *, message_type: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message_type = message_type


class ConnectionClosed(KoriNetError):
    """The connection is closed; ``code`` and ``reason`` say why (see docs/PROTOCOL.md §7)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class ConnectionClosedOK(ConnectionClosed):
    """The connection was closed in an orderly way."""


class ConnectionClosedError(ConnectionClosed):
    """The connection was lost or closed because of an error."""


class SessionExpired(KoriNetError):
    """The peer does not know our session any more (it restarted, or the TTL passed).

    ``unconfirmed`` counts our messages that were sent but never acknowledged: whether
    the peer's application got them is unknown, so they are not retransmitted.
    """

    def __init__(self, session_id: str, unconfirmed: int = 0) -> None:
        super().__init__(
            f"session {session_id} expired on the peer; "
            f"{unconfirmed} unacknowledged message(s) have an unknown fate"
        )
        self.session_id = session_id
        self.unconfirmed = unconfirmed


class SendBufferFull(KoriNetError):
    """A bounded send buffer is full (see the window settings in SessionConfig)."""

    def __init__(self, limit: str) -> None:
        super().__init__(f"send buffer full ({limit})")
        self.limit = limit


class AuthenticationError(KoriNetError):
    """The peer could not be authenticated, or refused our credentials (CLOSE 1007)."""


class HostKeyChanged(AuthenticationError):
    """The server presented a key other than the one pinned for its address.

    Either someone is in the middle, or the server's key was replaced. Retrying cannot
    help: the session ends. ``path`` and ``line`` locate the pinned entry to delete
    once the change is known to be legitimate.
    """

    def __init__(self, address: str, pinned: str, offered: str, path: str, line: int) -> None:
        super().__init__(
            f"the key of {address} CHANGED: pinned {pinned}, offered {offered}. Someone may be "
            f"intercepting the connection, or the server's key was replaced. If the change is "
            f"expected, delete line {line} of {path} and connect again to pin the new key."
        )
        self.address = address
        self.pinned = pinned
        self.offered = offered
        self.path = path
        self.line = line


class KoriNetTimeout(KoriNetError, TimeoutError):
    """A deadline given by the caller passed before the operation completed."""
