"""Peer: the application's handle on one session, on either side; the asyncio
driver of an :class:`~korinet.endpoint.Endpoint`.

A Peer outlives connections: the Session inside keeps sequence numbers and the
replay buffer, the Endpoint keeps what the application waits on (acks, replies,
the inbox). Links come and go underneath (:meth:`Peer.attach` /
:meth:`Peer.link_lost`, called by the Connection and the Hub).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from ..endpoint import Done, Endpoint, EndpointStatus
from ..exceptions import (
    ConnectionClosedError,
    ConnectionClosedOK,
    KoriNetError,
    KoriNetTimeout,
    SendBufferFull,
)
from ..messages import REALTIME, Message
from ..session import (
    CLOSED,
    OPEN,
    CloseCode,
    LinkOpened,
    PreparedMessage,
    Session,
)
from ..wire.frames import MessageFlags
from .store import StoreError

if TYPE_CHECKING:
    from ..plugins import PluginManager
    from .connection import Connection
    from .store import SessionStore, StoredRecord, StoredSession

__all__ = ["Peer"]

logger = logging.getLogger(__name__)

_REQUEST = int(MessageFlags.REQUEST)
_REPLY = int(MessageFlags.REPLY)

#: Queued messages are written at once after this many, without waiting for the loop.
FLUSH_EVERY: int = 64
#: Longest close() waits for the peer to answer our CLOSE and drop the connection.
CLOSE_ECHO_TIMEOUT: float = 2.0
#: Longest a lazy acknowledgement (of a request or reply) waits for a frame to ride on.
LAZY_ACK_DELAY: float = 0.02
#: A realtime message is dropped rather than queued behind this many unsent bytes.
REALTIME_MAX_BACKLOG: int = 64 * 1024

# Peer._answering: the application took a message and has queued none since (_TOOK);
# it queued one between its last two takes (_ANSWERS): it answers what it takes (an
# echo, a stop-and-wait client reading replies), and the ACK of what it takes waits
# for the answer, to ride on it (one write, one segment, where an ACK alone made two).
_TOOK = 1
_ANSWERS = 2


class Peer(EndpointStatus):
    """One session as the application sees it.

    Sending: :meth:`send` (returns once the peer's application has the message),
    :meth:`send_nowait` (returns the acknowledgement future), :meth:`request`,
    :meth:`send_realtime`. Receiving: :meth:`recv`, :meth:`recv_message`,
    ``async for``. Typed messages with a handler never reach the inbox.
    """

    # State the hot path never reads starts as these class defaults, set on the
    # instance only once used: CPython shares a class's instance attribute names
    # only up to a limit (30 keys), and near it every attribute lookup of the hot
    # path costs more (a Client with 30 attributes spent 2% more instructions per
    # message than one with 28). Not for what the hot path reads: an attribute
    # found on the class is a slower lookup than one on the instance.
    #: waits with a timeout, made on first use
    _deadlines: _Deadlines | None = None
    #: hook and handler tasks, kept from the garbage collector (an empty set is 216 B)
    _tasks: set[asyncio.Task[Any]] | None = None
    #: True: when the session ends here, leave it in the store (to be resumed later)
    keep_stored = False

    def __init__(
        self,
        session: Session,
        plugins: PluginManager,
        *,
        accept_plain: bool = True,
        identity: Any = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.session = session
        self.plugins = plugins
        self.endpoint = Endpoint(session, plugins, self, self, accept_plain=accept_plain, identity=identity)
        self.conn: Connection | None = None
        self._inbox_waiter: asyncio.Future[Message | None] | None = None
        # (None while nobody waits: most sessions never do, and a list is 72 B)
        self._space_waiters: list[asyncio.Future[None]] | None = None
        self._open_waiters: list[asyncio.Future[None]] | None = None
        self._flush_pending = False  # a _flush is scheduled with call_soon
        self._wrote_now = False  # a message went out at once since the last _flush
        self._unflushed = 0
        self._answering = 0  # _TOOK | _ANSWERS: whether the application answers what it takes
        self._ack_timer: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[KoriNetError] = self.loop.create_future()
        #: the durable store of this session (None: it lives in memory only)
        self._stored: StoredSession | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.session.session_id} {self.session.state.name}>"

    # ------------------------------------------------------------------ status
    # (session_id, identity, rtt, links_opened, is_closed, queued: EndpointStatus)

    @property
    def is_connected(self) -> bool:
        return self.conn is not None and self.session.state is OPEN

    @property
    def next_corr(self) -> int:
        """The next request's correlation id (a store keeps it across a restart)."""
        return self.endpoint.next_corr

    @property
    def last_seq(self) -> int:
        """The seq of the last reliable message accepted for sending in this session:
        after a restart from a store, where the application left off."""
        return self.session.last_seq

    @property
    def store(self) -> SessionStore | None:
        """The durable store keeping this session, if any."""
        return self._stored.store if self._stored is not None else None

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a link is open (raises if the session ends first)."""
        if self.is_connected:
            return
        self._raise_if_closed()
        waiter = self.loop.create_future()
        if self._open_waiters is None:
            self._open_waiters = []
        self._open_waiters.append(waiter)
        await self._wait(waiter, timeout, "waiting for the connection")
        self._raise_if_closed()  # woken because the session ended, not because it opened

    # ------------------------------------------------------------------ sending

    async def send(self, obj: Any, type: str = "", *, timeout: float | None = None) -> None:
        """Send a message and wait until the peer's application has it.

        Messages of a realtime type are sent best-effort instead (see
        :meth:`send_realtime`). Waits for window space first (backpressure).

        Raises:
            KoriNetTimeout: ``timeout`` passed; the message stays queued and will be
                delivered exactly once if the session lives.
            MessageRejected: the peer refused it (unknown type, invalid...).
            SessionExpired: the peer lost the session before acknowledging it.
            ConnectionClosed: the session ended.
        """
        mtype = self.message_types.get(type) if type else None
        if mtype is not None and mtype.delivery is REALTIME:
            self.send_realtime(obj, type)
            return
        fut = None
        if self.session.codec is not None and not self.closed.done():
            try:  # the common case, without _enqueue's coroutine
                fut = self._queue(obj, type, 0, 0)
            except SendBufferFull:
                pass
        if fut is None:
            fut = await self._enqueue(obj, type, 0, 0, timeout)
            assert fut is not None  # (None only for a request)
        if timeout is None:
            await fut
        else:
            await self._wait(fut, timeout, "waiting for the acknowledgement (the message stays queued)")

    def send_nowait(self, obj: Any, type: str = "") -> asyncio.Future[None]:
        """Queue a message now and return a future resolved by its acknowledgement.

        Raises:
            SendBufferFull: the window is full; await :meth:`send` to wait instead.
        """
        if self.closed.done():
            raise self.closed.result()
        return self._queue(obj, type, 0, 0)

    def post(self, obj: Any, type: str = "") -> int:
        """Queue a reliable message without a future and return its sequence number;
        :meth:`wait_acked` tells when it (and everything before it) is delivered.
        The cheapest way to stream many messages.

        Raises:
            SendBufferFull: the window is full; ``await wait_acked(seq)`` on an
                earlier message first.
        """
        if self.closed.done():
            raise self.closed.result()
        return self._posted(self.session.send_message(obj, type))

    def post_prepared(self, message: PreparedMessage) -> int:
        """:meth:`post` of a message framed once for many sessions (the fan-out's
        path: korinet.runtime.fanout); same checks, same side effects."""
        if self.closed.done():
            raise self.closed.result()
        return self._posted(self.session.send_prepared(message))

    def _posted(self, seq: int) -> int:
        # what every post does once the session took the message
        if self._stored is not None:
            self._accepted()
        self.endpoint.sent(seq)
        self._after_queue()
        return seq

    async def wait_acked(self, seq: int, timeout: float | None = None) -> None:
        """Wait until the peer's application has every message up to ``seq``."""
        if seq <= self.session.acked:
            return
        self._raise_if_closed()
        fut: asyncio.Future[None] = self.loop.create_future()
        self.endpoint.wait_acked(seq, fut)
        await self._wait(fut, timeout, "waiting for the acknowledgement (the message stays queued)")

    def send_realtime(self, obj: Any, type: str = "") -> bool:
        """Send a realtime message now, or drop it: no link, or the link already has
        more than REALTIME_MAX_BACKLOG bytes waiting (a stale frame is worse than none).
        Returns whether it was sent."""
        conn = self.realtime_link()
        if conn is None or not self.session.send_realtime(obj, type):
            return False
        return self.realtime_write(conn)

    def realtime_link(self) -> Connection | None:
        """The link a realtime message may go on now, or None (counted as dropped)."""
        conn = self.conn
        if conn is None or conn.write_backlog > REALTIME_MAX_BACKLOG:
            self.session.stats.realtime_dropped += 1
            return None
        return conn

    def realtime_write(self, conn: Connection) -> bool:
        """Write the realtime frame the session just queued (and anything before it)."""
        if self._stored is not None and not self._commit_before_write():
            return False
        conn.write(self.session.data_to_send())
        return True

    async def request(self, obj: Any, type: str = "", *, timeout: float | None = None) -> Any:
        """Send a request and return the reply's payload.

        Raises:
            KoriNetTimeout: no reply within ``timeout``.
            MessageRejected: the peer rejected the request or its handler failed.
        """
        reply: asyncio.Future[Any] = self.loop.create_future()
        corr = self.endpoint.new_request(reply)
        try:
            queued = False
            if self.session.codec is not None and not self.closed.done():
                try:  # the common case, without _enqueue's coroutine (as send())
                    self._queue_request(obj, type, corr)
                    queued = True
                except SendBufferFull:
                    pass
            if not queued:
                await self._enqueue(obj, type, _REQUEST, corr, timeout)
            return await self._wait(reply, timeout, "waiting for the reply")
        finally:
            self.endpoint.requests.pop(corr, None)

    async def reply(self, request: Message, obj: Any) -> None:
        """Answer a request taken from the inbox."""
        if not request.corr:
            raise ValueError("this message is not a request")
        fut = await self._enqueue(obj, request.type, _REPLY, request.corr, None)
        assert fut is not None  # (None only for a request)
        await fut

    async def _enqueue(
        self, obj: Any, type: str, flags: int, corr: int, timeout: float | None
    ) -> asyncio.Future[None] | None:
        """Queue a message once the session can take it: its ack future, or None
        for a request (:meth:`_queue_request`)."""
        deadline = None if timeout is None else self.loop.time() + timeout
        while True:
            self._raise_if_closed()
            if self.session.codec is None:
                await self.wait_connected(None if deadline is None else deadline - self.loop.time())
                continue
            try:
                if flags & _REQUEST:
                    self._queue_request(obj, type, corr)
                    return None
                return self._queue(obj, type, flags, corr)
            except SendBufferFull:
                waiter = self.loop.create_future()
                if self._space_waiters is None:
                    self._space_waiters = []
                self._space_waiters.append(waiter)
                remaining = None if deadline is None else deadline - self.loop.time()
                await self._wait(waiter, remaining, "waiting for window space")

    def _queue(self, obj: Any, type: str, flags: int, corr: int) -> asyncio.Future[None]:
        seq = self.session.send_message(obj, type, flags=flags, corr=corr)
        if self._stored is not None:
            self._accepted()
        fut: asyncio.Future[None] = self.loop.create_future()
        self.endpoint.sent(seq, fut)
        self._after_queue()
        return fut

    def _queue_request(self, obj: Any, type: str, corr: int) -> None:
        # As _queue, without an ack future: nobody awaits a request's ack (its reply
        # says more, and carries the ack), and close() waits for it through the
        # request table.
        seq = self.session.send_message(obj, type, flags=_REQUEST, corr=corr)
        if self._stored is not None:
            self._accepted()
        endpoint = self.endpoint
        endpoint.sent(seq)
        endpoint.request_sent(corr, seq)
        self._after_queue()

    def _after_queue(self) -> None:
        # The first message after a quiet spell goes out at once (latency); the ones
        # queued behind it go out together at the end of the loop turn (throughput),
        # and a tight send loop writes every FLUSH_EVERY so the peer is never starved.
        # "Quiet spell": no message went out at once since the last _flush, which
        # runs whenever bytes arrive or a scheduled flush fires. So a stop-and-wait
        # sender (its ack came in between) schedules nothing.
        self._unflushed += 1
        if self._answering & _TOOK:
            self._answering = _ANSWERS
        if not self._wrote_now:
            self._flush()
            self._wrote_now = True
        elif not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)
        elif self._unflushed >= FLUSH_EVERY:
            self._flush()
            self._flush_pending = True  # the scheduled flush is still coming
            self._wrote_now = True

    async def _wait(self, fut: asyncio.Future[Any], timeout: float | None, what: str) -> Any:
        if timeout is None:
            return await fut
        # Every future waited on here is this call's own (an ack, a reply, a waiter):
        # failing it with KoriNetTimeout abandons the wait, not the message (the
        # session keeps it; whoever resolves these skips done futures).
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = _Deadlines(self.loop)
        waits = deadlines.waits
        deadlines.add(fut, timeout, what)
        try:
            return await fut
        finally:
            waits.pop(fut, None)

    # ------------------------------------------------------------------ receiving

    async def recv_message(self, timeout: float | None = None) -> Message:
        """Return the next message (plain or typed without handler). Only now is it
        acknowledged: the ack means the application has it. (A recv() already waiting
        takes a message in the loop turn that reads it, so the ack need not wait for
        this task to resume; cancelled before it resumes, the message goes back to the
        front of the inbox.) With a store, the
        delivery is committed (then acknowledged) at the end of this loop turn, with
        whatever the application wrote to ``store.db`` before its next ``await``.

        Raises:
            SessionExpired: once, when a new session replaced an expired one.
            ConnectionClosedOK / ConnectionClosedError: the session ended.
            KoriNetTimeout: nothing arrived within ``timeout``.
        """
        if self._answering & _TOOK:  # nothing queued since the last take: no answer to ride on
            self._answering = 0
        deadline = None if timeout is None else self.loop.time() + timeout
        endpoint = self.endpoint
        while not endpoint.inbox:  # (None when empty: read it afresh each time)
            notice = endpoint.take_notice()
            if notice is not None:
                raise notice
            if self.closed.done():  # (_raise_if_closed, inline: once per message)
                raise self.closed.result()
            waiter = self._inbox_waiter = self.loop.create_future()
            handed: Message | None
            try:
                if deadline is None:
                    handed = await waiter
                else:
                    handed = await self._wait(waiter, deadline - self.loop.time(), "waiting for a message")
            except BaseException:
                # Cancelled after inbox_readable handed us a message: it goes back to the
                # front of the inbox for the next recv(), not lost (it counts delivered).
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    handed = waiter.result()
                    if handed is not None:
                        endpoint.put_back(handed)
                raise
            finally:
                self._inbox_waiter = None
            if handed is not None:
                return handed
        return self._take()

    def _take(self) -> Message:
        # recv_message's end, once the inbox holds a message: take it, and see to its ACK
        msg = self.endpoint.take()
        if msg.seq:
            if self._stored is not None:
                # Durable at the end of this loop turn, before the ACK: what the application
                # writes to the store before its next await commits with the delivery.
                self._stored.touch()
                self._schedule_flush()
            elif self.endpoint.inbox:
                self._schedule_flush()  # more to take this turn: one ACK for all of them
            elif self._answering & _ANSWERS:
                # The ACK rides on the answer the application queues in this step
                # (_after_queue writes at once); at the latest it goes a loop turn later.
                self._schedule_flush()
            else:
                self._flush()  # the inbox is drained: acknowledge now, not a loop turn later
            self._answering |= _TOOK
        return msg

    async def recv(self, timeout: float | None = None) -> Any:
        """Return the payload of the next message (see :meth:`recv_message`)."""
        return (await self.recv_message(timeout)).data

    def recv_realtime_nowait(self) -> Message | None:
        """The oldest waiting realtime message, or None."""
        return self.endpoint.take_realtime()

    def __aiter__(self) -> Peer:
        return self

    async def __anext__(self) -> Any:
        """``async for data in peer``: every payload until the session closes normally."""
        if self.endpoint.inbox:  # a pipelined stream's usual case: no second coroutine
            if self._answering & _TOOK:  # (as recv_message begins)
                self._answering = 0
            return self._take().data
        try:
            return (await self.recv_message()).data
        except ConnectionClosedOK:
            raise StopAsyncIteration from None

    # ------------------------------------------------------------------ closing

    async def close(self, reason: str = "", *, timeout: float = 5.0) -> None:
        """End the session, after waiting (up to ``timeout``) for every sent message
        to be acknowledged, so that closing never loses what send_nowait queued."""
        if self.is_closed:
            return
        waits = [cast("asyncio.Future[None]", f) for _, f in self.endpoint.acks or ()]
        # requests in flight have no ack future (_queue_request): wait for the last one's ack
        last_request = max((seq for _, seq in self.endpoint.requests.values()), default=0)
        if last_request > self.session.acked:
            request_acked: asyncio.Future[None] = self.loop.create_future()
            self.endpoint.wait_acked(last_request, request_acked)
            waits.append(request_acked)
        if waits and self.is_connected:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*waits, return_exceptions=True)
            except TimeoutError:
                logger.warning("%r: closing with %d message(s) unacknowledged", self, self.session.unacked)
        self.session.close(CloseCode.NORMAL, reason)
        conn = self.conn
        if conn is not None and (self._stored is None or self._commit_before_write()):
            conn.write(self.session.data_to_send())
            # Wait for the peer's echo and its close (§7): dropping the connection at
            # once could reset it before our last ACK arrives, over a lossy link.
            conn.peer = None
            self.conn = None
            if conn.transport is not None and conn.transport.can_write_eof():
                try:
                    conn.transport.write_eof()
                except OSError:  # the peer reset the link before the loop saw it: closed anyway
                    pass
            try:
                async with asyncio.timeout(min(timeout, CLOSE_ECHO_TIMEOUT)):
                    await asyncio.shield(conn.lost)
            except TimeoutError:
                pass
            conn.close()
        self.finish(ConnectionClosedOK(CloseCode.NORMAL, reason or "closed by this side"))

    def _raise_if_closed(self) -> None:
        if self.closed.done():
            raise self.closed.result()

    # ------------------------------------------------------------------ link plumbing
    # (called by the Connection and the Hub)

    def attach(self, conn: Connection) -> None:
        """Carry the session over ``conn`` from now on (dropping any older link)."""
        old = self.conn
        if old is not None and old is not conn:
            old.peer = None
            self.session.connection_lost(self.loop.time())
            old.abort()
        self.conn = conn
        conn.peer = self
        if conn.lost.done():
            # Reset between the connect and now (a server dying as its kernel accepted
            # us): nobody heard it, and a lost connection schedules no timer, so the
            # link would wait forever. Report it once the caller has started the link.
            self.loop.call_soon(self.link_lost, conn, conn.lost.result())

    def link_data(self, conn: Connection, data: bytes) -> None:
        """Bytes arrived on ``conn``."""
        if conn is not self.conn:
            return
        self.session.receive_data(data, self.loop.time())
        self.process()

    def link_lost(self, conn: Connection, exc: BaseException | None) -> None:
        """``conn`` is gone (``exc``: why, None for EOF)."""
        if conn is not self.conn:
            return
        conn.peer = None
        self.conn = None
        self.session.connection_lost(self.loop.time())
        endpoint = self.endpoint
        error = exc or endpoint.link_failure or ConnectionClosedError(CloseCode.LINK_LOST, "connection lost")
        endpoint.link_failure = None
        if not self.is_closed:
            logger.info("%r: link lost (%s)", self, error)
            self.call_hook(self.plugins.session_lost, self, error)
        self._on_link_lost(error)

    def _on_link_lost(self, error: BaseException) -> None:
        """Hook for subclasses (the client reconnects, the server starts a TTL)."""

    def _on_timer(self) -> None:
        if self.conn is not None:
            self.conn._timer = None  # fired: _process schedules the next one
        self.session.tick(self.loop.time())
        self.process()

    def _schedule_timer(self) -> None:
        if self.conn is not None:
            self.conn.schedule(self.session.next_deadline(), self._on_timer)

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        self._wrote_now = False
        self._unflushed = 0
        session = self.session
        if self._stored is not None and not self._commit_before_write():
            return
        data = session.data_to_send()
        if session.ack_pending and self._ack_timer is None:
            self._ack_timer = self.loop.call_later(LAZY_ACK_DELAY, self._lazy_ack_due)
        conn = self.conn
        if conn is not None:
            if data:
                conn.write(data)
            if session.close_expected():
                conn.abort() if session.state is not CLOSED else conn.close()

    def _lazy_ack_due(self) -> None:
        self._ack_timer = None
        self._ack_if_owed()

    def process(self) -> None:
        """Act on the session's events, then write what it has to send."""
        session = self.session
        events = session.events_received()
        reschedule = self.endpoint.process(events) if events else False
        if session.has_output or self._stored is not None:
            self._flush()  # (drops the link, and so its timer, when the session says so)
        else:  # nothing to write, no ACK owed (a lone ACK, a message for the inbox): as _flush would
            self._flush_pending = False
            self._wrote_now = False
            self._unflushed = 0
        conn = self.conn
        if conn is not None and (reschedule or conn._timer is None):
            self._schedule_timer()

    def finish(self, error: KoriNetError) -> None:
        """End the session with ``error`` (fails every waiter)."""
        self.endpoint.finish(error)

    # ------------------------------------------------------------------ the Endpoint's driver

    def inbox_readable(self) -> None:
        waiter = self._inbox_waiter
        if waiter is None or waiter.done():
            return
        if self.endpoint.inbox and self._stored is None:
            self._hand_over(waiter)
        else:
            waiter.set_result(None)  # the end, a notice, or (stored) a message the reader takes itself

    def _hand_over(self, waiter: asyncio.Future[Message | None]) -> None:
        # A recv() is waiting, so the application takes this message now, in the loop
        # turn that read it: its ACK leaves with that turn's flush (the driver flushes
        # after Endpoint.process), not a turn later when the reader's task resumes.
        # With a store the reader takes it itself: the delivery commits with what the
        # application writes before its next await.
        answers = self._answering & _ANSWERS
        # an application that answers what it takes: the ACK waits for the answer
        msg = self.endpoint.take(lazy=bool(answers))
        waiter.set_result(msg)  # (schedules the reader's step)
        if msg.seq:
            if answers:
                self.loop.call_soon(self._ack_if_owed)  # after the reader's step, and its answer
            self._answering |= _TOOK

    def _ack_if_owed(self) -> None:
        if self.session.ack_pending:  # no frame came for it to ride on
            self.session.flush_ack()
            self._flush()

    def space_available(self) -> None:
        if self._space_waiters:
            waiters, self._space_waiters = self._space_waiters, None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def flush_soon(self) -> None:
        self._schedule_flush()

    def link_opened(self, ev: LinkOpened) -> None:
        waiters, self._open_waiters = self._open_waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def ended(self, error: KoriNetError) -> None:
        self.closed.set_result(error)
        for waiter in self._open_waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        if self.conn is not None:
            self._flush()
            if self.conn is not None:  # (unless the store failed and dropped it)
                self.conn.close()
        stored, self._stored = self._stored, None
        if stored is not None:
            stored.detach() if self.keep_stored else stored.forget()
        self._on_closed(error)

    def call_hook(self, hook: Callable[..., list[Any]], *args: Any) -> None:
        for guarded in hook(*args):
            self._keep(self.loop.create_task(guarded.run()))

    def call_handler(self, handler: Callable[..., Any], msg: Message) -> Any:
        return handler(self, msg)

    def run_awaitable(
        self, awaitable: Awaitable[Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        self._keep(self.loop.create_task(_await(awaitable, done)))

    def _keep(self, task: asyncio.Task[Any]) -> None:
        tasks = self._tasks
        if tasks is None:
            tasks = self._tasks = set()
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _on_closed(self, error: KoriNetError) -> None:
        """Hook for subclasses (the server forgets the session)."""

    # ------------------------------------------------------------------ durable store

    def _use_store(self, store: SessionStore, key: str | None, record: StoredRecord | None = None) -> None:
        """Keep this session in ``store`` under ``key`` (None: its session id), after
        restoring it from ``record`` if given (docs/ARCHITECTURE.md, "Durable sessions")."""
        if record is not None:
            self.session.restore(record.snapshot)
            # Replies to requests sent before the crash may still come: new requests
            # must not reuse their correlation ids.
            self.endpoint.next_corr = max(self.endpoint.next_corr, record.corr)
        self._stored = store.attach(self, key, record)
        self.endpoint.on_delivered = self._touch_store

    def _touch_store(self) -> None:
        if self._stored is not None:
            self._stored.touch()

    def _commit(self) -> None:
        """Make this session's state durable now.

        Raises:
            StoreError: the store failed; the session has ended (see :meth:`_store_failed`).
        """
        stored = self._stored
        if stored is None:
            return
        stored.touch()
        try:
            stored.store.commit()
        except StoreError as exc:
            self._store_failed(exc)
            raise

    def _accepted(self) -> None:
        """A message was accepted for sending: durable before the call returns, unless
        the application asked for a batch (SessionStore.batch)."""
        stored = self._stored
        assert stored is not None
        if stored.store.batching:
            stored.touch()
        else:
            self._commit()

    def _commit_before_write(self) -> bool:
        """Commit before bytes leave (an ACK must never announce what the store does
        not hold); False when the store failed and nothing may be written."""
        try:
            self._commit()
        except StoreError:
            return False
        return True

    def _store_failed(self, error: KoriNetError) -> None:
        """The store cannot be written: drop the link at once, writing nothing that
        it does not hold, and end the session. The file keeps the last committed
        state, from which a new process can resume."""
        logger.error("%r: %s; ending the session", self, error)
        stored, self._stored = self._stored, None
        if stored is not None:
            stored.detach()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.peer = None
            conn.abort()
            self.session.connection_lost(self.loop.time())
        self.finish(error)


class _Deadlines:
    """The waits of one Peer that have a timeout, served by one timer armed for the
    earliest deadline: a stop-and-wait loop with a timeout arms a timer once per
    timeout period, not once per message as asyncio.timeout() does (a TimerHandle,
    a heap push, a Timeout object, a cancel)."""

    __slots__ = ("at", "loop", "timer", "waits")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: future -> (deadline, timeout, what it waits for)
        self.waits: dict[asyncio.Future[Any], tuple[float, float, str]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.at = 0.0  # when the timer fires

    def add(self, fut: asyncio.Future[Any], timeout: float, what: str) -> None:
        when = self.loop.time() + timeout
        self.waits[fut] = (when, timeout, what)
        if self.timer is None or when < self.at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.at = when
        self.timer = self.loop.call_at(when, self._due)

    def _due(self) -> None:
        self.timer = None
        now = self.loop.time()
        earliest = None
        waits = self.waits
        for fut, (when, timeout, what) in list(waits.items()):
            if when <= now:
                del waits[fut]
                if not fut.done():
                    fut.set_exception(KoriNetTimeout(f"timed out after {timeout:.3g}s {what}"))
                    fut.exception()  # the waiter raises it; no "never retrieved" if it was cancelled too
            elif earliest is None or when < earliest:
                earliest = when
        if earliest is not None:
            self._arm(earliest)


async def _await(awaitable: Awaitable[Any], done: Done) -> None:
    try:
        result = await awaitable
    except Exception as exc:
        done(None, exc)
    else:
        done(result, None)
