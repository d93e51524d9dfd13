"""Typed messages: what a plugin registers, and what a handler receives."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .endpoint import SessionHandle

__all__ = ["REALTIME", "RELIABLE", "Delivery", "Handler", "Message", "MessageType"]


class Delivery(enum.Enum):
    """How a message type travels (docs/PROTOCOL.md §5)."""

    RELIABLE = "reliable"  # exactly once, in order, replayed across reconnects
    REALTIME = "realtime"  # best effort, never replayed, dropped when stale


RELIABLE: Final = Delivery.RELIABLE
REALTIME: Final = Delivery.REALTIME


@dataclass(slots=True)
class Message:
    """A message as the application receives it (treat it as read-only).

    Attributes:
        type: the registered type name, or ``""`` for plain data.
        data: the decoded payload.
        seq: the sequence number in its session (0 for realtime messages).
        corr: the correlation id of a request (0 when it is not a request).
        peer: the runtime peer it came from (server side), for replies.
    """

    type: str
    data: Any
    seq: int = 0
    corr: int = 0
    peer: Any = field(default=None, repr=False, compare=False)
    #: the v2 frame id for legacy peers; see :attr:`message_id`
    id: str = ""

    @property
    def message_id(self) -> str:
        """A stable id: ``"<session>-<seq>"`` (the same across reconnects), or the v2 id."""
        if self.id:
            return self.id
        return f"{getattr(self.peer, 'session_id', None)}-{self.seq}"

    @property
    def is_request(self) -> bool:
        return self.corr != 0


#: A handler gets the sending peer (a Peer, or the blocking SyncClient) and the message;
#: for a request, its return value (or awaited result) is the reply. Raising answers
#: the request with an error.
Handler = Callable[["SessionHandle", Message], Any | Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class MessageType:
    """A message type a plugin registers (hook ``korinet_register_message_types``).

    Attributes:
        name: unique across plugins; by convention ``"<plugin>.<what>"``.
        validate: called with the payload on receipt; raise ``ValueError`` or
            ``TypeError`` to reject the message (the sender gets MessageRejected).
        delivery: ``RELIABLE`` (default) or ``REALTIME``.
        handler: called on the receiving side; ``None`` leaves the message to
            ``recv()``.
        required_role: only peers whose identity has this role may send it.
        description: one line for ``korinet plugins``.
    """

    name: str
    validate: Callable[[Any], Any] | None = None
    delivery: Delivery = RELIABLE
    handler: Handler | None = None
    required_role: str | None = None
    description: str = ""
