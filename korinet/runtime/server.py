"""The server side: a Hub (handshakes, the session table, TTLs, limits) and a
Server (a listening socket feeding the Hub).

The Hub is separate so that the blocking ``server(conn)`` facade, which gets
sockets the application accepted itself, shares every rule with ``Server``.

Authentication (docs/SECURITY.md): a Hub given ``authorized`` keys checks the
client certificate of each TLS connection as soon as the TLS handshake is done,
before it reads the HELLO; an unknown or missing key is answered CLOSE 1007
instead of a WELCOME. The identity found becomes ``peer.identity``, and a session
can only be resumed by the identity that opened it.

Admission (docs/SECURITY.md, "Limits"): ``Server`` accepts sockets itself and runs
TLS on them afterwards, so that a connection counts in the limits, and its
handshake deadline runs, from the moment it is accepted: TLS, authentication and
HELLO together get ``handshake_timeout``. Connections without a session yet are
capped (``max_handshaking``, well below the descriptor limit): beyond, the oldest
of them is dropped, so a flood of silent sockets cannot keep a real client out.
The first byte tells a TLS ClientHello (0x16) from a plaintext KoriNet preface, so
a client speaking the wrong one is told so at once rather than timing out.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import AuthenticationError, ConnectionClosedError, KoriNetError
from ..plugins import PluginManager, default_manager
from ..security.passphrase import PassphraseVerifier
from ..serving import (  # the AUTH_ constants are read here too
    AUTH_DELAY_FIRST,  # noqa: F401
    AUTH_DELAY_MAX,  # noqa: F401
    AUTH_FAILURE_MEMORY,  # noqa: F401
    AuthFailures,
    DetachedSessions,
    Verdict,
    authenticate,
    find_resumable,
    fingerprint_of,
    handshake_step,
    rejection_code,
    server_codecs,
)
from ..session import (
    SERVER,
    CloseCode,
    Hello,
    ServerHandshake,
    Session,
    SessionConfig,
)
from ..session.handshake import encode_close
from .client import DEFAULT_PORT
from .connection import Connection
from .legacy import LegacyPeer
from .peer import Peer
from .store import SessionStore, StoredIdentity, StoredRecord

if TYPE_CHECKING:
    import os

    from ..security import AuthorizedKeys, PeerIdentity, ServerTLS
    from .tlslink import TLS

__all__ = ["AnyPeer", "Hub", "Server", "ServerPeer", "raise_open_file_limit", "serve"]

logger = logging.getLogger(__name__)

AnyPeer = Peer | LegacyPeer
SessionHandler = Callable[[Any], Awaitable[None]]


class ServerPeer(Peer):
    """A server-side session. It stays in the hub's table while detached, until its TTL."""

    def __init__(
        self,
        hub: Hub,
        session: Session,
        peername: str,
        identity: PeerIdentity | None = None,
        *,
        record: StoredRecord | None = None,
    ) -> None:
        super().__init__(session, hub.plugins, accept_plain=hub.accept_plain, identity=identity)
        self.hub = hub
        self.peername = peername
        #: the socket's own peer when ``peername`` was reported (``Hub.adopt(address=)``)
        self.via: str | None = None
        self._expiry: asyncio.TimerHandle | None = None
        #: restored from the hub's store at start-up (its handler runs on its first resume)
        self.restored = record is not None
        self._handler_pending = False
        if hub.store is not None:
            self._use_store(hub.store, record.key if record is not None else None, record)

    def attach(self, conn: Connection) -> None:
        super().attach(conn)
        self.via = conn.via

    def _on_link_lost(self, error: BaseException) -> None:
        if not self.is_closed:
            self._expiry = self.loop.call_later(self.hub.session_ttl, self._expire)
            self.hub._note_detached(self)

    def _expire(self) -> None:
        if self.conn is None and not self.is_closed:
            logger.info("%r: expired after %.0fs detached", self, self.hub.session_ttl)
            self.session.close(CloseCode.NORMAL, "expired")
            self.finish(ConnectionClosedError(CloseCode.SESSION_UNKNOWN, "session expired"))

    def _resumed_on(self, conn: Connection, hello: Hello, leftover: bytes) -> None:
        self.hub._detached.forget(self)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.attach(conn)
        self.peername = conn.peername
        self.session.resume(hello, self.loop.time(), leftover)
        if self._handler_pending:
            # A session restored from the store gets its handler back when its client
            # returns: the handler of the process that crashed died with it.
            self._handler_pending = False
            self.hub._run_handler(self)
        self.process()

    def _on_closed(self, error: KoriNetError) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self.hub._forget(self)


class _Admission:
    """One accepted connection, counted in the limits from accept until it is gone;
    listed as *handshaking* until its session is set up (or it is refused)."""

    __slots__ = ("address", "conn", "deadline", "peername", "reading", "released", "sock", "task", "timer")

    def __init__(self, address: str, peername: str, deadline: float) -> None:
        self.address = address
        self.peername = peername
        self.deadline = deadline  # of the whole handshake: TLS, authentication, HELLO
        self.sock: socket.socket | None = None  # accepted by Server, no transport yet
        self.reading = False  # waiting for the first byte (TLS or not?)
        self.task: asyncio.Task[None] | None = None  # the TLS handshake / transport set-up
        self.conn: Connection | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.released = False


class Hub:
    """Accepts connections, runs handshakes, keeps the session table.

    Args:
        plugins: plugin manager (default: installed plugins).
        config: session limits and timings for every session.
        handler: ``async def handler(peer)`` run once per new session (and legacy
            peer); the session is closed when it returns.
        accept_plain: accept untyped messages into peers' inboxes. A server that
            only hosts plugins says False, and plain messages are rejected.
        session_ttl: seconds a detached session is kept for its client to resume.
        max_sessions: sessions kept at once; beyond, new clients are told to retry later.
        max_detached: detached sessions kept at once (clients that vanish must not
            fill the table); beyond, the one detached longest is expired early.
        max_connections: connections at once (handshaking or open), counted from accept.
        max_connections_per_address: connections at once from one IP address.
        max_handshaking: connections at once without a session yet (TLS, HELLO or
            authentication pending); beyond, the oldest of them is dropped. None: a
            quarter of the process's open-file limit (RLIMIT_NOFILE), at most 1024,
            so that a flood of silent sockets leaves descriptors for real clients.
        legacy: serve peers speaking the original v2 wire.
        authorized: admit only TLS clients whose certificate's key is listed there
            (see :class:`~korinet.security.AuthorizedKeys`); None admits anyone.
        passphrase: admit only clients that prove this pre-shared passphrase by
            challenge-response (it never crosses the wire; docs/PROTOCOL.md §3.4).
            Legacy v2 peers cannot, so they are refused.
        store: a file (or :class:`~korinet.runtime.store.SessionStore`) keeping every
            session across a crash or restart of this process. Stored sessions come
            back detached when the hub starts, their TTL counted from then; the
            handler of one runs again when its client resumes it. Without a store, a
            restart loses every session (clients are told ``SessionExpired``).
    """

    def __init__(
        self,
        *,
        plugins: PluginManager | None = None,
        config: SessionConfig | None = None,
        handler: SessionHandler | None = None,
        accept_plain: bool = True,
        session_ttl: float = 120.0,
        max_sessions: int = 20000,
        max_detached: int = 10000,
        max_connections: int = 20000,
        max_connections_per_address: int = 256,
        max_handshaking: int | None = None,
        legacy: bool = True,
        authorized: AuthorizedKeys | None = None,
        passphrase: str | None = None,
        store: str | os.PathLike[str] | SessionStore | None = None,
    ) -> None:
        self.plugins = plugins or default_manager()
        # derived once (scrypt): an unauthenticated client never makes the server run it
        self._passphrase = PassphraseVerifier(passphrase) if passphrase is not None else None
        self.codecs = self.plugins.codecs()
        self.plugins.message_types()  # conflicts surface at start-up, not on first message
        self.config = config or SessionConfig()
        self.handler = handler
        self.accept_plain = accept_plain
        self.session_ttl = session_ttl
        self.max_sessions = max_sessions
        #: detached sessions, the one detached longest first, at most max_detached
        self._detached: DetachedSessions[ServerPeer] = DetachedSessions(max_detached, logger)
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self.max_handshaking = max_handshaking if max_handshaking is not None else _default_max_handshaking()
        #: connections accepted and not gone yet (with or without a Connection)
        self._open = 0
        self._per_address: dict[str, int] = {}
        #: connections without a session yet, the one accepted first first
        self._handshaking: dict[_Admission, None] = {}
        self._admission_of: dict[Connection, _Admission] = {}
        self._auth_failures = AuthFailures(logger)
        #: when a warning about each address was last logged (see _warn)
        self._warned: dict[str, float] = {}
        self.legacy = legacy
        self.authorized = authorized
        self.sessions: dict[str, ServerPeer] = {}
        self.connections: set[Connection] = set()
        self._results: dict[Connection, asyncio.Future[AnyPeer]] = {}
        self._tls: TLS | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._codec_names = server_codecs(self.config, self.codecs)
        self._own_store: SessionStore | None = None
        if store is not None and not isinstance(store, SessionStore):
            store = self._own_store = SessionStore(store)
        #: the durable store of every session (None: sessions live in memory only)
        self.store: SessionStore | None = store
        self._restore_due = store is not None

    # -------------------------------------------------------------- durable sessions

    def restore_sessions(self) -> int:
        """Bring back the sessions of the store, detached, each with a fresh TTL; a
        client resumes its own as after a lost link. Called once, by ``Server.start()``
        (or the first connection). Returns how many came back."""
        if not self._restore_due or self.store is None:
            return 0
        self._restore_due = False
        restored = 0
        for record in self.store.records(SERVER):
            try:
                session = Session(SERVER, self.codecs, self.config)
                peer = ServerPeer(self, session, "(restored)", record=record)
            except KeyError as exc:  # a codec no plugin provides any more: it cannot resume
                logger.warning("stored session %s cannot be restored (no codec %s): dropped", record.key, exc)
                self.store.forget(record.key)
                continue
            # Only this key may resume it, as before the restart (docs/SECURITY.md).
            peer.identity = StoredIdentity.of(record.identity)
            assert session.session_id is not None
            self.sessions[session.session_id] = peer
            peer._handler_pending = self.handler is not None
            peer._on_link_lost(ConnectionClosedError(CloseCode.LINK_LOST, "restored"))  # starts the TTL
            restored += 1
        if restored:
            logger.info("restored %d session(s) from %s", restored, self.store.path)
        return restored

    # -------------------------------------------------------------- connections

    def protocol_factory(self, ssl: ssl_module.SSLContext | None = None) -> Connection:
        """The protocol of a connection accepted elsewhere (``adopt()``, an asyncio
        server of the application's): it is counted from its ``connection_made``, or
        with ``ssl``, run by the Connection itself, once its TLS handshake is done."""
        if self._restore_due:
            self.restore_sessions()  # a Hub fed by adopt(), without Server.start()
        return Connection(on_made=self._connection_made, tls=self._tls_for(ssl))

    def _connection_made(self, conn: Connection) -> None:
        admission = self._admit(_host_of(conn), conn.peername)
        if admission is None:
            # Closed without a CLOSE frame: we cannot know yet whether the peer speaks v3
            # or v2 (which would misread one); either way it retries later.
            conn.abort()
            return
        self._took(conn, admission)

    def accept_socket(self, sock: socket.socket, ssl: ssl_module.SSLContext | None) -> None:
        """Take a socket ``Server`` has just accepted: count it and start its handshake
        deadline now; with ``ssl``, wait for its first byte to tell TLS from plaintext
        before any transport (or descriptor beyond the socket's) is spent on it."""
        try:
            name = sock.getpeername()
        except OSError:  # reset before we looked
            sock.close()
            return
        address = str(name[0]) if isinstance(name, tuple) else str(name)
        peername = f"{name[0]}:{name[1]}" if isinstance(name, tuple) else str(name)
        admission = self._admit(address, peername)
        if admission is None:
            sock.close()  # no TLS yet, so no CLOSE frame either: the client retries later
            return
        admission.sock = sock
        loop = asyncio.get_running_loop()
        admission.timer = loop.call_at(admission.deadline, self._too_slow, admission)
        if ssl is None:
            self._set_up(admission, None, wants_tls=False)
        else:
            admission.reading = True
            loop.add_reader(sock.fileno(), self._first_byte, admission, ssl)

    def _admit(self, address: str, peername: str) -> _Admission | None:
        """Count a new connection, or refuse it (None) when a limit is reached."""
        if self._open >= self.max_connections:
            self._warn(address, "refusing %s: %d connections open", peername, self._open)
            self._refused(peername, CloseCode.TRY_AGAIN_LATER, "too many connections")
            return None
        if self._per_address.get(address, 0) >= self.max_connections_per_address:
            self._warn(address, "refusing %s: %d connections open from %s", peername,
                       self._per_address[address], address)  # fmt: skip
            self._refused(peername, CloseCode.TRY_AGAIN_LATER, f"too many connections from {address}")
            return None
        loop = asyncio.get_running_loop()
        admission = _Admission(address, peername, loop.time() + self.config.handshake_timeout)
        self._open += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        self._handshaking[admission] = None
        while len(self._handshaking) > max(1, self.max_handshaking):
            oldest = next(iter(self._handshaking))
            self._warn(oldest.address, "%s: dropped: more than %d connections without a session",
                       oldest.peername, self.max_handshaking)  # fmt: skip
            self._drop(oldest, CloseCode.TRY_AGAIN_LATER,
                       f"dropped unauthenticated: more than {self.max_handshaking} connections "
                       "without a session (max_handshaking)")  # fmt: skip
        return admission

    def _first_byte(self, admission: _Admission, ssl: ssl_module.SSLContext) -> None:
        assert admission.sock is not None
        try:
            head = admission.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            head = b""
        self._stop_reading(admission)
        if not head:  # closed before a byte: a port probe, nothing to serve or report
            self._close_socket(admission)
            self._release(admission)
        elif head == TLS_HANDSHAKE_RECORD:
            self._set_up(admission, ssl, wants_tls=False)
        else:  # plaintext at a TLS server: answered in plaintext, once its HELLO is in
            self._set_up(admission, None, wants_tls=True)

    def _set_up(self, admission: _Admission, ssl: ssl_module.SSLContext | None, *, wants_tls: bool) -> None:
        """Give the socket a transport (running TLS on it first, with what is left of
        the deadline); a Connection is made for it once that is done."""
        task = self._spawn(self._transport(admission, ssl, wants_tls))
        admission.task = task
        task.add_done_callback(lambda _: self._set_up_done(admission))

    async def _transport(
        self, admission: _Admission, ssl: ssl_module.SSLContext | None, wants_tls: bool
    ) -> None:
        sock, admission.sock = admission.sock, None  # from here the transport closes it
        assert sock is not None
        loop = asyncio.get_running_loop()
        tls = self._tls_for(ssl)
        conn: Connection | None = None
        try:
            _, conn = await loop.connect_accepted_socket(
                lambda: Connection(
                    on_made=lambda conn: self._took(conn, admission, wants_tls=wants_tls), tls=tls
                ),
                sock,
            )
            if conn.secured is not None:  # the deadline (_too_slow) cancels us
                await asyncio.shield(conn.secured)
        except asyncio.CancelledError:
            if conn is not None and admission.conn is None:
                conn.abort()
            raise
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            if admission.conn is None and self._stop_handshaking(admission):
                what = "TLS handshake failed" if ssl is not None else "connection set-up failed"
                why = f"{what}: {_tls_failure(exc)}"
                self._warn(admission.address, "%s: %s", admission.peername, why)
                self._refused(admission.peername, CloseCode.PROTOCOL_ERROR, why)

    def _tls_for(self, ssl: ssl_module.SSLContext | None) -> TLS | None:
        """The TLS settings of our connections with ``ssl`` (one object for all)."""
        if ssl is None:
            return None
        if self._tls is None or self._tls.context is not ssl:
            from .tlslink import TLS  # plaintext servers do not import it

            self._tls = TLS(ssl, server_side=True)
        return self._tls

    def _set_up_done(self, admission: _Admission) -> None:
        admission.task = None
        if admission.conn is None:
            self._close_socket(admission)  # cancelled before the transport took it
            self._release(admission)

    def _took(self, conn: Connection, admission: _Admission, *, wants_tls: bool = False) -> None:
        """``conn`` (TLS done, if any) carries ``admission``: run the KoriNet handshake,
        by the deadline counted from accept."""
        admission.conn = conn
        if admission.timer is not None:
            admission.timer.cancel()
            admission.timer = None
        self.connections.add(conn)
        self._admission_of[conn] = admission
        conn.lost.add_done_callback(lambda _: self._connection_gone(conn))
        if admission.released or admission not in self._handshaking:
            conn.abort()  # dropped (too slow, evicted) while its TLS handshake finished
            return
        handshake = ServerHandshake(
            self.config, self._codec_names, legacy=self.legacy, passphrase=self._passphrase
        )
        identity: PeerIdentity | None = None
        refusal: tuple[CloseCode, str] | None = None
        if wants_tls:
            reason = "this server speaks TLS only: connect with TLS (not with --insecure-plaintext)"
            self._warn(admission.address, "%s: refused: a plaintext client at a TLS server", conn.peername)
            self._refused(conn.peername, CloseCode.PROTOCOL_ERROR, reason)
            refusal = (CloseCode.PROTOCOL_ERROR, reason)
        else:
            identity, reason_or_none = self._authenticate(conn)
            if reason_or_none is not None:
                refusal = (CloseCode.AUTH_FAILED, reason_or_none)

        def first_data(data: bytes) -> None:
            if (
                data[:1] == TLS_HANDSHAKE_RECORD
                and conn.transport is not None
                and (conn.transport.get_extra_info("ssl_object") is None)
            ):
                self._tls_at_plaintext(conn)
                return
            conn.on_data = lambda data: self._handshake_data(conn, handshake, data, identity, refusal)
            conn.on_data(data)

        conn.on_data = first_data
        conn.schedule(
            admission.deadline,
            lambda: self._handshake_timeout(conn, handshake, identity, refused=refusal is not None),
        )

    def _tls_at_plaintext(self, conn: Connection) -> None:
        """A TLS ClientHello at a plaintext server: refuse at once. Our CLOSE frame is
        no TLS record, so the client's TLS layer fails on it at once too (the client
        reports it as a plaintext server, korinet/runtime/client.py)."""
        conn.cancel_timer()
        conn.on_data = None
        self._handshake_over(conn)
        reason = "this server speaks plaintext, not TLS"
        self._warn(_host_of(conn), "%s: refused: a TLS client at a plaintext server", conn.peername)
        self._refused(
            conn.peername, CloseCode.PROTOCOL_ERROR, f"a TLS client at a plaintext server ({reason})"
        )
        conn.write(encode_close(CloseCode.PROTOCOL_ERROR, reason))
        conn.close()
        self._fail_result(conn, ConnectionClosedError(CloseCode.PROTOCOL_ERROR, reason))

    def _too_slow(self, admission: _Admission) -> None:
        """The deadline passed before the TLS handshake was done."""
        admission.timer = None
        if admission.conn is not None or not self._stop_handshaking(admission):
            return
        timeout = self.config.handshake_timeout
        self._warn(
            admission.address, "%s: no TLS handshake within %.1fs, closing", admission.peername, timeout
        )
        self._refused(
            admission.peername, CloseCode.HANDSHAKE_TIMEOUT, f"no TLS handshake within {timeout:g}s"
        )
        self._abandon(admission)

    def _drop(self, admission: _Admission, code: CloseCode, reason: str) -> None:
        """Drop a connection that has no session yet, and report it."""
        if self._stop_handshaking(admission):
            self._refused(admission.peername, code, reason)
        self._abandon(admission)

    def _abandon(self, admission: _Admission) -> None:
        if admission.conn is not None:
            admission.conn.abort()  # released when it is gone
        elif admission.task is not None:
            admission.task.cancel()  # released by _set_up_done
        else:
            self._close_socket(admission)
            self._release(admission)

    def _stop_reading(self, admission: _Admission) -> None:
        if admission.reading and admission.sock is not None:
            admission.reading = False
            asyncio.get_running_loop().remove_reader(admission.sock.fileno())

    def _close_socket(self, admission: _Admission) -> None:
        self._stop_reading(admission)
        sock, admission.sock = admission.sock, None
        if sock is not None:
            sock.close()

    def _stop_handshaking(self, admission: _Admission) -> bool:
        """Take ``admission`` off the handshaking list; whether it was on it (so that a
        connection dropped for two reasons at once is reported once)."""
        if admission in self._handshaking:
            del self._handshaking[admission]
            return True
        return False

    def _handshake_over(self, conn: Connection) -> None:
        admission = self._admission_of.get(conn)
        if admission is not None:
            self._stop_handshaking(admission)

    def _release(self, admission: _Admission) -> None:
        """The connection is gone: it no longer counts in any limit."""
        if admission.released:
            return
        admission.released = True
        if admission.timer is not None:
            admission.timer.cancel()
            admission.timer = None
        self._handshaking.pop(admission, None)
        self._open -= 1
        left = self._per_address[admission.address] - 1
        if left:
            self._per_address[admission.address] = left
        else:
            del self._per_address[admission.address]

    def _warn(self, address: str, text: str, *args: Any) -> None:
        """A warning about a connection from ``address``, at most one per address every
        WARNING_INTERVAL: a flood must not flood the log too (the rest go to debug)."""
        now = asyncio.get_running_loop().time()
        if self._warned.get(address, -WARNING_INTERVAL) + WARNING_INTERVAL > now:
            logger.debug(text, *args)
            return
        if len(self._warned) >= MAX_WARNED_ADDRESSES:
            self._warned = {a: t for a, t in self._warned.items() if t + WARNING_INTERVAL > now}
        self._warned[address] = now
        logger.warning(text + " (more from %s within %.0fs: debug log)", *args, address, WARNING_INTERVAL)

    def _out_of_descriptors(self) -> bool:
        """accept() failed for lack of descriptors: drop the oldest connection without a
        session, if any (whether one was dropped)."""
        if not self._handshaking:
            return False
        oldest = next(iter(self._handshaking))
        self._drop(oldest, CloseCode.TRY_AGAIN_LATER, "dropped unauthenticated: out of file descriptors")
        return True

    def _connection_gone(self, conn: Connection) -> None:
        self.connections.discard(conn)
        admission = self._admission_of.pop(conn, None)
        if admission is not None:
            self._release(admission)
        fut = self._results.pop(conn, None)
        if fut is not None and not fut.done():
            fut.set_exception(
                ConnectionClosedError(CloseCode.LINK_LOST, "connection lost during the handshake")
            )

    def _handshake_timeout(
        self, conn: Connection, handshake: ServerHandshake, identity: PeerIdentity | None, *, refused: bool
    ) -> None:
        self._handshake_over(conn)
        self._warn(_host_of(conn), "%s: no handshake within %.1fs, closing", conn.peername,
                   self.config.handshake_timeout)  # fmt: skip
        if not refused:  # else already reported, with its real reason, by _authenticate
            self._refused(
                conn.peername, CloseCode.HANDSHAKE_TIMEOUT, "handshake timeout", _fingerprint(identity)
            )
        if handshake.saw_preface:
            # Only a v3 peer can read a CLOSE; a quiet v2 client would take it for an ack.
            conn.write(encode_close(CloseCode.HANDSHAKE_TIMEOUT, "handshake timeout"))
        conn.close()

    def _authenticate(self, conn: Connection) -> tuple[PeerIdentity | None, str | None]:
        """Check the client's certificate against the authorized keys, right after the
        TLS handshake. Returns the identity, or the reason to refuse the client."""
        if self.authorized is None:
            return None, None
        from ..security.tls import peer_certificate  # TLS users only pay for cryptography

        identity, reason, fingerprint = authenticate(
            self.authorized, peer_certificate(conn.transport), conn.peername, logger
        )
        if reason is not None:
            self._refused(conn.peername, CloseCode.AUTH_FAILED, reason, fingerprint)
            return None, reason
        self._auth_failures.succeeded(_host_of(conn))
        return identity, None

    def _refused(self, peername: str, code: CloseCode, reason: str, fingerprint: str | None = None) -> None:
        """Tell the plugins that the connection from ``peername`` is refused (hook
        ``korinet_session_refused``). Called once per refused connection, where the
        refusal is decided (a consumer that writes them down rate-limits them)."""
        for guarded in self.plugins.session_refused(self, peername, fingerprint, reason, code):
            self._spawn(guarded.run())

    def _refuse(self, conn: Connection, reason: str, *, can_read_close: bool = True) -> None:
        """Refuse an authentication, after the delay of :class:`~korinet.serving.AuthFailures`."""
        delay = self._auth_failures.failed(_host_of(conn), conn.loop.time(), conn.peername)

        def answer() -> None:
            if can_read_close:
                conn.write(encode_close(CloseCode.AUTH_FAILED, reason))
            conn.close()
            self._fail_result(conn, AuthenticationError(reason))

        if delay:
            conn.loop.call_later(delay, answer)
        else:
            answer()

    def _handshake_data(
        self,
        conn: Connection,
        handshake: ServerHandshake,
        data: bytes,
        identity: PeerIdentity | None = None,
        refusal: tuple[CloseCode, str] | None = None,
    ) -> None:
        verdict, out = handshake_step(handshake, data, refusal is not None, conn.peername, logger)
        if verdict is Verdict.WAIT:
            return
        if verdict is Verdict.WRITE:
            conn.write(out)
            return
        conn.cancel_timer()
        conn.on_data = None
        self._handshake_over(conn)
        if refusal is not None:
            code, reason = refusal  # (already reported)
            if code == CloseCode.AUTH_FAILED:
                self._refuse(conn, reason, can_read_close=handshake.saw_preface)
            else:
                if handshake.saw_preface:
                    conn.write(encode_close(code, reason))
                conn.close()
                self._fail_result(conn, ConnectionClosedError(code, reason))
        elif verdict is Verdict.AUTH_FAILED:
            self._refused(conn.peername, CloseCode.AUTH_FAILED, str(handshake.error), _fingerprint(identity))
            self._refuse(conn, str(handshake.error))
        elif verdict is Verdict.REJECT:
            self._refused(
                conn.peername, _rejection_code(handshake.error), str(handshake.error), _fingerprint(identity)
            )
            conn.write(out)
            conn.close()
            self._fail_result(conn, handshake.error or KoriNetError("handshake rejected"))
        elif verdict is Verdict.LEGACY:
            legacy = LegacyPeer(conn, self.accept_plain)
            self._set_result(conn, legacy)
            legacy.receive_data(handshake.leftover)
            if self.handler is not None:
                self._run_handler(legacy)
        else:
            assert handshake.hello is not None
            if self._passphrase is not None:
                self._auth_failures.succeeded(_host_of(conn))
            self._hello(conn, handshake.hello, handshake.leftover, identity)

    def _hello(
        self, conn: Connection, hello: Hello, leftover: bytes, identity: PeerIdentity | None = None
    ) -> None:
        peer, expired, refusal = find_resumable(self.sessions, hello, identity, conn.peername, logger)
        if refusal is not None:
            self._refused(conn.peername, CloseCode.AUTH_FAILED, refusal, _fingerprint(identity))
            self._refuse(conn, refusal)
            return
        if peer is not None:
            peer.identity = identity  # the same key, with the roles the file gives now
            peer._resumed_on(conn, hello, leftover)
            self._set_result(conn, peer)
            return
        if len(self.sessions) >= self.max_sessions:
            logger.warning("refusing a new session from %s: %d sessions", conn.peername, len(self.sessions))
            self._refused(
                conn.peername, CloseCode.TRY_AGAIN_LATER, "too many sessions", _fingerprint(identity)
            )
            conn.write(encode_close(CloseCode.TRY_AGAIN_LATER, "too many sessions"))
            conn.close()
            return
        session = Session(SERVER, self.codecs, self.config)
        peer = ServerPeer(self, session, conn.peername, identity)
        peer.attach(conn)
        session.accept(hello, conn.loop.time(), b"", expired=expired)
        assert session.session_id is not None
        self.sessions[session.session_id] = peer
        self._set_result(conn, peer)
        if self.handler is not None:
            self._run_handler(peer)
        peer.process()
        if leftover:
            peer.link_data(conn, leftover)

    def _set_result(self, conn: Connection, peer: AnyPeer) -> None:
        fut = self._results.pop(conn, None)
        if fut is not None and not fut.done():
            fut.set_result(peer)

    def _fail_result(self, conn: Connection, error: BaseException) -> None:
        fut = self._results.pop(conn, None)
        if fut is not None and not fut.done():
            fut.set_exception(error)

    @property
    def max_detached(self) -> int:
        return self._detached.limit

    def _note_detached(self, peer: ServerPeer) -> None:
        for oldest in self._detached.note(peer):
            oldest._expire()

    def _forget(self, peer: ServerPeer) -> None:
        self._detached.forget(peer)
        if peer.session_id is not None and self.sessions.get(peer.session_id) is peer:
            del self.sessions[peer.session_id]

    def _run_handler(self, peer: AnyPeer) -> None:
        self._spawn(self._handle(peer))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _handle(self, peer: AnyPeer) -> None:
        assert self.handler is not None
        try:
            await self.handler(peer)
        except (KoriNetError, ConnectionError):
            pass  # the session ended under the handler: already logged by the peer
        except Exception:
            logger.exception("session handler failed for %r", peer)
        finally:
            if not peer.is_closed:
                await peer.close()

    async def adopt(
        self,
        sock: socket.socket,
        ssl: ssl_module.SSLContext | None = None,
        *,
        address: tuple[str, int] | None = None,
    ) -> AnyPeer:
        """Run the handshake on a socket accepted elsewhere; return its peer (a new
        session, a resumed one, or a legacy peer).

        ``address``: the client's ``(host, port)`` as whoever handed the socket over
        reports it (a relay or proxy whose socket this is). The per-address limits,
        the failed-authentication delay, the hooks (``peername``), the logs and
        ``peer.peername`` then use it, and ``peer.via`` gives the socket's own peer.
        It is taken on trust: only the socket's peer was seen by this side."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[AnyPeer] = loop.create_future()

        def factory() -> Connection:
            conn = self.protocol_factory(ssl)
            conn.reported = address
            self._results[conn] = fut
            return conn

        _, conn = await loop.connect_accepted_socket(factory, sock)
        if conn.secured is not None:
            # The application accepted the socket: its TLS handshake is bounded by our
            # handshake timeout (it counts in the limits once TLS is done).
            try:
                async with asyncio.timeout(self.config.handshake_timeout):
                    await asyncio.shield(conn.secured)
            except TimeoutError:
                conn.abort()
                self._results.pop(conn, None)
                raise ConnectionAbortedError(
                    f"TLS handshake not done within {self.config.handshake_timeout:g}s: aborted"
                ) from None
            except BaseException:
                conn.abort()
                self._results.pop(conn, None)
                raise
        return await fut

    async def close(self) -> None:
        """Drop every connection and forget every session (as a crash would, minus
        the crash: clients learn on reconnect that their session is gone). With a
        store, the sessions stay in it: a hub started again with it resumes them."""
        for conn in list(self.connections):
            conn.abort()
        for admission in list(self._handshaking):
            if admission.conn is None and admission.task is None:
                self._close_socket(admission)  # still waiting for its first byte
                self._release(admission)
        for peer in list(self.sessions.values()):
            peer.keep_stored = True
            peer.finish(ConnectionClosedError(CloseCode.GOING_AWAY, "server stopped"))
        self.sessions.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)
        store, self._own_store = self._own_store, None
        if store is not None:
            store.close()


class Server:
    """A Hub behind a listening socket. ``async with Server(...)`` starts and stops it.

    Args:
        host, port: where to listen (port 0: any free port, see :attr:`port`).
        tls: TLS 1.3 with this server's identity, and the clients it admits
            (:class:`~korinet.security.ServerTLS`); None serves plaintext.
        ssl: a ready ``ssl.SSLContext`` instead of ``tls`` (no pinning, no
            authentication unless ``authorized`` is given too).
        backlog: the listening socket's backlog.
        hub_kwargs: go to :class:`Hub`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        tls: ServerTLS | None = None,
        ssl: ssl_module.SSLContext | None = None,
        backlog: int = 1024,
        **hub_kwargs: Any,
    ) -> None:
        if tls is not None:
            if ssl is not None or "authorized" in hub_kwargs:
                raise ValueError("give tls= alone: it holds the context and the authorized keys")
            ssl = tls.context()
            hub_kwargs["authorized"] = tls.authorized
        self.host = host
        self.requested_port = port
        self.tls = tls
        self.ssl = ssl
        self.backlog = backlog
        self.hub = Hub(**hub_kwargs)
        #: the listening sockets (accepted from by _accept, see the module docstring)
        self._sockets: list[socket.socket] = []
        self._closed: asyncio.Future[None] | None = None
        self._accept_paused: asyncio.TimerHandle | None = None

    @property
    def plugins(self) -> PluginManager:
        return self.hub.plugins

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint clients pin (None without ``tls``)."""
        return self.tls.identity.fingerprint if self.tls is not None else None

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._sockets
        port: int = self._sockets[0].getsockname()[1]
        return port

    async def start(self) -> Server:
        loop = asyncio.get_running_loop()
        self.hub.restore_sessions()  # before the first client can ask to resume
        self._sockets = await _listen(self.host, self.requested_port, self.backlog)
        self._closed = loop.create_future()
        self._resume_accepting()
        logger.info(
            "listening on %s:%d (%s)",
            self.host,
            self.port,
            f"TLS 1.3, key {self.fingerprint}" if self.tls else ("TLS" if self.ssl else "plaintext"),
        )
        for guarded in self.plugins.server_started(self):
            await guarded.run()
        return self

    def _resume_accepting(self) -> None:
        self._accept_paused = None
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _pause_accepting(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
        self._accept_paused = loop.call_later(seconds, self._resume_accepting)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the oldest connection without a session makes
                    # room; with none to drop, wait a little (as asyncio's own server).
                    dropped = self.hub._out_of_descriptors()
                    self.hub._warn("(accept)", "cannot accept: %s (open-file limit); %s", exc.strerror,
                                   "dropped the oldest unauthenticated connection" if dropped
                                   else "pausing for a second")  # fmt: skip
                    self._pause_accepting(0.0 if dropped else 1.0)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # gone before we took it
                logger.error("accept() failed on %s: %s", listener.getsockname(), exc)
                return
            sock.setblocking(False)
            self.hub.accept_socket(sock, self.ssl)

    async def serve_forever(self) -> None:
        if self._closed is None:
            await self.start()
        assert self._closed is not None
        try:
            await asyncio.shield(self._closed)
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed is None:
            return
        closed, self._closed = self._closed, None
        if self._accept_paused is not None:
            self._accept_paused.cancel()
            self._accept_paused = None
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        await self.hub.close()
        if not closed.done():
            closed.set_result(None)
        for guarded in self.plugins.server_stopped(self):
            await guarded.run()

    async def __aenter__(self) -> Server:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def serve(
    handler: SessionHandler | None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, **kwargs: Any
) -> Server:
    """Start a :class:`Server` running ``handler(peer)`` for every new session."""
    return await Server(host, port, handler=handler, **kwargs).start()


async def _listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for ``host`` (each address it resolves to), non-blocking."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio does
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"error while attempting to bind on address {address!r}: {exc.strerror}"
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(f"{host!r} resolves to no address")
    return sockets


_fingerprint = fingerprint_of
_rejection_code = rejection_code


#: The first byte of a TLS ClientHello (a handshake record); a KoriNet client's is "K".
TLS_HANDSHAKE_RECORD: Final = b"\x16"
#: Connections accepted at most per wake-up of a listening socket.
ACCEPT_BURST: Final = 64
#: Seconds between two warnings logged about connections from one address.
WARNING_INTERVAL: Final = 60.0
MAX_WARNED_ADDRESSES: Final = 10000


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open files (RLIMIT_NOFILE) to its hard limit,
    for a server that must hold many connections (systemd's default soft limit is
    1024). Returns the (soft, hard) limits now in force."""
    try:
        import resource
    except ImportError:  # not POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


def _default_max_handshaking() -> int:
    """A quarter of the open-file limit, at most 1024: the rest stays for sessions,
    their files and jobs, whatever silent sockets arrive."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1024
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, soft // 4))


def _tls_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, in a few words."""
    if isinstance(exc, ssl_module.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError | ConnectionAbortedError) and "handshake" in str(exc):
        return "timed out"
    return str(exc) or type(exc).__name__


def _host_of(conn: Connection) -> str:
    return conn.host
