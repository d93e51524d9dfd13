"""The server side: a Hub (handshakes, the session table, TTLs, limits) and a
Server (a listening socket feeding the Hub).

The Hub is separate so that the blocking ``server(conn)`` facade, which gets
sockets the application accepted itself, shares every rule with ``Server``.

Authentication (docs/SECURITY.md): a Hub given ``authorized`` keys checks the
client certificate of each TLS connection as soon as the TLS handshake is done,
before it reads the HELLO; an unknown or missing key is answered CLOSE 1007
instead of a WELCOME. The identity found becomes ``peer.identity``, and a session
can only be resumed by the identity that opened it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..codecs.base import default_offer
from ..exceptions import AuthenticationError, ConnectionClosedError, KoriNetError, NegotiationError
from ..plugins import PluginManager, default_manager
from ..security.passphrase import PassphraseVerifier
from ..session import (
    SERVER,
    CloseCode,
    HandshakeOutcome,
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

__all__ = ["AnyPeer", "Hub", "Server", "ServerPeer", "serve"]

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
        self._expiry: asyncio.TimerHandle | None = None
        #: restored from the hub's store at start-up (its handler runs on its first resume)
        self.restored = record is not None
        self._handler_pending = False
        if hub.store is not None:
            self._use_store(hub.store, record.key if record is not None else None, record)

    def _on_link_lost(self, error: BaseException) -> None:
        if not self.is_closed:
            self._expiry = self.loop.call_later(self.hub.session_ttl, self._expire)
            self.hub._note_detached(self)

    def _expire(self) -> None:
        if self.conn is None and not self.is_closed:
            logger.info("%r: expired after %.0fs detached", self, self.hub.session_ttl)
            self.session.close(CloseCode.NORMAL, "expired")
            self._finish(ConnectionClosedError(CloseCode.SESSION_UNKNOWN, "session expired"))

    def _resumed_on(self, conn: Connection, hello: Hello, leftover: bytes) -> None:
        self.hub._detached.pop(self, None)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._attach(conn)
        self.peername = conn.peername
        self.session.resume(hello, self.loop.time(), leftover)
        if self._handler_pending:
            # A session restored from the store gets its handler back when its client
            # returns: the handler of the process that crashed died with it.
            self._handler_pending = False
            self.hub._run_handler(self)
        self._process()

    def _on_closed(self, error: KoriNetError) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self.hub._forget(self)


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
        max_connections: connections at once (handshaking or open).
        max_connections_per_address: connections at once from one IP address.
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
        self.max_detached = max_detached
        #: detached sessions, the one detached longest first (a dict keeps insertion order)
        self._detached: dict[ServerPeer, None] = {}
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self._per_address: dict[str, int] = {}
        self._address_of: dict[Connection, str] = {}
        #: failed authentications per address: (count, time of the last one)
        self._auth_failures: dict[str, tuple[int, float]] = {}
        self.legacy = legacy
        self.authorized = authorized
        self.sessions: dict[str, ServerPeer] = {}
        self.connections: set[Connection] = set()
        self._results: dict[Connection, asyncio.Future[AnyPeer]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        pinned = self.config.codecs or default_offer(self.codecs)
        self._codec_names = tuple(n for n in pinned if n in self.codecs) + tuple(
            n for n in self.codecs if n not in pinned
        )
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

    def protocol_factory(self) -> Connection:
        if self._restore_due:
            self.restore_sessions()  # a Hub fed by adopt(), without Server.start()
        return Connection(on_made=self._connection_made)

    def _connection_made(self, conn: Connection) -> None:
        self.connections.add(conn)
        conn.lost.add_done_callback(lambda _: self._connection_gone(conn))
        if len(self.connections) > self.max_connections:
            # Closed without a CLOSE frame: we cannot know yet whether the peer speaks v3
            # or v2 (which would misread one); either way it retries later.
            logger.warning("refusing %s: %d connections open", conn.peername, len(self.connections) - 1)
            self._refused(conn, CloseCode.TRY_AGAIN_LATER, "too many connections")
            conn.abort()
            return
        address = _host_of(conn)
        if self._per_address.get(address, 0) >= self.max_connections_per_address:
            logger.warning(
                "refusing %s: %d connections open from %s", conn.peername, self._per_address[address], address
            )
            self._refused(conn, CloseCode.TRY_AGAIN_LATER, f"too many connections from {address}")
            conn.abort()
            return
        self._per_address[address] = self._per_address.get(address, 0) + 1
        self._address_of[conn] = address
        handshake = ServerHandshake(
            self.config, self._codec_names, legacy=self.legacy, passphrase=self._passphrase
        )
        identity, refusal = self._authenticate(conn)
        conn.on_data = lambda data: self._handshake_data(conn, handshake, data, identity, refusal)
        conn.schedule(
            conn.loop.time() + self.config.handshake_timeout,
            lambda: self._handshake_timeout(conn, handshake, identity, refused=refusal is not None),
        )

    def _connection_gone(self, conn: Connection) -> None:
        self.connections.discard(conn)
        address = self._address_of.pop(conn, None)
        if address is not None:
            left = self._per_address[address] - 1
            if left:
                self._per_address[address] = left
            else:
                del self._per_address[address]
        fut = self._results.pop(conn, None)
        if fut is not None and not fut.done():
            fut.set_exception(
                ConnectionClosedError(CloseCode.LINK_LOST, "connection lost during the handshake")
            )

    def _handshake_timeout(
        self, conn: Connection, handshake: ServerHandshake, identity: PeerIdentity | None, *, refused: bool
    ) -> None:
        logger.warning("%s: no handshake within %.1fs, closing", conn.peername, self.config.handshake_timeout)
        if not refused:  # else already reported, with its real reason, by _authenticate
            self._refused(conn, CloseCode.HANDSHAKE_TIMEOUT, "handshake timeout", _fingerprint(identity))
        if handshake.saw_preface:
            # Only a v3 peer can read a CLOSE; a quiet v2 client would take it for an ack.
            conn.write(encode_close(CloseCode.HANDSHAKE_TIMEOUT, "handshake timeout"))
        conn.close()

    def _authenticate(self, conn: Connection) -> tuple[PeerIdentity | None, str | None]:
        """Check the client's certificate against the authorized keys, right after the
        TLS handshake. Returns the identity, or the reason to refuse the client."""
        if self.authorized is None:
            return None, None
        from ..security.tls import peer_fingerprint  # TLS users only pay for cryptography

        try:
            fingerprint = peer_fingerprint(conn.transport)
        except ValueError:  # OpenSSL accepted it, so this should not happen
            fingerprint = None
        if fingerprint is None:
            logger.warning("%s: refused: no client certificate", conn.peername)
            reason = (
                "this server admits only authorized keys, and the client presented none "
                "(connect with TLS and an identity)"
            )
            self._refused(conn, CloseCode.AUTH_FAILED, reason)
            return None, reason
        entry = self.authorized.lookup(fingerprint)
        if entry is None:
            logger.warning("%s: refused: key %s is not authorized", conn.peername, fingerprint)
            reason = (
                f"key {fingerprint} is not authorized on this server "
                f"(its operator can run: korinet authorize {fingerprint} --name NAME)"
            )
            self._refused(conn, CloseCode.AUTH_FAILED, reason, fingerprint)
            return None, reason
        logger.info("%s: authenticated as %s (%s)", conn.peername, entry.name, fingerprint)
        self._auth_failures.pop(_host_of(conn), None)  # a success clears the address
        return entry.identity(), None

    def _refused(
        self, conn: Connection, code: CloseCode, reason: str, fingerprint: str | None = None
    ) -> None:
        """Tell the plugins that ``conn`` is refused (hook ``korinet_session_refused``).
        Called once per refused connection, where the refusal is decided."""
        for guarded in self.plugins.session_refused(self, conn.peername, fingerprint, reason, code):
            self._spawn(guarded.run())

    def _refuse(self, conn: Connection, reason: str, *, can_read_close: bool = True) -> None:
        """Refuse an authentication, after a delay that doubles with every failure from
        the same address (reset by a success, forgotten after AUTH_FAILURE_MEMORY):
        with the per-address connection limit, it bounds the rate of guesses."""
        address = _host_of(conn)
        now = conn.loop.time()
        count, last = self._auth_failures.get(address, (0, now))
        if now - last > AUTH_FAILURE_MEMORY:
            count = 0
        self._auth_failures[address] = (count + 1, now)
        delay = min(AUTH_DELAY_FIRST * 2 ** (count - 1), AUTH_DELAY_MAX) if count else 0.0
        if delay:
            logger.warning("%s: failed authentication #%d from %s, answering in %.1fs", conn.peername,
                           count + 1, address, delay)  # fmt: skip

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
        refusal: str | None = None,
    ) -> None:
        outcome = handshake.receive_data(data)
        if outcome is HandshakeOutcome.NEED_DATA:
            challenge = handshake.data_to_send()  # a passphrase CHALLENGE after the HELLO
            if not challenge:
                return
            if refusal is None:
                conn.write(challenge)
                return
            # else the HELLO is in: refuse now (below), the client can read our CLOSE
        conn.cancel_timer()
        conn.on_data = None
        if refusal is not None:
            # Refused before anything of the HELLO is acted on. We waited for it only so
            # that the client reads our CLOSE (written earlier, it could be lost to the
            # reset that its late HELLO would cause on a closed socket). Already reported.
            self._refuse(conn, refusal, can_read_close=handshake.saw_preface)
        elif outcome is HandshakeOutcome.REJECTED and isinstance(handshake.error, AuthenticationError):
            logger.warning("%s: refused: %s", conn.peername, handshake.error)
            self._refused(conn, CloseCode.AUTH_FAILED, str(handshake.error), _fingerprint(identity))
            self._refuse(conn, str(handshake.error))
        elif outcome is HandshakeOutcome.REJECTED:
            logger.warning("%s: handshake rejected: %s", conn.peername, handshake.error)
            self._refused(
                conn, _rejection_code(handshake.error), str(handshake.error), _fingerprint(identity)
            )
            conn.write(handshake.data_to_send())
            conn.close()
            self._fail_result(conn, handshake.error or KoriNetError("handshake rejected"))
        elif outcome is HandshakeOutcome.LEGACY:
            logger.info("%s: speaks the legacy v2 wire", conn.peername)
            legacy = LegacyPeer(conn, self.accept_plain)
            self._set_result(conn, legacy)
            legacy.receive_data(handshake.leftover)
            if self.handler is not None:
                self._run_handler(legacy)
        else:
            assert handshake.hello is not None
            if self._passphrase is not None:
                self._auth_failures.pop(_host_of(conn), None)  # a success clears the address
            self._hello(conn, handshake.hello, handshake.leftover, identity)

    def _hello(
        self, conn: Connection, hello: Hello, leftover: bytes, identity: PeerIdentity | None = None
    ) -> None:
        resume = hello.resume
        expired = None
        if resume is not None:
            peer = self.sessions.get(resume["id"])
            if (
                peer is not None
                and peer.session.token is not None
                and hmac.compare_digest(peer.session.token, resume["token"])
                and peer.session.codec is not None
                and peer.session.codec.name in hello.codecs
            ):
                if _fingerprint(peer.identity) != _fingerprint(identity):
                    # A resume token is bound to the identity that opened the session:
                    # a stolen one is useless to anyone else (docs/SECURITY.md).
                    logger.warning(
                        "%s: refused: %s presented the resume token of %r, which belongs to %s",
                        conn.peername,
                        _fingerprint(identity) or "an anonymous client",
                        peer,
                        _fingerprint(peer.identity) or "an anonymous client",
                    )
                    reason = "this session belongs to another identity"
                    self._refused(conn, CloseCode.AUTH_FAILED, reason, _fingerprint(identity))
                    self._refuse(conn, reason)
                    return
                peer.identity = identity  # the same key, with the roles the file gives now
                logger.debug("%s: resumes %r", conn.peername, peer)
                peer._resumed_on(conn, hello, leftover)
                self._set_result(conn, peer)
                return
            expired = resume["id"]
            logger.info("%s: asked to resume unknown session %s", conn.peername, expired)
        if len(self.sessions) >= self.max_sessions:
            logger.warning("refusing a new session from %s: %d sessions", conn.peername, len(self.sessions))
            self._refused(conn, CloseCode.TRY_AGAIN_LATER, "too many sessions", _fingerprint(identity))
            conn.write(encode_close(CloseCode.TRY_AGAIN_LATER, "too many sessions"))
            conn.close()
            return
        session = Session(SERVER, self.codecs, self.config)
        peer = ServerPeer(self, session, conn.peername, identity)
        peer._attach(conn)
        session.accept(hello, conn.loop.time(), b"", expired=expired)
        assert session.session_id is not None
        self.sessions[session.session_id] = peer
        self._set_result(conn, peer)
        if self.handler is not None:
            self._run_handler(peer)
        peer._process()
        if leftover:
            peer._link_data(conn, leftover)

    def _set_result(self, conn: Connection, peer: AnyPeer) -> None:
        fut = self._results.pop(conn, None)
        if fut is not None and not fut.done():
            fut.set_result(peer)

    def _fail_result(self, conn: Connection, error: BaseException) -> None:
        fut = self._results.pop(conn, None)
        if fut is not None and not fut.done():
            fut.set_exception(error)

    def _note_detached(self, peer: ServerPeer) -> None:
        self._detached[peer] = None
        while len(self._detached) > self.max_detached:
            oldest = next(iter(self._detached))
            del self._detached[oldest]
            logger.warning(
                "%r: expired early: more than %d detached sessions (max_detached)", oldest, self.max_detached
            )
            oldest._expire()

    def _forget(self, peer: ServerPeer) -> None:
        self._detached.pop(peer, None)
        if peer.session_id is not None and self.sessions.get(peer.session_id) is peer:
            del self.sessions[peer.session_id]

    def _run_handler(self, peer: AnyPeer) -> None:
        self._spawn(self._handle(peer))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    async def adopt(self, sock: socket.socket, ssl: ssl_module.SSLContext | None = None) -> AnyPeer:
        """Run the handshake on a socket accepted elsewhere; return its peer (a new
        session, a resumed one, or a legacy peer)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[AnyPeer] = loop.create_future()
        holder: list[Connection] = []

        def factory() -> Connection:
            conn = self.protocol_factory()
            self._results[conn] = fut
            holder.append(conn)
            return conn

        await loop.connect_accepted_socket(factory, sock, ssl=ssl)
        return await fut

    async def close(self) -> None:
        """Drop every connection and forget every session (as a crash would, minus
        the crash: clients learn on reconnect that their session is gone). With a
        store, the sessions stay in it: a hub started again with it resumes them."""
        for conn in list(self.connections):
            conn.abort()
        for peer in list(self.sessions.values()):
            peer._keep_stored = True
            peer._finish(ConnectionClosedError(CloseCode.GOING_AWAY, "server stopped"))
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
        self._server: asyncio.base_events.Server | None = None

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
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> Server:
        loop = asyncio.get_running_loop()
        self.hub.restore_sessions()  # before the first client can ask to resume
        self._server = await loop.create_server(
            self.hub.protocol_factory,
            self.host,
            self.requested_port,
            ssl=self.ssl,
            backlog=self.backlog,
            reuse_address=True,
        )
        logger.info(
            "listening on %s:%d (%s)",
            self.host,
            self.port,
            f"TLS 1.3, key {self.fingerprint}" if self.tls else ("TLS" if self.ssl else "plaintext"),
        )
        for guarded in self.plugins.server_started(self):
            await guarded.run()
        return self

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.close()

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        await self.hub.close()
        await server.wait_closed()
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


def _fingerprint(identity: Any) -> str | None:
    return getattr(identity, "fingerprint", None)


def _rejection_code(error: KoriNetError | None) -> CloseCode:
    """The CLOSE code ServerHandshake sent with a rejection that is not an
    authentication failure (it keeps only the bytes)."""
    if isinstance(error, NegotiationError):
        return CloseCode.UNSUPPORTED_CODEC if error.what == "codec" else CloseCode.UNSUPPORTED_VERSION
    return CloseCode.PROTOCOL_ERROR


#: The delay after a second failed authentication from one address; it doubles after
#: each further one, up to AUTH_DELAY_MAX.
AUTH_DELAY_FIRST = 0.5
AUTH_DELAY_MAX = 30.0
#: Failures older than this (seconds) are forgotten.
AUTH_FAILURE_MEMORY = 600.0


def _host_of(conn: Connection) -> str:
    if conn.transport is None:
        return "?"
    name = conn.transport.get_extra_info("peername")
    return str(name[0]) if isinstance(name, tuple) and name else str(name)
