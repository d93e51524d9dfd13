"""The blocking driver: one Endpoint over a blocking socket, driven in the caller's thread.

The asyncio runtime costs a blocking caller two thread hand-offs per call. The
blocking client (:class:`~korinet.sync.SyncClient`) and the blocking server session
(:class:`~korinet.sync.server.SyncServerSession`) instead, like ``websockets.sync``,
do the socket I/O themselves, in whichever thread needs it: ``send()`` writes its
frame, then reads until the ACK covering it arrives; ``recv()`` reads until a
message is in the inbox. No event loop is on that path. Both are a
:class:`SyncDriver`; what differs is only what happens without a link (the client
dials again, the server session waits for its client to come back, until its TTL).

Threads and locks
-----------------

``_mutex`` protects everything: the Session, the inbox, the waiters' records,
the link fields. It is never held across a blocking call. Every write happens
under it, without blocking (``MSG_DONTWAIT``, or a non-blocking TLS socket), so
writes are serialized in the order the Session produced them; bytes the kernel
refuses wait in ``_outbuf`` for the leader to flush.

Reading is a *role*, not a lock: at most one thread, the **leader** (``_leader``
holds its thread id), reads the socket, ticks the Session's timers, changes the
link (drop, reconnect, handshake) and closes sockets. A thread that must wait for
something (an ACK, a message, a reply, window space, the first link) calls
:meth:`SyncDriver._wait`: if nobody leads it becomes the leader and reads until
its own condition holds, then resigns; otherwise it is a **follower** and sleeps
on the condition variable ``_cv``, which the leader notifies after each read. A
follower whose condition is met returns without ever reading; when the leader
resigns, a follower takes over. So a thread blocked in ``recv()`` never keeps
another thread's ``send()`` from going out, and no two threads read at once.

The leader releases ``_mutex`` while it waits for the socket. An application
thread on a plain TCP socket waits inside a blocking ``recv_into()`` bounded by
``SO_RCVTIMEO`` (at most BLOCKING_SLICE, less when a timer or the caller's
deadline is nearer): one system call per read, the fast path of a stop-and-wait
``send()`` and of the ``recv()`` that answers it (written out in
:meth:`SyncDriver._read_blocking`). The background
thread, and every thread on TLS (whose decrypted bytes ``poll()`` cannot see),
waits in ``poll()`` on the socket and on a wake-up socketpair instead. A thread
that needs that leader to re-plan (the kernel refused bytes so the leader must
watch for POLLOUT, the session is closing) writes one byte to the pair, only
while the leader is in ``poll()`` (``_poll_thread``, set and cleared under
``_mutex``, so no wake-up is lost); a leader blocked in ``recv_into()`` notices
within BLOCKING_SLICE at the latest.

A background daemon thread keeps an idle session alive. It sleeps (a timed
``Event.wait``) until no application call has run for ``idle_handover``
seconds (at most IDLE_HANDOVER, and a tenth of the heartbeat interval); only
then, and only when no thread leads or waits, does it become the leader: it
answers PINGs, sends its own, takes messages into the inbox (running handlers),
detects a dead link and reconnects. As soon as an application thread needs to
read, it takes the role: at once if the background leader is parked in
``poll()`` (that leader re-checks the role under ``_mutex`` before it touches
anything, and is sent a wake-up byte so that it leaves), else by asking it to
hand over (``_takeover`` plus a wake-up byte) and following until it has. The
background thread thus adds nothing to a busy application's calls: in a tight
send loop it wakes once per ``idle_handover``, sees that the application is
busy, and sleeps again.

On EOF, a socket error, a heartbeat timeout or CLOSE 1009, the leader drops the
link and asks the subclass what next (:meth:`SyncDriver._link_step`, run by
whichever thread leads while there is no link): the client reconnects
(``sync/client.py``), the server session waits for its client to resume it on a
new ``server(conn)``, and expires after its TTL (``sync/server.py``). Waits
without a link are spent in ``poll()`` on the wake-up pair, so a hand-over,
a resume or ``close()`` interrupts them.

A handler (of a typed message) runs in the reading thread, holding the leader
role but not ``_mutex``; a request is answered by its return value. A blocking
call on the same client from a handler would wait for itself: it raises
InvalidState instead. Coroutine handlers need the asyncio runtime: here they
answer with an error. Plugin hooks run after the read that caused them, in the
same thread, without the mutex; awaitables they return go to KoriNet's shared
asyncio loop thread, which is started only if some plugin returns one.
"""

from __future__ import annotations

import inspect
import logging
import select
import socket
import ssl as ssl_module
import struct
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from .._loopthread import get_loop
from ..endpoint import Done, Endpoint, EndpointStatus
from ..exceptions import (
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidState,
    KoriNetError,
    KoriNetTimeout,
    SendBufferFull,
)
from ..messages import REALTIME, Message
from ..plugins import PluginManager
from ..security.tlsbio import RECORD, TLS, TLSEngine
from ..session import CLOSED, OPEN, CloseCode, LinkOpened, MessageReceived, MessagesAcked, Session
from ..wire.frames import MessageFlags

__all__ = ["BLOCKING_SLICE", "CLOSE_TIMEOUT", "SyncDriver", "await_in_background", "tls_handshake"]

logger = logging.getLogger(__name__)

_REQUEST = int(MessageFlags.REQUEST)
_REPLY = int(MessageFlags.REPLY)

#: Longest a lazy acknowledgement (of a request or reply) waits for a frame to ride on.
LAZY_ACK_DELAY = 0.02
#: A realtime message is dropped rather than queued behind this many unsent bytes.
REALTIME_MAX_BACKLOG = 64 * 1024
#: The background thread takes over reading once the application has been idle this long.
IDLE_HANDOVER = 0.05
#: Longest the background thread reads in one go before it lets go of its client (so
#: that a client the application dropped without close() can be collected).
BACKGROUND_STEP = 1.0
#: Bytes asked of the kernel per read, into a buffer allocated once: a fresh 256 KiB
#: ``recv()`` buffer per read costs more than the rest of a round trip's client work.
READ_SIZE = 64 * 1024
#: Longest an application thread stays in one blocking recv() (SO_RCVTIMEO): it then
#: re-checks timers and flushes bytes other threads could not write at once.
BLOCKING_SLICE = 0.05
#: What close() waits for unacknowledged messages, at most.
CLOSE_TIMEOUT = 5.0
#: Longest close() waits for the server to answer our CLOSE and drop the connection (§7).
CLOSE_ECHO_TIMEOUT = 2.0

_POLLIN = select.POLLIN if hasattr(select, "POLLIN") else 1
_POLLOUT = select.POLLOUT if hasattr(select, "POLLOUT") else 4
_POLLERR = select.POLLERR if hasattr(select, "POLLERR") else 8
_POLLHUP = select.POLLHUP if hasattr(select, "POLLHUP") else 16
_READABLE = _POLLIN | _POLLERR | _POLLHUP
#: Exceptions of a non-blocking socket that mean "not now", not "broken".
_NOT_NOW = (BlockingIOError, InterruptedError)
#: Per-call non-blocking I/O on a blocking socket (Linux, BSD, macOS); 0 elsewhere.
_MSG_DONTWAIT: int = getattr(socket, "MSG_DONTWAIT", 0)
_TIMEVAL = struct.Struct("@ll")


class _SelectPoller:
    """``select.poll``'s interface on ``select.select``, for platforms without poll."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def register(self, fd: int, mask: int) -> None:
        self._fds[fd] = mask

    def modify(self, fd: int, mask: int) -> None:
        self._fds[fd] = mask

    def unregister(self, fd: int) -> None:
        self._fds.pop(fd, None)

    def poll(self, timeout_ms: float | None = None) -> list[tuple[int, int]]:
        rlist = [fd for fd, m in self._fds.items() if m & _POLLIN]
        wlist = [fd for fd, m in self._fds.items() if m & _POLLOUT]
        r, w, x = select.select(rlist, wlist, rlist, None if timeout_ms is None else timeout_ms / 1000)
        ready: dict[int, int] = {}
        for fd in r:
            ready[fd] = ready.get(fd, 0) | _POLLIN
        for fd in w:
            ready[fd] = ready.get(fd, 0) | _POLLOUT
        for fd in x:
            ready[fd] = ready.get(fd, 0) | _POLLERR
        return list(ready.items())


def _new_poller() -> Any:
    return select.poll() if hasattr(select, "poll") else _SelectPoller()


class _Box:
    """What a blocking call waits for (an acknowledgement, a reply): the Endpoint's
    Waiter without a loop. Only touched under the client's mutex; the waiting
    thread watches it in its wait condition (the hot path reads ``finished``
    rather than calling ``done()``)."""

    __slots__ = ("error", "finished", "result")

    def __init__(self) -> None:
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.finished

    def set_result(self, result: Any, /) -> None:
        self.result = result
        self.finished = True

    def set_exception(self, exception: BaseException, /) -> None:
        self.error = exception
        self.finished = True

    def exception(self) -> BaseException | None:
        return self.error

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class SyncDriver(EndpointStatus):
    """One session driven over a blocking socket (see the module docstring).

    A subclass sets ``session``, ``plugins``, ``endpoint`` (driven by ``self``) and
    ``timeout`` (what each ``send()`` waits for its acknowledgement, None: forever),
    calls :meth:`_init_driver`, and says what happens without a link
    (:meth:`_link_step`) and after one is lost (:meth:`_on_link_lost`).
    """

    session: Session
    plugins: PluginManager
    endpoint: Endpoint
    timeout: float | None

    def _init_driver(self) -> None:
        heartbeat = self.session.config.heartbeat_interval
        #: idle time after which the background thread reads (see the module docstring)
        self.idle_handover = min(IDLE_HANDOVER, heartbeat / 10)
        self._mutex = threading.Lock()
        self._cv = threading.Condition(self._mutex)
        self._leader: int | None = None  # thread id of the reader, or None
        self._bg_ident: int | None = None  # the background thread's id
        self._followers = 0  # threads sleeping on _cv
        self._takeover = False  # an application thread wants the background leader to resign
        self._poll_thread: int | None = None  # the thread in poll() without the mutex
        self._wake_sent = False  # a wake-up byte is in the pair, not yet drained
        self._last_active = time.monotonic()
        self._stopping = threading.Event()
        self._bg_thread: threading.Thread | None = None

        # the link
        self._sock: socket.socket | None = None
        self._sock_fd = -1
        # One poll object per link for application threads, one for the background
        # thread: a relieved background leader may still be inside its poll() (see
        # _claim) when an application thread polls, and a poll object refuses that.
        self._pollers: list[Any] = []  # [application's, background's]
        self._poll_masks = [0, 0]
        self._outbuf = bytearray()
        # With MSG_DONTWAIT: a blocking socket, written without blocking, read in blocking
        # recv() by application threads; else (elsewhere) a non-blocking socket + poll()
        self._plain = _MSG_DONTWAIT != 0
        self._send_flags = self._recv_flags = _MSG_DONTWAIT
        #: the TLS state of the link (None: plaintext); its bytes go through the socket
        self._tls_engine: TLSEngine | None = None
        self._rcvtimeo = 0.0  # the socket's SO_RCVTIMEO, in seconds (0: none set)
        self._rbuf = bytearray(READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._broken: BaseException | None = None  # a write failed; the leader drops the link
        self._link_opened = False  # the current link completed its handshake
        #: counts links installed and dropped: a call made for one link can tell that
        #: its link is gone (see the ``link`` argument of send() and recv_message())
        self._link_no = 0
        self._ack_due: float | None = None
        self._tick_at: float | None = None  # when the session's timers are next due (cached)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

        self._closing = False  # close() drops the link itself, after the server's echo
        self._deferred: list[Callable[[], Any]] = []  # plugin hooks to call outside the mutex

    # ------------------------------------------------------------------ status

    @property
    def is_connected(self) -> bool:
        return self._sock is not None and self.session.state is OPEN

    # ------------------------------------------------------------------ sending

    def send(self, obj: Any, type: str = "", *, link: int | None = None) -> None:
        """Send a message; return once the peer's application has it.

        Messages of a realtime type are sent best-effort instead (see
        :meth:`send_realtime`). Waits for window space first (backpressure).

        Raises:
            KoriNetTimeout: no acknowledgement within ``timeout``; the message stays
                queued and is delivered exactly once when the link returns.
            MessageRejected: the peer refused it (unknown type, invalid...).
            SessionExpired: the server lost the session before acknowledging it.
            ConnectionClosedError: with ``link``, that link is gone (or was already):
                the message stays queued and is delivered when the session resumes.
            ConnectionClosed: the session ended.
        """
        if type:
            mtype = self.message_types.get(type)
            if mtype is not None and mtype.delivery is REALTIME:
                self.send_realtime(obj, type)
                return
        timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._mutex:
            # the common case written out: window space, nobody else reading
            if self._leader is not None:
                self._check_caller()
            if self.endpoint.ended is not None:
                raise self.endpoint.ended
            session = self.session
            try:
                seq = session.send_message(obj, type)
            except SendBufferFull:
                pending = self._enqueue(obj, type, 0, 0, deadline, link)
            else:
                out = session.data_to_send()
                if out:
                    self._write(out)  # first: the peer works on it while we do the bookkeeping
                else:
                    self._flush()
                pending = _Box()  # (no ACK is read before it is registered: we hold the mutex)
                self.endpoint.sent(seq, pending)
            if not pending.finished:
                if self._plain and self._claim():
                    self._read_blocking(pending.done, deadline)
                if not pending.finished:
                    self._wait(
                        pending.done,
                        deadline,
                        "waiting for the acknowledgement (the message stays queued)",
                        link,
                    )
        if pending.error is not None:
            raise pending.error

    def _read_blocking(self, done: Callable[[], object], deadline: float | None) -> None:
        """(mutex held, role claimed) The stop-and-wait fast path of :meth:`send` and
        :meth:`recv_message`: lead, and read in blocking recv() until ``done()``
        (an ACK for the message sent, a message in the inbox).

        It handles only the common case (an OPEN plain link, no timer due before the
        next SO_RCVTIMEO slice ends, nothing waiting to be written) and returns as soon
        as anything else comes up, for the general loop (:meth:`_wait`) to handle;
        what it does is the same as :meth:`_lead` does.
        """
        sock = self._sock
        session = self.session
        if sock is None or session.state is not OPEN or self._rcvtimeo != BLOCKING_SLICE:
            return  # (a claimed role is simply not taken: _wait claims it again)
        mutex = self._mutex
        monotonic = time.monotonic
        endpoint = self.endpoint
        rbuf, rview = self._rbuf, self._rview
        self._leader = threading.get_ident()
        self._takeover = False
        now = monotonic()  # then the time each read returned: timers are judged on it
        try:
            while not done():
                if self._outbuf or endpoint.ended is not None or self._broken is not None:
                    return
                wake_at = self._tick_at
                if deadline is not None and (wake_at is None or deadline < wake_at):
                    wake_at = deadline
                if wake_at is None or wake_at - now < BLOCKING_SLICE or self._ack_due is not None:
                    return
                mutex.release()
                try:
                    size = sock.recv_into(rbuf)
                except (BlockingIOError, InterruptedError):
                    size = -1  # SO_RCVTIMEO passed: the general loop sees to the timers
                except OSError as exc:
                    size = -1
                    if self._sock is sock:
                        self._broken = exc  # the general loop drops the link
                finally:
                    mutex.acquire()
                # (the link may have changed hands while the mutex was let go)
                if size <= 0 or self._sock is not sock:
                    if size == 0 and self._sock is sock:
                        self._link_lost(None)
                    return
                now = monotonic()
                if self._tls_engine is None:
                    session.receive_data(bytes(rview[:size]), now)
                else:
                    self._decrypt(rview[:size])
                self._after_input()
                if self._sock is not sock:  # the link was dropped
                    return
                if self._followers:
                    self._cv.notify_all()
        finally:
            self._resign()

    def send_realtime(self, obj: Any, type: str = "") -> bool:
        """Send a realtime message now, or drop it: no link, or more than
        REALTIME_MAX_BACKLOG bytes already wait to be written. Returns whether it was sent."""
        with self._mutex:
            if self._sock is None or len(self._outbuf) > REALTIME_MAX_BACKLOG:
                self.session.stats.realtime_dropped += 1
                return False
            if not self.session.send_realtime(obj, type):
                return False
            self._flush()
            return True

    def request(self, obj: Any, type: str = "", *, timeout: float | None = None) -> Any:
        """Send a request and return the reply's payload.

        Raises:
            KoriNetTimeout: no reply within ``timeout``.
            MessageRejected: the server rejected the request or its handler failed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        box = _Box()
        with self._mutex:
            corr = self.endpoint.new_request(box)
            try:
                self._enqueue(obj, type, _REQUEST, corr, deadline)
                if not box.done():
                    self._wait(box.done, deadline, "waiting for the reply")
            finally:
                self.endpoint.requests.pop(corr, None)
        return box.outcome()

    def reply(self, request: Message, obj: Any) -> None:
        """Answer a request taken from the inbox (returns once it is acknowledged)."""
        if not request.corr:
            raise ValueError("this message is not a request")
        timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._mutex:
            pending = self._enqueue(obj, request.type, _REPLY, request.corr, deadline)
            if not pending.done():
                self._wait(pending.done, deadline, "waiting for the acknowledgement")
        pending.outcome()

    def _enqueue(
        self, obj: Any, type: str, flags: int, corr: int, deadline: float | None, link: int | None = None
    ) -> _Box:
        """(mutex held) Queue a reliable message, waiting for window space, and write it."""
        self._check_caller()
        session = self.session
        while True:
            if self.endpoint.ended is not None:
                raise self.endpoint.ended
            try:
                seq = session.send_message(obj, type, flags=flags, corr=corr)
                break
            except SendBufferFull:
                self._wait_for_space(deadline, link)
        pending = _Box()
        self.endpoint.sent(seq, pending)
        if flags & _REQUEST:
            self.endpoint.request_sent(corr, seq)
        self._flush()
        return pending

    def _wait_for_space(self, deadline: float | None, link: int | None = None) -> None:
        """(mutex held) Wait until an acknowledgement (or an expiry) frees window space."""
        session = self.session
        acked, epoch = session.acked, session.epoch
        self._wait(
            lambda: session.acked != acked or session.epoch != epoch or self.endpoint.ended is not None,
            deadline,
            "waiting for window space",
            link,
        )

    # ------------------------------------------------------------------ receiving

    def recv_message(self, timeout: float | None = None, *, link: int | None = None) -> Message:
        """Return the next message (plain, or typed without a handler). Only now is it
        acknowledged: the ack means the application has it.

        Raises:
            SessionExpired: once, when a new session replaced an expired one.
            ConnectionClosedOK / ConnectionClosedError: the session ended.
            KoriNetTimeout: nothing arrived within ``timeout``.
        """
        self._check_caller()
        endpoint = self.endpoint
        with self._mutex:
            if link is not None and link != self._link_no:
                raise self._link_gone()
            if not endpoint.inbox:  # (None when empty: read it afresh each time)
                deadline = None if timeout is None else time.monotonic() + timeout
                fast = self._plain
                while not endpoint.inbox:
                    notice = endpoint.take_notice()
                    if notice is not None:
                        raise notice
                    if endpoint.ended is not None:
                        raise endpoint.ended
                    if fast and self._claim():
                        # once: then the general loop, whatever made it return. (No
                        # notice can arise in there: one comes with a new link's
                        # handshake, and the fast path returns when the link goes.)
                        fast = False
                        self._read_blocking(lambda: endpoint.inbox, deadline)
                        continue
                    self._wait(
                        lambda: bool(endpoint.inbox) or endpoint.has_notice or endpoint.ended is not None,
                        deadline,
                        "waiting for a message",
                        link,
                    )
            msg = endpoint.take()
            if msg.seq:
                self._flush()
            return msg

    def recv(self, timeout: float | None = None) -> Any:
        """Return the payload of the next message (see :meth:`recv_message`)."""
        return self.recv_message(timeout).data

    def recv_realtime_nowait(self) -> Message | None:
        """The oldest waiting realtime message, or None."""
        with self._mutex:
            return self.endpoint.take_realtime()

    def __iter__(self) -> Iterator[Any]:
        """``for data in client``: every payload until the session closes normally."""
        while True:
            try:
                yield self.recv_message().data
            except ConnectionClosedOK:
                return

    # ------------------------------------------------------------------ closing

    def close(self, reason: str = "", *, timeout: float = CLOSE_TIMEOUT) -> None:
        """End the session, after waiting (up to ``timeout``) for every sent message
        to be acknowledged, reconnecting if needed, so that closing does not lose
        what timed-out sends left queued. Then the orderly close of §7: our last ACK
        and CLOSE go out, and the connection is dropped once the server echoes the
        CLOSE and closes its side (or after CLOSE_ECHO_TIMEOUT)."""
        self._check_caller()
        with self._mutex:
            echo = 0.0
            if self.endpoint.ended is None:
                if self.session.unacked and self._may_deliver():
                    try:
                        self._wait(
                            lambda: (
                                not self.session.unacked
                                or self.endpoint.ended is not None
                                or not self._may_deliver()
                            ),
                            time.monotonic() + timeout,
                            "closing",
                        )
                    except KoriNetTimeout:
                        logger.warning(
                            "%r: closing with %d message(s) unacknowledged", self, self.session.unacked
                        )
                if self.endpoint.ended is None:
                    linked = self._sock is not None and self.session.state is OPEN
                    self.session.close(CloseCode.NORMAL, reason)
                    self._flush()  # our pending ACK, then the CLOSE
                    self._closing = True  # the leader leaves the socket to us
                    self.endpoint.finish(
                        ConnectionClosedOK(CloseCode.NORMAL, reason or "closed by this side")
                    )
                    if linked:
                        echo = min(timeout, CLOSE_ECHO_TIMEOUT)
                        if self._tls_engine is None and self._sock is not None and not self._outbuf:
                            try:  # nothing more from us: the server sees EOF after the CLOSE
                                self._sock.shutdown(socket.SHUT_WR)
                            except OSError:
                                pass
            self._shut_down(echo)
        self._run_deferred()
        self._join_background()

    def _may_deliver(self) -> bool:
        """(mutex held) Whether close() may wait for acknowledgements (the client
        reconnects for them; a server session without its client does not wait)."""
        return True

    def abort(self) -> None:
        """Stop at once, without a CLOSE: the peer keeps the session until its TTL."""
        self._abort()

    def _abort(self) -> None:
        with self._mutex:
            self.endpoint.finish(ConnectionClosedError(CloseCode.LINK_LOST, "aborted by this side"))
            self._shut_down(0.0)
        self._run_deferred()
        self._join_background()

    def _shut_down(self, echo: float) -> None:
        """(mutex held, session finished) Wait for the leader to resign, wait up to
        ``echo`` seconds for the server to close its side, then drop the link."""
        self._stopping.set()
        me = threading.get_ident()
        if self._leader is not None and self._leader != me:
            self._wake()  # a leader in poll(); one in recv() wakes within BLOCKING_SLICE
            deadline = time.monotonic() + CLOSE_TIMEOUT
            while self._leader is not None and (remaining := deadline - time.monotonic()) > 0:
                self._followers += 1
                try:
                    self._cv.wait(remaining)
                finally:
                    self._followers -= 1
        if self._leader is not None:
            return  # stuck in a handler: it drops the link when it returns
        if echo > 0 and self._sock is not None:
            self._leader = me
            try:
                self._await_eof(time.monotonic() + echo)
            finally:
                self._leader = None
        self._drop_socket()

    def _await_eof(self, deadline: float) -> None:
        """(mutex held, leader, session closed) Read and discard until the server
        closes the connection (its echo of our CLOSE came first), or the deadline."""
        sock = self._sock
        while sock is not None and self._sock is sock:
            now = time.monotonic()
            if now >= deadline or not self._wait_readable(now, deadline):
                return
            try:
                if not sock.recv_into(self._rbuf, 0, self._recv_flags):
                    return
            except _NOT_NOW:
                continue
            except OSError:
                return

    def _join_background(self) -> None:
        thread = self._bg_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_TIMEOUT)
        with self._mutex:
            if self._leader is None and self._wake_r.fileno() >= 0:
                self._wake_r.close()
                self._wake_w.close()

    def __enter__(self) -> SyncDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ waiting and reading

    def _check_caller(self) -> None:
        if self._leader == threading.get_ident():
            raise InvalidState(
                "a handler or plugin hook cannot make blocking calls on its own client "
                "(it would wait for itself); return the reply instead"
            )

    def _claim(self) -> bool:
        """(mutex held) Whether the caller may take the reader role now: nobody has it,
        or the background thread has it and is parked in poll(). Such a leader
        re-checks the role under the mutex before it touches anything, so taking the
        role from it is safe, and the caller does not wait for it to wake up."""
        leader = self._leader
        if leader is None:
            return True
        if leader == self._bg_ident and self._poll_thread == leader:
            self._wake()  # it leaves poll() now and finds itself relieved
            return True
        return False

    def _wait(
        self, cond: Callable[[], bool], deadline: float | None, what: str, link: int | None = None
    ) -> None:
        """(mutex held) Block until ``cond()``: lead (read) if nobody does, else follow.

        ``cond`` must become true when the session finishes. With ``link`` (a value of
        ``_link_no``), give up as soon as that link is gone.

        Raises:
            KoriNetTimeout: ``deadline`` passed first.
            ConnectionClosedError: ``link`` is gone (the session lives on).
        """
        if link is not None:
            wanted = cond

            def cond() -> bool:
                return wanted() or self._link_no != link

        while not cond():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise KoriNetTimeout(f"timed out {what}")
            if self._claim():
                self._leader = threading.get_ident()
                self._takeover = False
                try:
                    self._lead(cond, deadline)
                finally:
                    self._resign()
                continue
            leader = self._leader
            if leader == threading.get_ident():
                raise InvalidState("a handler cannot wait on its own client")
            if leader == self._bg_ident and not self._takeover:
                self._takeover = True
                self._wake()
            self._followers += 1
            try:
                self._cv.wait(None if deadline is None else deadline - now)
            finally:
                self._followers -= 1
        if link is not None and self._link_no != link and not wanted():
            raise self._link_gone()

    def _resign(self) -> None:
        """(mutex held, leader) Let go of the reader role: a follower may take it."""
        self._leader = None
        self._last_active = time.monotonic()
        if self._followers:
            self._cv.notify_all()
        if self._deferred:
            self._run_deferred_locked()

    def _link_gone(self) -> ConnectionClosedError:
        return ConnectionClosedError(
            CloseCode.LINK_LOST, "the connection dropped; the session waits for its peer to come back"
        )

    def _lead(self, cond: Callable[[], bool], deadline: float | None) -> None:
        """(mutex held, leader) Read, tick and reconnect until ``cond()``, the deadline,
        or the end of the session. Returns with the mutex held.

        The hot path (an OPEN link, one frame in) is written out inline: this loop
        runs once per message of a stop-and-wait sender. ``_tick_at`` caches the
        session's next deadline: receiving only moves that deadline later, so a
        stale value wakes us early, never late.
        """
        session = self.session
        mutex = self._mutex
        monotonic = time.monotonic
        rbuf, rview = self._rbuf, self._rview
        # An application thread on a plain socket waits inside recv() itself (one
        # system call, not poll() then recv()); the background thread, which must
        # hand over at once when asked, and TLS, whose buffered bytes poll() cannot
        # see, wait in poll() with the wake-up pair.
        me = self._leader
        may_block = me != self._bg_ident
        error: OSError | None = None
        while not cond():
            if self._leader != me:
                return  # (the background thread, relieved by an application thread)
            if self.endpoint.ended is not None:
                if not self._closing:
                    self._drop_socket()
                return
            now = monotonic()
            if deadline is not None and now >= deadline:
                return
            sock = self._sock
            if sock is None:
                self._link_step(now, deadline)
                continue
            if self._broken is not None:
                self._link_lost(self._broken)
                continue
            wake_at = self._tick_at
            if wake_at is not None and now >= wake_at:
                session.tick(now)
                self._tick_at = session.next_deadline()
                self._after_input()
                continue
            ack_due = self._ack_due
            if ack_due is not None:
                if now >= ack_due:
                    self._ack_due = None
                    if session.ack_pending:
                        session.flush_ack()
                        self._flush()
                    continue
                if wake_at is None or ack_due < wake_at:
                    wake_at = ack_due
            if deadline is not None and (wake_at is None or deadline < wake_at):
                wake_at = deadline
            # every wake_at above is later than now: the timeouts below are positive
            blocking = may_block and self._plain and not self._outbuf
            if blocking:
                wait = BLOCKING_SLICE if wake_at is None else min(wake_at - now, BLOCKING_SLICE)
                if wait < self._rcvtimeo or wait > 2 * self._rcvtimeo:
                    if wait < 0.002:  # below what SO_RCVTIMEO resolves: poll() instead
                        blocking = False
                    else:
                        self._set_rcvtimeo(sock, wait)
            if blocking:
                mutex.release()
                try:
                    size = sock.recv_into(rbuf)
                except (BlockingIOError, InterruptedError):
                    size = -1  # SO_RCVTIMEO passed: see to the timers
                except OSError as exc:
                    size = -2
                    error = exc
                finally:
                    mutex.acquire()
            else:
                if not self._wait_readable(now, wake_at):
                    continue
                try:
                    size = sock.recv_into(rbuf, 0, self._recv_flags)
                except _NOT_NOW:
                    size = -1
                except OSError as exc:
                    size = -2
                    error = exc
            if size > 0:
                if self._sock is not sock:  # close() took the link meanwhile
                    continue
                if self._tls_engine is None:
                    session.receive_data(bytes(rview[:size]), monotonic())
                else:
                    self._decrypt(rview[:size])
                self._after_input()
                if self._followers:
                    self._cv.notify_all()
            elif size == 0:
                if self._sock is sock:
                    self._link_lost(None)
            elif size == -2:
                if self._sock is sock:
                    self._link_lost(error)
                error = None

    def _wait_readable(self, now: float, wake_at: float | None) -> bool:
        """(mutex held, leader) poll() the socket and the wake-up pair until ``wake_at``,
        without the mutex; flush ``_outbuf`` if writable. Returns whether the socket
        is readable."""
        me = self._poll_thread = threading.get_ident()
        which = 1 if me == self._bg_ident else 0
        poller = self._update_poll_mask(which)
        self._mutex.release()
        try:
            ready = poller.poll(None if wake_at is None else max((wake_at - now) * 1000.0, 0.0))
        finally:
            self._mutex.acquire()
            if self._poll_thread == me:
                self._poll_thread = None
        if self._leader != me:
            if ready:
                self._drain_wake()
            return False  # relieved while parked here (see _claim): leave the socket alone
        sock_events = 0
        for fd, events in ready:
            if fd == self._sock_fd:
                sock_events = events
            else:
                self._drain_wake()
        if sock_events & _POLLOUT and self._outbuf:
            self._flush_outbuf()
        return bool(sock_events & _READABLE)

    def _set_rcvtimeo(self, sock: socket.socket, seconds: float) -> None:
        set_socket_timeout(sock, socket.SO_RCVTIMEO, seconds)
        self._rcvtimeo = seconds

    def _update_poll_mask(self, which: int) -> Any:
        """(mutex held, leader) Poll object ``which`` (0: application threads, 1: the
        background thread), watching for POLLOUT while bytes wait in ``_outbuf``."""
        poller = self._pollers[which]
        mask = _POLLIN | _POLLOUT if self._outbuf else _POLLIN
        if mask != self._poll_masks[which]:
            poller.modify(self._sock_fd, mask)
            self._poll_masks[which] = mask
        return poller

    def _decrypt(self, data: memoryview) -> None:
        """(mutex held, leader, TLS) Ciphertext read from the link: its plaintext to the
        session; a TLS error or the peer's close_notify breaks the link."""
        engine = self._tls_engine
        assert engine is not None
        now = time.monotonic()
        receive_data = self.session.receive_data

        def deliver(plain: memoryview) -> bool:
            receive_data(plain.tobytes(), now)
            return True

        try:
            if engine.receive(data, deliver):
                self._broken = ConnectionClosedError(CloseCode.LINK_LOST, "the peer closed the TLS link")
        except ssl_module.SSLError as exc:
            self._broken = exc  # (after its alert, below)
        out = engine.data_to_send()  # an alert, a KeyUpdate's answer
        if out:
            self._write_raw(out)

    def _after_input(self) -> None:
        """(mutex held, leader) Act on the session's events, write, drop the link if due."""
        events = self.session.events_received()
        if len(events) == 1:  # the stop-and-wait fast paths (flush_soon is a no-op here)
            ev = events[0]
            kind = type(ev)
            if kind is MessagesAcked:
                self.endpoint.acked(ev.seq)  # type: ignore[attr-defined]
            elif kind is MessageReceived:
                self.endpoint.dispatch(ev)  # type: ignore[arg-type]
            else:
                self.endpoint.process(events)
        elif events:
            self.endpoint.process(events)
        if self.session.has_output:  # (not after a lone ACK, nor a message for the inbox)
            self._flush()
            if self.session.close_expected():
                self._close_link()

    def _close_link(self) -> None:
        """(mutex held, leader) The session wants the link dropped (its data is written)."""
        if self._sock is None:
            return
        if self.session.state is CLOSED:
            self._drop_socket()
        else:
            error, self.endpoint.link_failure = self.endpoint.link_failure, None
            self._link_lost(error or ConnectionClosedError(CloseCode.LINK_LOST, "link failed"))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return
        self._wake_sent = False

    def _wake(self) -> None:
        """(mutex held) Get the leader out of poll() so that it re-plans."""
        if self._poll_thread is not None and not self._wake_sent:
            self._wake_sent = True
            try:
                self._wake_w.send(b"\x00")
            except OSError:
                self._wake_sent = False

    # ------------------------------------------------------------------ writing

    def _flush(self) -> None:
        """(mutex held) Write what the session has to send."""
        data = self.session.data_to_send()
        if data:
            self._write(data)
        if self._ack_due is None and self.session.ack_pending:
            self._ack_due = time.monotonic() + LAZY_ACK_DELAY

    def _write(self, data: bytes) -> None:
        if self._sock is None:
            return  # no link: the session replays what matters on the next one
        engine = self._tls_engine
        if engine is not None:
            try:
                data = engine.encrypt(data)
            except ssl_module.SSLError as exc:
                self._broken = exc
                self._wake()
                return
        self._write_raw(data)

    def _write_raw(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            return
        if self._outbuf:
            self._outbuf += data
            self._flush_outbuf()
            return
        try:
            sent = sock.send(data, self._send_flags)
        except _NOT_NOW:
            sent = 0
        except OSError as exc:
            self._broken = exc
            self._wake()
            return
        if sent < len(data):
            self._outbuf += data[sent:]
            self._wake()  # the leader must watch for POLLOUT

    def _flush_outbuf(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sent = sock.send(self._outbuf, self._send_flags)
        except _NOT_NOW:
            return
        except OSError as exc:
            self._broken = exc
            self._wake()
            return
        del self._outbuf[:sent]

    # ------------------------------------------------------------------ the link

    def _link_step(self, now: float, deadline: float | None) -> None:
        """(mutex held, leader, no link) Get a link (or wait for one) until ``deadline``
        at the latest; may end the session."""
        raise NotImplementedError

    def _on_link_lost(self, exc: BaseException | None, opened: bool) -> None:
        """(mutex held, leader) The link is gone (``exc``: why, None for EOF; ``opened``:
        it had completed its handshake) and the session lives on, unless it ended."""

    def _install_socket(self, sock: socket.socket, tls: TLSEngine | None = None) -> None:
        """(mutex held, leader, no link) Carry the session over ``sock`` (with ``tls``, its
        TLS state, handshake done: see :func:`tls_handshake`) from now on; the caller
        has started the session's side of the link (connection_made, accept...)."""
        # see _plain: blocking (each write says MSG_DONTWAIT), or non-blocking
        sock.setblocking(self._plain)
        self._sock = sock
        self._sock_fd = sock.fileno()
        self._link_no += 1
        self._tls_engine = tls
        self._outbuf.clear()
        self._broken = None
        self._link_opened = False
        self._rcvtimeo = 0.0
        self._pollers = []
        for _ in range(2):
            poller = _new_poller()
            poller.register(self._wake_r.fileno(), _POLLIN)
            poller.register(self._sock_fd, _POLLIN)
            self._pollers.append(poller)
        self._poll_masks = [_POLLIN, _POLLIN]
        self._tick_at = self.session.next_deadline()  # the handshake timeout, or heartbeats

    def _idle_poll(self, seconds: float) -> None:
        """(mutex held, leader) Wait up to ``seconds`` without a link, waking early for
        a hand-over or close()."""
        poller = _new_poller()
        poller.register(self._wake_r.fileno(), _POLLIN)
        me = self._poll_thread = threading.get_ident()
        self._mutex.release()
        try:
            ready = poller.poll(max(0.0, seconds * 1000.0))
        finally:
            self._mutex.acquire()
            if self._poll_thread == me:
                self._poll_thread = None
        if ready:
            self._drain_wake()

    def _link_lost(self, exc: BaseException | None) -> None:
        """(mutex held, leader) The link is gone: detach the session, tell the subclass."""
        opened = self._link_opened
        self._drop_socket()
        self.session.connection_lost(time.monotonic())
        if self.endpoint.ended is None:
            error = exc or ConnectionClosedError(CloseCode.LINK_LOST, "connection lost")
            logger.info("%r: link lost (%s)", self, error)
            self.call_hook(self.plugins.session_lost, self, error)
        self._on_link_lost(exc, opened)

    def _drop_socket(self) -> None:
        """(mutex held, leader or nobody leading) Close the current socket, if any."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self._sock_fd = -1
        self._link_no += 1
        if self._followers:
            self._cv.notify_all()  # a caller waiting for this link gives up
        self._pollers = []
        self._poll_masks = [0, 0]
        self._broken = None
        engine, self._tls_engine = self._tls_engine, None
        if engine is not None:
            self._outbuf += engine.close_notify()
        if self._outbuf:
            try:  # best effort: a CLOSE frame may be in there
                sock.send(self._outbuf, self._send_flags)
            except OSError:
                pass
            self._outbuf.clear()
        try:
            # unread bytes would turn the close into an RST, which may discard our CLOSE
            for _ in range(16):
                if not sock.recv_into(self._rbuf, 0, self._recv_flags):
                    break
        except (OSError, ValueError):
            pass
        sock.close()

    # ------------------------------------------------------------------ the Endpoint's driver
    # (called with the mutex held, by the leader or the thread that ends the session)

    def inbox_readable(self) -> None:
        """(the leader notifies followers after each read)"""

    def space_available(self) -> None:
        """(waiting for space watches the session's ack counter)"""

    def flush_soon(self) -> None:
        """(every step that runs a handler flushes after it)"""

    def link_opened(self, ev: LinkOpened) -> None:
        self._tick_at = self.session.next_deadline()  # heartbeats now
        self._link_opened = True

    def ended(self, error: KoriNetError) -> None:
        if self._followers:
            self._cv.notify_all()
        self._stopping.set()
        self._wake()

    def call_hook(self, hook: Callable[..., list[Any]], *args: Any) -> None:
        """Plugin hooks run after the current step, without the mutex."""
        self._deferred.append(lambda: await_in_background(hook(*args)))

    def call_handler(self, handler: Callable[..., Any], msg: Message) -> Any:
        """(mutex held, leader) A handler runs without the mutex, holding the role."""
        self._mutex.release()
        try:
            return handler(self, msg)
        finally:
            self._mutex.acquire()

    def run_awaitable(self, awaitable: Awaitable[Any], done: Done) -> None:
        if inspect.iscoroutine(awaitable):
            awaitable.close()
        done(None, InvalidState("coroutine handlers need the asyncio runtime (korinet.Client)"))

    # ------------------------------------------------------------------ plugin hooks

    def _run_deferred_locked(self) -> None:
        """(mutex held) Run deferred hooks without the mutex."""
        calls, self._deferred = self._deferred, []
        self._mutex.release()
        try:
            _run_calls(calls, self)
        finally:
            self._mutex.acquire()

    def _run_deferred(self) -> None:
        """(mutex not held) Run deferred hooks."""
        with self._mutex:
            calls, self._deferred = self._deferred, []
        _run_calls(calls, self)

    # ------------------------------------------------------------------ background

    def _start_background(self, name: str) -> None:
        """Start the thread that reads while the application is busy elsewhere."""
        thread = threading.Thread(target=_background, args=(weakref.ref(self),), name=name, daemon=True)
        self._bg_thread = thread
        thread.start()

    def _background_step(self) -> bool:
        """One step of the background thread; False when it should exit."""
        with self._mutex:
            if self.endpoint.ended is not None or self._stopping.is_set():
                return False
            now = time.monotonic()
            if self._ack_due is not None and now >= self._ack_due and self._leader is None:
                self._ack_due = None
                if self.session.ack_pending:
                    self.session.flush_ack()
                    self._flush()
            idle_for = now - self._last_active
            if (
                self._leader is None
                and not self._followers
                and not self._takeover
                and idle_for >= self.idle_handover
            ):
                self._leader = self._bg_ident
                try:
                    # bounded, so that the thread lets go of its client now and then
                    self._lead(
                        lambda: self._takeover or self._stopping.is_set() or self.endpoint.ended is not None,
                        now + BACKGROUND_STEP,
                    )
                except Exception:
                    logger.exception("%r: the background reader failed", self)
                finally:
                    relieved = self._leader != self._bg_ident  # an application thread took over
                    taken_over = relieved or self._takeover
                    if not relieved:
                        self._leader = None
                        if self._followers:
                            self._cv.notify_all()
                    self._takeover = False
                    if self._deferred:
                        self._run_deferred_locked()
                if not taken_over:
                    return True  # (the step's time was up) read on at once
                wait = self.idle_handover
            else:
                wait = self.idle_handover
                if self._leader is None:
                    wait = max(wait - idle_for, 0.001)
                if self._ack_due is not None:
                    wait = min(wait, max(self._ack_due - now, 0.001))
        self._stopping.wait(wait)
        return True


def set_socket_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """Set SO_RCVTIMEO or SO_SNDTIMEO: how long one blocking call on ``sock`` may wait
    (0: forever). A failing socket is left as it is: its next read or write says so."""
    whole = int(seconds)
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(whole, int((seconds - whole) * 1e6)))
    except OSError:
        pass


def tls_handshake(sock: socket.socket, tls: TLS, deadline: float) -> tuple[TLSEngine, bytes]:
    """Run the TLS handshake on a connected blocking socket, before anything else is
    sent, by ``deadline`` (time.monotonic()). Returns the link's TLS state and the
    plaintext that came with the handshake's last flight (a client's first bytes).

    Raises:
        ssl.SSLError: the handshake failed (our alert was sent).
        TimeoutError: not done by ``deadline``.
        ConnectionResetError: the peer closed the connection first.
    """
    engine = TLSEngine(tls)
    early = b""
    try:
        engine.handshake()
        while True:
            out = engine.data_to_send()
            if out:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.sendall(out)
            if engine.ready:
                return engine, early
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the TLS handshake did not complete in time")
            sock.settimeout(remaining)
            data = sock.recv(2 * RECORD)
            if not data:
                raise ConnectionResetError("the connection closed during the TLS handshake")
            plain, ended = engine.decrypt(memoryview(data))
            early += plain
            if ended:
                raise ConnectionResetError("the peer closed TLS during its handshake")
    except ssl_module.SSLError:
        try:  # the alert that tells the peer why
            sock.sendall(engine.data_to_send())
        except OSError:
            pass
        raise


def _background(ref: weakref.ref[SyncDriver]) -> None:
    """The background thread: holds its client only during a step, so an abandoned
    client can still be collected."""
    first = ref()
    if first is None:
        return
    first._bg_ident = threading.get_ident()
    del first
    while True:
        client = ref()
        if client is None:
            return
        try:
            if not client._background_step():
                return
        except Exception:
            logger.exception("%r: background step failed", client)
        del client


def await_in_background(awaitables: list[Any]) -> None:
    """Awaitables returned by async plugin hooks run on the shared asyncio loop
    (korinet._loopthread), started only if a plugin needs it."""
    if not awaitables:
        return
    import asyncio

    loop = get_loop()
    for guarded in awaitables:
        asyncio.run_coroutine_threadsafe(guarded.run(), loop)


def _run_calls(calls: list[Callable[[], Any]], client: SyncDriver) -> None:
    for call in calls:
        try:
            call()
        except Exception:  # the manager isolates each plugin; this is a last guard
            logger.exception("%r: a plugin hook failed", client)
