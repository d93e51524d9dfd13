"""Endpoint: what every runtime does above the Session, written once, sans-I/O.

The Session turns bytes into events; the Endpoint turns those events into what
the application waits on: acknowledgement waiters (by seq), reply waiters (by
correlation id), the inbox and the realtime inbox, typed-message dispatch and
handler answers, the renumbering after an expiry, the end of the session, and
the plugin notifications of all of these.

It owns no socket, no loop and no thread. A *driver* does the I/O and the
waking: the asyncio :class:`~korinet.runtime.peer.Peer` and the blocking
:class:`~korinet.sync.SyncClient` each implement :class:`Driver`, and hand the
Endpoint waiters that meet :class:`Waiter` (an ``asyncio.Future`` does as is).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from .dispatch import admit, admit_realtime, queue_answer, queue_rejection, rejection_reason
from .exceptions import CodecError, ConnectionClosedOK, KoriNetError, MessageRejected, SessionExpired
from .messages import Message, MessageType
from .session import (
    CloseCode,
    Event,
    LinkFailed,
    LinkOpened,
    MessageReceived,
    MessagesAcked,
    PeerClosed,
    PongReceived,
    RealtimeReceived,
    Session,
    SessionExpiredEvent,
)
from .wire.frames import MessageFlags

if TYPE_CHECKING:
    from .plugins import PluginManager

__all__ = ["REALTIME_INBOX", "Done", "Driver", "Endpoint", "EndpointStatus", "SessionHandle", "Waiter"]

logger = logging.getLogger(__name__)

_REQUEST = int(MessageFlags.REQUEST)
_REPLY = int(MessageFlags.REPLY)
_ERROR = int(MessageFlags.ERROR)
_REJECT = int(MessageFlags.REJECT)

#: Realtime messages waiting for recv_realtime_nowait(); the oldest is dropped when full.
REALTIME_INBOX: int = 256
#: Session ends that are routine, logged at INFO rather than WARNING.
_QUIET_ENDS = (CloseCode.LINK_LOST, CloseCode.GOING_AWAY, CloseCode.SESSION_UNKNOWN)


#: Called with ``(result, None)`` or ``(None, error)`` when an async handler is done.
Done = Callable[[Any, "BaseException | None"], None]


class Waiter(Protocol):
    """What the Endpoint resolves: an ``asyncio.Future`` meets it as is."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...

    def exception(self) -> BaseException | None: ...


class SessionHandle(Protocol):
    """A session as handlers and plugin hooks see it (a Peer, a SyncClient...)."""

    @property
    def session(self) -> Session: ...

    @property
    def session_id(self) -> str | None: ...

    @property
    def identity(self) -> Any: ...

    @property
    def is_connected(self) -> bool: ...

    @property
    def is_closed(self) -> bool: ...


class Driver(Protocol):
    """The I/O side of an Endpoint: how it wakes callers and runs code."""

    def inbox_readable(self) -> None:
        """A message (or a notice, or the end) waits for recv(): called when the
        inbox stops being empty, not for every message queued behind the first."""

    def space_available(self) -> None:
        """Acknowledgements freed window space (or the session ended)."""

    def flush_soon(self) -> None:
        """The session has bytes to write that no read will flush (a late answer).

        Not called for what is queued inside :meth:`Endpoint.process`: every driver
        flushes right after it, and a second flush would cost a loop turn per request.
        """

    def link_opened(self, ev: LinkOpened) -> None:
        """A handshake completed on the current link (timers, reconnect policy)."""

    def ended(self, error: KoriNetError) -> None:
        """The session ended: release the link and whatever waits on it."""

    def call_hook(self, hook: Callable[..., list[Any]], *args: Any) -> None:
        """Call a plugin notification and run the awaitables it returns."""

    def call_handler(self, handler: Callable[..., Any], msg: Message) -> Any:
        """Call a message handler (outside any lock); may raise."""

    def run_awaitable(
        self, awaitable: Awaitable[Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Await what an async handler returned, then call ``done(result, error)``."""


class Endpoint:
    """The state above one Session: waiters, inboxes, dispatch (module docstring).

    ``handle`` is what handlers and hooks receive as the session (the driver's
    public object); ``driver`` is told what to wake and run.
    """

    # One per session, most of them idle on a server: slots, not a dict.
    __slots__ = (
        "_notice",
        "_opened_once",
        "_probe",
        "_processing",
        "_rejected",
        "accept_plain",
        "acks",
        "driver",
        "ended",
        "handle",
        "identity",
        "inbox",
        "link_failure",
        "links_opened",
        "message_types",
        "next_corr",
        "on_delivered",
        "plugins",
        "requests",
        "rt_inbox",
        "rtt",
        "session",
    )

    def __init__(
        self,
        session: Session,
        plugins: PluginManager,
        handle: SessionHandle,
        driver: Driver,
        *,
        accept_plain: bool = True,
        identity: Any = None,
    ) -> None:
        self.session = session
        self.plugins = plugins
        self.handle = handle
        self.driver = driver
        self.message_types: dict[str, MessageType] = plugins.message_types()
        self.accept_plain = accept_plain
        #: who the peer is (set by authentication; None when anonymous)
        self.identity = identity
        #: the round-trip time measured by the last heartbeat, in seconds
        self.rtt: float | None = None
        #: handshakes completed on this session (first open and every resume)
        self.links_opened = 0
        #: why the session ended (None while it lives)
        self.ended: KoriNetError | None = None
        #: why the session asked to drop the current link (its CLOSE says nothing)
        self.link_failure: KoriNetError | None = None
        #: called after a message is counted delivered (a durable store touches itself)
        self.on_delivered: Callable[[], None] | None = None
        # Made on first use and dropped once empty again (None: empty): an empty deque
        # is 760 B, and a server's sessions are mostly idle. Read them afresh, not
        # through a reference kept across a wait.
        #: (message, epoch) waiting for recv()
        self.inbox: deque[tuple[Message, int]] | None = None
        #: realtime messages waiting for recv_realtime_nowait(), at most REALTIME_INBOX
        self.rt_inbox: deque[Message] | None = None
        #: (seq, waiter) resolved when seq is acknowledged, in seq order
        self.acks: deque[tuple[int, Waiter]] | None = None
        self.requests: dict[int, tuple[Waiter, int]] = {}
        self.next_corr = 1  # the next request's correlation id
        self._rejected: dict[int, str] = {}
        self._opened_once = False
        self._processing = False  # inside process(): the driver flushes after it
        # the message timed for korinet_ack_timed: (seq, queued at, links_opened then)
        self._probe: tuple[int, float, int] | None = None
        self._notice: KoriNetError | None = None  # raised once by recv (session expired)

    # ------------------------------------------------------------------ sending side

    def sent(self, seq: int, waiter: Waiter | None = None) -> None:
        """Message ``seq`` was accepted by the session: resolve ``waiter`` on its ack,
        and time it for korinet_ack_timed if a plugin listens."""
        if waiter is not None:
            acks = self.acks
            if acks is None:
                acks = self.acks = deque()
            acks.append((seq, waiter))
        if self._probe is None and self.plugins.times_acks:
            self._probe = (seq, time.perf_counter(), self.links_opened)

    def wait_acked(self, seq: int, waiter: Waiter) -> None:
        """Resolve ``waiter`` once everything up to ``seq`` is acknowledged."""
        acks = self.acks
        if acks is None:
            acks = self.acks = deque()
        if not acks or acks[-1][0] <= seq:
            acks.append((seq, waiter))
        else:  # rare: an older seq than one already awaited
            entries = sorted([*acks, (seq, waiter)], key=lambda e: e[0])
            acks.clear()
            acks.extend(entries)

    def new_request(self, waiter: Waiter) -> int:
        """Register a reply waiter; returns the request's correlation id."""
        corr = self.next_corr
        self.next_corr += 1
        self.requests[corr] = (waiter, 0)
        return corr

    def request_sent(self, corr: int, seq: int) -> None:
        """The request ``corr`` went out as message ``seq`` (renumbered on expiry)."""
        entry = self.requests.get(corr)
        if entry is not None:
            self.requests[corr] = (entry[0], seq)

    # ------------------------------------------------------------------ receiving side

    def take_notice(self) -> KoriNetError | None:
        """The SessionExpired that recv() raises once, if any."""
        notice, self._notice = self._notice, None
        return notice

    @property
    def has_notice(self) -> bool:
        return self._notice is not None

    def take(self, lazy: bool = False) -> Message:
        """The oldest inbox message, handed to the application: only now counted
        delivered, so its ack says the application has it (a request's ack rides
        on its reply; ``lazy``: any message's ack waits for a frame to ride on)."""
        inbox = self.inbox
        assert inbox is not None, "take() from an empty inbox"
        msg, epoch = inbox.popleft()
        if not inbox:
            self.inbox = None
        if msg.seq:
            self.session.message_delivered(msg.seq, epoch, lazy=lazy or bool(msg.corr))
        return msg

    def put_back(self, msg: Message) -> None:
        """Return a taken message to the front of the inbox (its reader was cancelled
        before it saw it). It stays counted delivered: taking it again acks nothing."""
        queued = (msg, self.session.epoch)
        if self.inbox is None:
            self.inbox = deque((queued,))
        else:
            self.inbox.appendleft(queued)

    def take_realtime(self) -> Message | None:
        """The oldest waiting realtime message, or None."""
        rt_inbox = self.rt_inbox
        if not rt_inbox:
            return None
        msg = rt_inbox.popleft()
        if not rt_inbox:
            self.rt_inbox = None
        return msg

    def process(self, events: list[Event]) -> bool:
        """Act on the session's events; returns whether a link opened.

        The driver flushes the session right after this returns.
        """
        self._processing = True
        try:
            return self._process(events)
        finally:
            self._processing = False

    def _process(self, events: list[Event]) -> bool:
        opened = False
        for ev in events:
            kind = type(ev)
            if kind is MessagesAcked:
                self.acked(ev.seq)  # type: ignore[attr-defined]
            elif kind is MessageReceived:
                self.dispatch(ev)  # type: ignore[arg-type]
            elif kind is RealtimeReceived:
                self.dispatch_realtime(ev)  # type: ignore[arg-type]
            elif kind is LinkOpened:
                opened = True
                self.opened(ev)  # type: ignore[arg-type]
            elif kind is PongReceived:
                self.rtt = ev.rtt  # type: ignore[attr-defined]
            elif kind is SessionExpiredEvent:
                self.expired(ev)  # type: ignore[arg-type]
            elif kind is PeerClosed:
                assert self.session.failure is not None
                self.finish(self.session.failure)
            elif kind is LinkFailed:
                ev_f: LinkFailed = ev  # type: ignore[assignment]
                if ev_f.session_ended:
                    self.finish(ev_f.error)  # logs it
                else:
                    logger.warning("%r: dropping the link: %s", self.handle, ev_f.error)
                    self.link_failure = ev_f.error
        return opened

    def opened(self, ev: LinkOpened) -> None:
        self.links_opened += 1
        self.driver.link_opened(ev)
        self.driver.space_available()
        hook = self.driver.call_hook
        if not self._opened_once:
            self._opened_once = True
            hook(self.plugins.session_opened, self.handle)
            return
        if ev.resumed:
            hook(self.plugins.session_resumed, self.handle, ev.replayed)
        else:
            hook(self.plugins.session_opened, self.handle)
        hook(self.plugins.link_reopened, self.handle, ev.resumed, ev.replayed)

    def acked(self, seq: int) -> None:
        acks = self.acks
        rejected = self._rejected
        while acks and acks[0][0] <= seq:
            s, waiter = acks.popleft()
            if not waiter.done():
                reason = rejected.pop(s, None) if rejected else None
                if reason is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(MessageRejected(reason))
        if not acks:
            self.acks = None
        if rejected:  # rejections of posted messages nobody awaits: already logged
            for s in [s for s in rejected if s <= seq]:
                del rejected[s]
        probe = self._probe
        if probe is not None and probe[0] <= seq:
            self._probe = None
            if probe[2] == self.links_opened:  # Karn's rule: a sample across a lost link measures the outage
                self.driver.call_hook(
                    self.plugins.ack_timed, self.handle, probe[0], time.perf_counter() - probe[1]
                )
        self.driver.space_available()

    def expired(self, ev: SessionExpiredEvent) -> None:
        """A new session replaced an expired one: waiters of messages it carries on
        follow the renumbering, the others fail."""
        error = SessionExpired(ev.old_session_id, ev.unconfirmed)
        logger.warning("%r: %s", self.handle, error)
        renumbered = ev.renumbered
        codec_error = CodecError(f"the new session's codec cannot carry this message: {ev.failure}")
        kept: deque[tuple[int, Waiter]] = deque()
        for seq, waiter in self.acks or ():
            new_seq = renumbered.get(seq)
            if new_seq is not None:
                kept.append((new_seq, waiter))
            elif not waiter.done():
                waiter.set_exception(error if seq <= ev.unconfirmed_through else codec_error)
                waiter.exception()  # a send_nowait caller may never look: no warning
        self.acks = kept or None
        for corr, (reply, seq) in list(self.requests.items()):
            new_seq = renumbered.get(seq)
            if new_seq is not None:
                self.requests[corr] = (reply, new_seq)
            elif seq and not reply.done():
                reply.set_exception(error if seq <= ev.unconfirmed_through else codec_error)
        self._rejected.clear()
        self._probe = None  # its sequence number belonged to the old session
        self._notice = error
        self.driver.inbox_readable()
        self.driver.call_hook(self.plugins.session_closed, self.handle, f"expired: {error}")

    def finish(self, error: KoriNetError) -> bool:
        """The session ended: fail every waiter, tell the driver, notify plugins.
        Returns False if it had already ended."""
        if self.ended is not None:
            return False
        self.ended = error
        for _, waiter in self.acks or ():
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()
        for reply, _ in self.requests.values():
            if not reply.done():
                reply.set_exception(error)
        self.driver.space_available()
        self.driver.inbox_readable()
        self.driver.ended(error)
        if isinstance(error, ConnectionClosedOK) or getattr(error, "code", None) in _QUIET_ENDS:
            logger.info("%r closed: %s", self.handle, error)
        else:
            logger.warning("%r ended: %s", self.handle, error)
        self.driver.call_hook(self.plugins.session_closed, self.handle, str(error))
        return True

    # ------------------------------------------------------------------ dispatch

    def deliver(self, seq: int, lazy: bool = False, epoch: int | None = None) -> None:
        """Count message ``seq`` delivered to the application (its ack may go out)."""
        session = self.session
        session.message_delivered(seq, session.epoch if epoch is None else epoch, lazy=lazy)
        if self.on_delivered is not None:
            self.on_delivered()

    def dispatch(self, ev: MessageReceived) -> None:
        """A reliable message: a reply or rejection resolves its waiter, a typed one
        with a handler runs it, anything else goes to the inbox (korinet.dispatch)."""
        flags = ev.flags
        if flags & (_REPLY | _REJECT):
            # lazy: the ack rides on our next frame (or the ack timer), not a write of its own
            self.deliver(ev.seq, lazy=True)
            reason = rejection_reason(ev)
            if flags & _REJECT and not flags & _REQUEST:
                # corr is the seq of our rejected message
                self._rejected[ev.corr] = reason
                logger.warning("%r: the peer rejected our message %d: %s", self.handle, ev.corr, reason)
                return
            entry = self.requests.get(ev.corr)
            if entry is not None and not entry[0].done():
                if flags & (_ERROR | _REJECT):
                    entry[0].set_exception(MessageRejected(reason, message_type=ev.type or None))
                else:
                    entry[0].set_result(ev.obj)
            return
        if not ev.type and self.accept_plain:
            mtype, refusal = None, None  # plain data, welcome here: admit()'s first case, inline
        else:
            mtype, refusal = admit(ev, self.message_types, self.identity, self.accept_plain)
        if refusal is not None:
            queue_rejection(self.session, ev, refusal, self.handle)
            self.driver.call_hook(self.plugins.message_rejected, self.handle, ev.type, refusal)
            return
        msg = Message(ev.type, ev.obj, ev.seq, ev.corr if flags & _REQUEST else 0, self.handle)
        if mtype is None or mtype.handler is None:
            queued = (msg, self.session.epoch)
            if self.inbox is not None:
                self.inbox.append(queued)  # a reader waits only on an empty inbox: told already
                return
            self.inbox = deque((queued,))
            self.driver.inbox_readable()
            return
        self.deliver(ev.seq, lazy=bool(msg.corr))  # the handler takes it now; a reply carries the ack
        self._run_handler(mtype.handler, msg)

    def _run_handler(self, handler: Callable[..., Any], msg: Message) -> None:
        try:
            result = self.driver.call_handler(handler, msg)
        except Exception as exc:
            logger.exception("%r: handler for %r failed", self.handle, msg.type)
            self._answer(msg, None, exc)
            return
        if inspect.isawaitable(result):
            self.driver.run_awaitable(result, lambda value, exc: self._answered_late(msg, value, exc))
        else:
            self._answer(msg, result, None)

    def _answered_late(self, msg: Message, result: Any, error: BaseException | None) -> None:
        if error is not None:
            logger.error("%r: handler for %r failed", self.handle, msg.type, exc_info=error)
        self._answer(msg, result, error)

    def _answer(self, msg: Message, result: Any, error: BaseException | None) -> None:
        if not msg.corr or self.ended is not None:
            return
        queued = queue_answer(self.session, msg.type, msg.corr, result, error, self.handle)
        if queued and not self._processing:
            self.driver.flush_soon()

    def dispatch_realtime(self, ev: RealtimeReceived) -> None:
        mtype, refusal = admit_realtime(ev, self.message_types, self.identity)
        if refusal is not None:
            self.session.stats.realtime_malformed += 1  # dropped: no REJECT for realtime
            self.driver.call_hook(self.plugins.message_rejected, self.handle, ev.type, refusal)
            return
        msg = Message(ev.type, ev.obj, 0, 0, self.handle)
        if mtype is not None and mtype.handler is not None:
            try:
                self.driver.call_handler(mtype.handler, msg)
            except Exception:
                logger.exception("%r: realtime handler for %r failed", self.handle, ev.type)
            return
        rt_inbox = self.rt_inbox
        if rt_inbox is None:
            rt_inbox = self.rt_inbox = deque(maxlen=REALTIME_INBOX)
        if len(rt_inbox) == rt_inbox.maxlen:
            self.session.stats.realtime_dropped += 1
        rt_inbox.append(msg)


class EndpointStatus:
    """The status every driver shows the application, read from its Endpoint."""

    endpoint: Endpoint
    session: Session

    @property
    def session_id(self) -> str | None:
        return self.session.session_id

    @property
    def identity(self) -> Any:
        """Who the peer is (set by authentication; None when anonymous)."""
        return self.endpoint.identity

    @identity.setter
    def identity(self, value: Any) -> None:
        self.endpoint.identity = value

    @property
    def message_types(self) -> dict[str, MessageType]:
        return self.endpoint.message_types

    @property
    def accept_plain(self) -> bool:
        return self.endpoint.accept_plain

    @property
    def rtt(self) -> float | None:
        """The round-trip time measured by the last heartbeat, in seconds."""
        return self.endpoint.rtt

    @property
    def links_opened(self) -> int:
        """Handshakes completed on this session (first open and every resume)."""
        return self.endpoint.links_opened

    @property
    def is_closed(self) -> bool:
        return self.endpoint.ended is not None

    @property
    def queued(self) -> int:
        """Reliable messages sent but not yet acknowledged."""
        return self.session.unacked
