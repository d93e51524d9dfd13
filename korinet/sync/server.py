"""The blocking server: ``server(conn)``'s sessions, with no event loop on their path.

:class:`SessionTable` runs the server handshake on a socket the application
accepted, in the caller's thread (TLS 1.3, the client key against the authorized
keys, version and codec negotiation, the passphrase challenge, the original v2
wire), with the decisions of :mod:`korinet.serving` that the asyncio Hub makes too.
It keeps the sessions it opened, thread-safe, so that a client that reconnects on
a new socket resumes in the next ``server(conn)``.

A :class:`SyncServerSession` is a :class:`~korinet.sync.driver.SyncDriver`: the
application's thread reads and writes the socket itself, and a background thread
answers heartbeats while the application is busy elsewhere. Without a link it
waits for its client to come back; after ``session_ttl`` its background thread
expires it and takes it off the table, and so it does early to the session detached
longest when more than ``max_detached`` wait (their threads are part of the bound).
A resume on a new socket takes the session over from whatever still holds the old
one: the old socket is shut down, so a thread blocked on it wakes up, and each call
made for the old link raises ConnectionClosedError (the ``link`` argument of send()
and recv_message()).
"""

from __future__ import annotations

import logging
import math
import socket
import ssl as ssl_module
import threading
import time
from typing import TYPE_CHECKING, Final

from ..endpoint import Endpoint
from ..exceptions import AuthenticationError, ConnectionClosedError, KoriNetError
from ..plugins import PluginManager, default_manager
from ..security.passphrase import PassphraseVerifier
from ..security.tlsbio import TLS, TLSEngine
from ..serving import (
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
from ..session import SERVER, CloseCode, Hello, ServerHandshake, Session, SessionConfig
from ..session.handshake import encode_close
from .driver import SyncDriver, await_in_background, tls_handshake
from .legacy import SyncLegacyPeer

if TYPE_CHECKING:
    from ..security import AuthorizedKeys, PeerIdentity, ServerTLS

__all__ = ["SessionTable", "SyncServerSession"]

logger = logging.getLogger(__name__)

#: The first byte of a TLS ClientHello (a handshake record); a KoriNet client's is "K".
TLS_HANDSHAKE_RECORD: Final = b"\x16"
#: Bytes read per call during the handshake.
HANDSHAKE_READ: Final = 64 * 1024
#: Longest a write of the handshake may block (a CHALLENGE, a CLOSE: a few bytes).
HANDSHAKE_WRITE: Final = 1.0


class SyncServerSession(SyncDriver):
    """One server-side session of a :class:`SessionTable`, driven blocking.

    Its status (``session_id``, ``identity``, ``is_connected``...) is that of every
    driver; ``send()``/``recv_message()`` take the ``link`` a ``server(conn)`` was
    given, and raise ConnectionClosedError once that link is gone.
    """

    def __init__(self, table: SessionTable, peername: str, identity: PeerIdentity | None) -> None:
        self.table = table
        self.peername = peername
        self.plugins = table.plugins
        self.timeout = None
        self.session = Session(SERVER, table.codecs, table.config)
        self.endpoint = Endpoint(
            self.session, self.plugins, self, self, accept_plain=table.accept_plain, identity=identity
        )
        #: when the session lost its link (None while linked)
        self.detached_at: float | None = None
        #: how many server(conn) calls took this session (the last one owns it)
        self.adoptions = 0
        self._evicted = False  # beyond max_detached: the leader expires it now
        self._taking_over = False  # resume_on drops the old link: not a detach
        self._init_driver()

    def __repr__(self) -> str:
        return f"<SyncServerSession {self.peername} {self.session.session_id} {self.session.state.name}>"

    def open(
        self, sock: socket.socket, tls: TLSEngine | None, hello: Hello, leftover: bytes, expired: str | None
    ) -> int:
        """Start the session on ``sock`` from its client's HELLO; returns the link."""
        with self._mutex:
            self._leader = threading.get_ident()
            try:
                self._install_socket(sock, tls)
                now = time.monotonic()
                self.session.accept(hello, now, b"", expired=expired)
                self.adoptions += 1
                link = self._link_no
                self._after_input()  # the WELCOME; session_opened
                if leftover:
                    self.session.receive_data(leftover, now)
                    self._after_input()
            finally:
                self._resign()
        self._start_background(f"korinet-server-{self.peername}")
        return link

    def resume_on(
        self,
        sock: socket.socket,
        tls: TLSEngine | None,
        hello: Hello,
        leftover: bytes,
        identity: PeerIdentity | None,
        peername: str,
    ) -> int | None:
        """Continue the session on ``sock`` (the token is checked); returns the link,
        or None if the session ended meanwhile or its old link could not be taken."""
        with self._mutex:
            if self.endpoint.ended is not None or not self._take_role():
                return None
            try:
                if self._sock is not None:
                    self._taking_over = True
                    try:
                        self._link_lost(
                            ConnectionClosedError(CloseCode.LINK_LOST, "the client resumed elsewhere")
                        )
                    finally:
                        self._taking_over = False
                if self.endpoint.ended is not None:
                    return None
                self.identity = identity  # the same key, with the roles the file gives now
                self.peername = peername
                self.detached_at = None
                self._evicted = False  # back in time after all
                with self.table._lock:
                    self.table.detached.forget(self)
                self._install_socket(sock, tls)
                self.session.resume(hello, time.monotonic(), leftover)
                self.adoptions += 1
                link = self._link_no
                self._after_input()  # the WELCOME, the replay; session_resumed
                return link
            finally:
                self._resign()

    def _take_role(self) -> bool:
        """(mutex held) Become the leader, taking the role from whoever reads the old
        link: a thread blocked on its socket wakes up when it is shut down. False if
        the role did not come within the handshake timeout (a handler still runs)."""
        deadline = time.monotonic() + self.table.config.handshake_timeout
        while not self._claim():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if self._leader == self._bg_ident:
                self._takeover = True
            self._wake()
            self._followers += 1
            try:
                self._cv.wait(remaining)
            finally:
                self._followers -= 1
        self._leader = threading.get_ident()
        self._takeover = False
        return True

    # ------------------------------------------------------------------ without a link

    def _link_step(self, now: float, deadline: float | None) -> None:
        """(mutex held, leader, no link) Wait for the client to resume; expire after the TTL."""
        detached_at = self.detached_at
        if detached_at is None:
            detached_at = self.detached_at = now
        expires = detached_at + self.table.session_ttl
        if now >= expires or self._evicted:
            if not self._evicted:
                logger.info("%r: expired after %.0fs detached", self, self.table.session_ttl)
            self._expire()
            return
        self._idle_poll((expires if deadline is None else min(expires, deadline)) - now)

    def _expire(self) -> None:
        """(mutex held, detached) End the session as its TTL does: its client, if it
        comes back, gets a new session and SessionExpired; the background thread exits."""
        self.session.close(CloseCode.NORMAL, "expired")
        self.endpoint.finish(ConnectionClosedError(CloseCode.SESSION_UNKNOWN, "session expired"))

    def expire_early(self) -> None:
        """(from another session's thread) Beyond ``max_detached``: this session,
        detached longest, is expired now, unless its client came back meanwhile."""
        with self._mutex:
            if self.endpoint.ended is not None or self._sock is not None:
                return
            self._evicted = True
            if self._leader is None:
                self._expire()
            else:
                self._wake()  # the leader, in _idle_poll(), expires it in _link_step()
        self._run_deferred()

    def _on_link_lost(self, exc: BaseException | None, opened: bool) -> None:
        if self.endpoint.ended is not None or self._taking_over:
            return
        self.detached_at = time.monotonic()
        with self.table._lock:
            overflow = self.table.detached.note(self)
        if overflow:
            # Their mutexes are taken without ours (two detaching sessions could each
            # pick the other); we keep the reader role, so nothing moves meanwhile.
            self._mutex.release()
            try:
                for oldest in overflow:
                    oldest.expire_early()
            finally:
                self._mutex.acquire()

    def _may_deliver(self) -> bool:
        return self._sock is not None  # the client is not waited for

    def ended(self, error: KoriNetError) -> None:
        super().ended(error)
        self.table.forget(self)


class SessionTable:
    """The sessions of the blocking ``server(conn)`` calls that share it (one per
    distinct ``tls`` and ``passphrase``), and the handshake that admits a client.

    Args:
        plugins: plugin manager (default: installed plugins).
        config: session limits and timings for every session.
        tls: serve TLS 1.3 with this identity (:class:`~korinet.security.ServerTLS`);
            if it lists authorized keys, admit only those clients. Its context is
            built once, for every connection the table adopts.
        authorized: admit only TLS clients whose key is listed there (given ``tls``,
            its own list is used).
        passphrase: admit only clients that prove this passphrase (legacy v2
            clients cannot, so they are refused).
        session_ttl: seconds a detached session is kept for its client to resume.
        max_sessions: sessions kept at once; beyond, new clients are told to retry later.
        max_detached: detached sessions kept at once (each has its background
            thread); beyond, the one detached longest is expired early.
        accept_plain: accept untyped messages into the inbox.
        legacy: serve peers speaking the original v2 wire.
    """

    def __init__(
        self,
        *,
        plugins: PluginManager | None = None,
        config: SessionConfig | None = None,
        tls: ServerTLS | None = None,
        authorized: AuthorizedKeys | None = None,
        passphrase: str | None = None,
        session_ttl: float = 120.0,
        max_sessions: int = 20000,
        max_detached: int = 10000,
        accept_plain: bool = True,
        legacy: bool = True,
    ) -> None:
        if tls is not None and authorized is not None:
            raise ValueError("give tls= (it carries its authorized keys) or authorized=, not both")
        self.tls = tls
        if tls is not None:
            authorized = tls.authorized
        #: what adopt() serves TLS with when not given a context of its own
        self.ssl_context = tls.context() if tls is not None else None
        self.plugins = plugins or default_manager()
        self.codecs = self.plugins.codecs()
        self.plugins.message_types()  # conflicts surface now, not on the first message
        self.config = config or SessionConfig()
        self.authorized = authorized
        # derived once (scrypt): an unauthenticated client never makes the server run it
        self._passphrase = PassphraseVerifier(passphrase) if passphrase is not None else None
        self.session_ttl = session_ttl
        self.max_sessions = max_sessions
        self.accept_plain = accept_plain
        self.legacy = legacy
        self._codec_names = server_codecs(self.config, self.codecs)
        self._lock = threading.Lock()  # the table and the failure counts; never held across I/O
        self.sessions: dict[str, SyncServerSession] = {}
        #: the sessions without a link, the one detached longest first
        self.detached: DetachedSessions[SyncServerSession] = DetachedSessions(max_detached, logger)
        self._auth_failures = AuthFailures(logger)

    def forget(self, handle: SyncServerSession) -> None:
        """A session ended: off the table."""
        with self._lock:
            self.detached.forget(handle)
            sid = handle.session_id
            if sid is not None and self.sessions.get(sid) is handle:
                del self.sessions[sid]

    # -------------------------------------------------------------- the handshake

    def adopt(
        self, sock: socket.socket, ssl: ssl_module.SSLContext | None = None
    ) -> tuple[SyncServerSession | SyncLegacyPeer, int | None]:
        """Run the server handshake on an accepted socket, within the handshake timeout.

        ``ssl`` (default: the table's own ``tls``, if any) serves TLS; with neither,
        plaintext. Returns the session (new or resumed) and the link it now runs on,
        or a v2 peer and None. The socket is the session's from then on.

        Raises:
            AuthenticationError: the client was refused (answered at once).
            ConnectionClosedError: the handshake failed, or (code TRY_AGAIN_LATER) the
                client's address failed to authenticate too recently to try again:
                the socket was closed at once. The socket is closed.
            NegotiationError, RemoteProtocolError, OSError: the handshake failed; the
                socket is closed.
        """
        deadline = time.monotonic() + self.config.handshake_timeout
        try:
            name = sock.getpeername()
        except OSError:  # reset before we looked
            sock.close()
            raise
        peername = f"{name[0]}:{name[1]}" if isinstance(name, tuple) else str(name)
        address = str(name[0]) if isinstance(name, tuple) else str(name)
        with self._lock:
            wait = self._auth_failures.retry_in(address, time.monotonic())
        if wait:
            # Before any TLS or handshake work, and without a CLOSE (we cannot know
            # yet whether the peer reads one): the guesser waits out its delay, not
            # this thread, which may be the application's accept loop.
            reason = f"too many failed authentications from {address}, retry in {math.ceil(wait)} s"
            logger.info("%s: refused: %s", peername, reason)
            sock.close()
            self._refused(peername, CloseCode.TRY_AGAIN_LATER, reason)
            raise ConnectionClosedError(CloseCode.TRY_AGAIN_LATER, reason)
        # (the socket is the session's only once the handshake succeeds: else closed)
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # small frames must not wait for the peer's delayed ACK
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _HandshakeLink(sock)
            if ssl is None:
                ssl = self.ssl_context
            if ssl is not None:
                try:
                    link.engine, link.early = tls_handshake(sock, TLS(ssl, server_side=True), deadline)
                except TimeoutError:
                    self._refused(peername, CloseCode.HANDSHAKE_TIMEOUT, "no TLS handshake in time")
                    raise ConnectionAbortedError(
                        f"TLS handshake not done within {self.config.handshake_timeout:g}s: aborted"
                    ) from None
            return self._handshake(link, deadline, peername, address)
        except BaseException:
            sock.close()
            raise

    def _handshake(
        self, link: _HandshakeLink, deadline: float, peername: str, address: str
    ) -> tuple[SyncServerSession | SyncLegacyPeer, int | None]:
        identity: PeerIdentity | None = None
        refusal: tuple[CloseCode, str] | None = None
        if link.engine is not None:
            if self.authorized is not None:
                identity, reason, fingerprint = authenticate(
                    self.authorized, link.engine.peer_certificate(), peername, logger
                )
                if reason is not None:
                    self._refused(peername, CloseCode.AUTH_FAILED, reason, fingerprint)
                    refusal = (CloseCode.AUTH_FAILED, reason)
                else:
                    with self._lock:
                        self._auth_failures.succeeded(address)
        handshake = ServerHandshake(
            self.config, self._codec_names, legacy=self.legacy, passphrase=self._passphrase
        )
        first = True
        while True:
            data = link.read(deadline)
            if data is None:
                logger.warning(
                    "%s: no handshake within %.1fs, closing", peername, self.config.handshake_timeout
                )
                if refusal is None:
                    self._refused(
                        peername, CloseCode.HANDSHAKE_TIMEOUT, "handshake timeout", fingerprint_of(identity)
                    )
                if handshake.saw_preface:
                    # Only a v3 peer can read a CLOSE; a quiet v2 client would take it for an ack.
                    link.send_quietly(encode_close(CloseCode.HANDSHAKE_TIMEOUT, "handshake timeout"))
                raise ConnectionClosedError(CloseCode.HANDSHAKE_TIMEOUT, "handshake timeout")
            if not data:
                raise ConnectionClosedError(CloseCode.LINK_LOST, "connection lost during the handshake")
            if first and link.engine is None and data[:1] == TLS_HANDSHAKE_RECORD:
                reason = "this server speaks plaintext, not TLS"
                logger.warning("%s: refused: a TLS client at a plaintext server", peername)
                self._refused(
                    peername, CloseCode.PROTOCOL_ERROR, f"a TLS client at a plaintext server ({reason})"
                )
                link.send_quietly(encode_close(CloseCode.PROTOCOL_ERROR, reason))
                raise ConnectionClosedError(CloseCode.PROTOCOL_ERROR, reason)
            first = False
            verdict, out = handshake_step(handshake, data, refusal is not None, peername, logger)
            if verdict is Verdict.WRITE:
                link.send(out)
            elif verdict is not Verdict.WAIT:
                break
        if refusal is not None:
            code, reason = refusal  # (already reported)
            if code == CloseCode.AUTH_FAILED:
                self._refuse(link, peername, address, reason, can_read_close=handshake.saw_preface)
            if handshake.saw_preface:
                link.send_quietly(encode_close(code, reason))
            raise ConnectionClosedError(code, reason)
        if verdict is Verdict.AUTH_FAILED:
            self._refused(peername, CloseCode.AUTH_FAILED, str(handshake.error), fingerprint_of(identity))
            self._refuse(link, peername, address, str(handshake.error))
        if verdict is Verdict.REJECT:
            error = handshake.error or KoriNetError("handshake rejected")
            self._refused(peername, rejection_code(handshake.error), str(error), fingerprint_of(identity))
            link.send_quietly(out)
            raise error
        if verdict is Verdict.LEGACY:
            if link.engine is not None:  # (the original 0.0.1 had no TLS)
                raise ConnectionClosedError(CloseCode.PROTOCOL_ERROR, "not a KoriNet peer (v2 over TLS)")
            link.sock.settimeout(None)
            return SyncLegacyPeer(link.sock, peername, handshake.leftover, self.accept_plain), None
        assert handshake.hello is not None
        if self._passphrase is not None:
            with self._lock:
                self._auth_failures.succeeded(address)
        return self._hello(link, handshake.hello, handshake.leftover, identity, peername, address)

    def _hello(
        self,
        link: _HandshakeLink,
        hello: Hello,
        leftover: bytes,
        identity: PeerIdentity | None,
        peername: str,
        address: str,
    ) -> tuple[SyncServerSession, int]:
        sock, engine = link.sock, link.engine
        with self._lock:
            handle, expired, refusal = find_resumable(self.sessions, hello, identity, peername, logger)
        if refusal is not None:
            self._refused(peername, CloseCode.AUTH_FAILED, refusal, fingerprint_of(identity))
            self._refuse(link, peername, address, refusal)
            raise ConnectionClosedError(CloseCode.AUTH_FAILED, refusal)
        if handle is not None:
            resumed = handle.resume_on(sock, engine, hello, leftover, identity, peername)
            if resumed is not None:
                return handle, resumed
            expired = hello.resume["id"] if hello.resume else None  # it ended meanwhile
        with self._lock:
            full = len(self.sessions) >= self.max_sessions
        if full:
            logger.warning("refusing a new session from %s: %d sessions", peername, len(self.sessions))
            self._refused(peername, CloseCode.TRY_AGAIN_LATER, "too many sessions", fingerprint_of(identity))
            link.send_quietly(encode_close(CloseCode.TRY_AGAIN_LATER, "too many sessions"))
            raise ConnectionClosedError(CloseCode.TRY_AGAIN_LATER, "too many sessions")
        handle = SyncServerSession(self, peername, identity)
        opened = handle.open(sock, engine, hello, leftover, expired)
        sid = handle.session_id
        assert sid is not None
        with self._lock:
            if handle.endpoint.ended is None:
                self.sessions[sid] = handle
        return handle, opened

    def _refused(self, peername: str, code: CloseCode, reason: str, fingerprint: str | None = None) -> None:
        """Tell the plugins that the connection from ``peername`` is refused (hook
        ``korinet_session_refused``, once per refused connection)."""
        await_in_background(self.plugins.session_refused(self, peername, fingerprint, reason, code))

    def _refuse(
        self, link: _HandshakeLink, peername: str, address: str, reason: str, *, can_read_close: bool = True
    ) -> None:
        """Refuse an authentication at once and raise AuthenticationError. The failure's
        delay (:class:`~korinet.serving.AuthFailures`) is served by refusing the
        address's next connections until it has passed (see adopt()): waiting here
        would stall the application's accept loop for everyone."""
        with self._lock:
            self._auth_failures.failed(address, time.monotonic(), peername)
        if can_read_close:
            link.send_quietly(encode_close(CloseCode.AUTH_FAILED, reason))
        raise AuthenticationError(reason)


class _HandshakeLink:
    """An accepted socket during the server handshake, blocking, through its TLS
    state if it has one (then ``early`` holds the plaintext that came with the TLS
    handshake)."""

    __slots__ = ("early", "engine", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.engine: TLSEngine | None = None
        self.early = b""

    def read(self, deadline: float) -> bytes | None:
        """Plaintext before ``deadline`` (b"": the peer closed), or None when it passed."""
        if self.early:
            data, self.early = self.early, b""
            return data
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(HANDSHAKE_READ)
            except TimeoutError:
                return None
            engine = self.engine
            if engine is None or not data:
                return data
            plain, ended = engine.decrypt(memoryview(data))
            out = engine.data_to_send()
            if out:
                self.sock.sendall(out)
            if plain or ended:
                return plain

    def send(self, data: bytes) -> None:
        self.sock.settimeout(HANDSHAKE_WRITE)
        self.sock.sendall(data if self.engine is None else self.engine.encrypt(data))

    def send_quietly(self, data: bytes) -> None:
        """Write a last word (a CLOSE frame) before the socket is closed: best effort."""
        try:
            self.send(data)
        except OSError:  # (ssl.SSLError is one)
            pass
