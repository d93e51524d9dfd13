"""What a session must keep to survive the death of its process (docs/PROTOCOL.md §6.4).

A :class:`SessionSnapshot` is plain data: :meth:`Session.snapshot` takes one and
:meth:`Session.restore` puts it back into a fresh session. Nothing here does I/O;
the runtime's store (``korinet.runtime.store``) writes snapshots to SQLite.

What is kept, and why it is enough:

* identity: side, session id, resume token, negotiated version and codec, epoch;
* the send side: every unacknowledged reliable message, as the frame that carries
  it (seq included), and the highest acknowledged seq. The next seq follows from
  them (every seq above ``acked`` is still buffered);
* the receive side: ``delivered``, the last message the application has, and the
  ones it took out of order (``delivered_early``). ``received`` is *not* kept: what
  was received but not delivered died with the process, so a restored session says
  it received ``delivered`` and the peer replays the rest.

Realtime messages are never kept; neither are timers or statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

from .state import Side

__all__ = ["SessionSnapshot", "StoredMessage"]

#: An unacknowledged reliable message: (seq, frame, payload size in bytes).
StoredMessage = tuple[int, bytes, int]


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """The durable state of one session (see the module docstring)."""

    side: Side
    session_id: str
    token: str
    version: int
    codec: str
    epoch: int
    acked: int
    delivered: int
    delivered_early: tuple[int, ...] = ()
    messages: tuple[StoredMessage, ...] = ()

    @property
    def next_seq(self) -> int:
        """The seq the next reliable message gets: one past the last buffered one,
        or past ``acked`` when nothing is buffered."""
        last = self.messages[-1][0] if self.messages else 0
        return max(last, self.acked) + 1

    def meta(self) -> tuple[object, ...]:
        """Everything but the messages: a store compares it to skip unchanged rows."""
        return (
            self.side,
            self.session_id,
            self.token,
            self.version,
            self.codec,
            self.epoch,
            self.acked,
            self.delivered,
            self.delivered_early,
        )
