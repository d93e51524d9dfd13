"""The reconnecting client (docs/ARCHITECTURE.md, "Client").

``await Client.connect(host, port)`` returns once the first handshake is done.
From then on a background task keeps the session linked: when the connection
drops it reconnects at once, then with growing jittered delays, and the session
resumes where it was. Errors that retrying cannot fix (no common version, bad
credentials, a protocol violation) end the session instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
from typing import TYPE_CHECKING, Any

from ..exceptions import AuthenticationError, ConnectionClosedError, KoriNetError, KoriNetTimeout
from ..plugins import PluginManager, default_manager
from ..reconnect import Reconnect, Reconnecting, fatal_error
from ..session import CLIENT, CloseCode, Session, SessionConfig
from .connection import Connection
from .peer import Peer
from .store import CLIENT_KEY, SessionStore

if TYPE_CHECKING:
    import os

    from ..security import ClientTLS
    from .tlslink import TLS

__all__ = ["DEFAULT_PORT", "Client", "connect"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 1235  # the original KoriNet examples' port


class Client(Peer, Reconnecting):
    """A Peer that dials, and redials, one server.

    Args:
        host, port: the server.
        config: session limits and timings.
        plugins: the plugin manager (default: installed plugins).
        tls: TLS 1.3 with server pinning and, given an identity, mutual TLS
            (:class:`~korinet.security.ClientTLS`); None is plaintext. The server's
            key is checked before the HELLO is sent, on every connection; a
            mismatch ends the session (``HostKeyChanged``).
        ssl: a ready ``ssl.SSLContext`` instead of ``tls`` (its own verification,
            no pinning).
        connect_timeout: seconds allowed for one TCP connect attempt.
        backoff_cap: the longest wait between reconnection attempts (seconds); lower
            it where a link that comes back must be used again within that time.
        outage_limit: give up (session ends with KoriNetTimeout) after this many
            seconds without a link; None retries forever.
        passphrase: prove this pre-shared passphrase to the server by
            challenge-response, and require the server to prove it back
            (docs/PROTOCOL.md §3.4); a wrong one ends the session
            (``AuthenticationError``).
        store: a file (or :class:`~korinet.runtime.store.SessionStore`) keeping the
            session across a crash of this process: a client started again with it
            resumes the same session, and every message it had accepted is
            delivered exactly once (docs/ARCHITECTURE.md, "Durable sessions").
    """

    # made on first use (class defaults until then: see Peer's)
    _tls_settings: TLS | None = None
    _own_store: SessionStore | None = None

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        config: SessionConfig | None = None,
        plugins: PluginManager | None = None,
        tls: ClientTLS | None = None,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 5.0,
        backoff_cap: float = 5.0,
        outage_limit: float | None = None,
        passphrase: str | None = None,
        store: str | os.PathLike[str] | SessionStore | None = None,
    ) -> None:
        if tls is not None:
            if ssl is not None:
                raise ValueError("give tls= or ssl=, not both")
            ssl = tls.context()
        plugins = plugins or default_manager()
        session = Session(CLIENT, plugins.codecs(), config, passphrase=passphrase)
        super().__init__(session, plugins)
        self.host, self.port = host, port
        self.tls = tls
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.connect_timeout = connect_timeout
        self.reconnect = Reconnect(f"{host}:{port}", cap=backoff_cap, outage_limit=outage_limit)
        self._runner: asyncio.Task[None] | None = None
        self._link_down = asyncio.Event()
        self._wake = asyncio.Event()
        if store is not None:
            self._open_store(store)

    def __repr__(self) -> str:
        return f"<Client {self.host}:{self.port} {self.session.session_id} {self.session.state.name}>"

    @classmethod
    async def connect(
        cls, host: str, port: int = DEFAULT_PORT, *, open_timeout: float | None = 10.0, **kwargs: Any
    ) -> Client:
        """Create a client and wait for its first handshake.

        Raises:
            KoriNetTimeout: no session within ``open_timeout`` (the last error is chained).
            NegotiationError, AuthenticationError, ConnectionClosed: the server refused us.
        """
        self = cls(host, port, **kwargs)
        self.start()
        try:
            await self.wait_connected(open_timeout)
            # wait_connected also returns when the session ended (refused: bad key,
            # no common version...): that is an error here, not a session.
            self._raise_if_closed()
        except KoriNetTimeout:
            last = self.last_error
            await self.abort()
            raise KoriNetTimeout(
                f"could not open a session with {host}:{port} within {open_timeout}s"
                + (f" (last error: {last})" if last else "")
            ) from last
        except BaseException:
            await self.abort()
            raise
        return self

    def reconnect_now(self) -> None:
        """Cut the current wait between reconnection attempts short: the caller knows
        the server is back (it announced itself, say). Does nothing while linked."""
        self._wake.set()

    def start(self) -> None:
        if self._runner is None:
            self._runner = self.loop.create_task(self._run(), name=f"korinet-client-{self.host}:{self.port}")

    async def abort(self) -> None:
        """Stop at once, without a CLOSE: the server keeps the session until its TTL,
        and a store keeps it too, for a client started again with it to resume."""
        self.keep_stored = True
        self.finish(ConnectionClosedError(CloseCode.LINK_LOST, "client aborted"))
        if self.conn is not None:
            self.conn.abort()
        await self._stop_runner()
        self._close_store()

    async def close(self, reason: str = "", *, timeout: float = 5.0) -> None:
        """End the session (see :meth:`Peer.close`); a store forgets it."""
        await super().close(reason, timeout=timeout)
        await self._stop_runner()
        self._close_store()

    def _open_store(self, store: str | os.PathLike[str] | SessionStore) -> None:
        if not isinstance(store, SessionStore):
            store = self._own_store = SessionStore(store)
        record = store.load(CLIENT_KEY)
        try:
            self._use_store(store, CLIENT_KEY, record)
        except KeyError as exc:  # a codec that this process lacks
            logger.warning("%r: cannot resume the stored session (no codec %s): a new one", self, exc)
            self._use_store(store, CLIENT_KEY, None)
        if record is not None:
            logger.info(
                "%r: restored from %s with %d message(s) to deliver", self, store.path, self.session.unacked
            )

    def _close_store(self) -> None:
        store, self._own_store = self._own_store, None
        if store is not None:
            store.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _stop_runner(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None and runner is not asyncio.current_task():
            runner.cancel()
            try:
                await runner
            except asyncio.CancelledError:
                pass

    def _on_link_lost(self, error: BaseException) -> None:
        self.last_error = error
        self._link_down.set()

    async def _run(self) -> None:
        policy = self.reconnect
        while not self.is_closed:
            opened = await self._one_link()
            if self.is_closed:
                return
            if opened:
                self._wake.clear()  # a nudge from before this outage is stale
            delay = policy.next_delay(opened, self.loop.time())
            if isinstance(delay, KoriNetError):
                self.finish(delay)
                return
            if delay:
                logger.debug("%r: reconnecting in %.2fs", self, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                if self._wake.is_set():
                    logger.debug("%r: reconnecting now (nudged)", self)
                self._wake.clear()

    async def _one_link(self) -> bool:
        """Connect, run the link until it drops; return whether a handshake completed."""
        self.reconnect.attempts += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn = await self._open()
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError) and not str(exc):  # say what took too long
                exc = TimeoutError(
                    f"no answer from {self.host}:{self.port} within {self.connect_timeout:g}s"
                    + (" (TCP connect and TLS handshake)" if self.ssl else " (TCP connect)")
                )
            self._attempt_failed(exc)
            return False
        if conn.lost.done():
            # Reset between connect and here: no peer was attached to hear it, so
            # waiting for the link to drop would wait forever.
            self.last_error = conn.lost.result() or ConnectionResetError("the connection dropped at once")
            return False
        if self.tls is not None:
            try:
                self._verify_server(conn)
            except AuthenticationError as exc:
                conn.abort()
                self._attempt_failed(exc)
                return False
        self._link_down.clear()
        self.attach(conn)
        try:
            self.session.connection_made(self.loop.time())
        except KoriNetError as exc:  # the session ended meanwhile
            conn.abort()
            self.last_error = exc
            return False
        opened_before = self.links_opened
        self.process()
        await self._link_down.wait()
        if conn.lost.done() and conn.lost.result() is not None:
            self.last_error = conn.lost.result()
        return self.links_opened > opened_before

    def _attempt_failed(self, exc: BaseException) -> None:
        self.last_error = exc
        fatal = fatal_error(exc, f"{self.host}:{self.port}")
        if fatal is not None:  # retrying cannot help
            self.last_error = fatal
            self.finish(fatal)

    async def _open(self) -> Connection:
        """A TCP connection to the server, TLS done (run by the Connection itself)."""
        if self.ssl is not None and self._tls_settings is None:
            from .tlslink import TLS  # plaintext clients do not import it

            # As asyncio: the name sent (SNI) is the host's unless told otherwise.
            self._tls_settings = TLS(
                self.ssl, server_side=False, server_hostname=self.server_hostname or self.host
            )
        tls = self._tls_settings
        _, conn = await self.loop.create_connection(lambda: Connection(tls=tls), self.host, self.port)
        if conn.secured is not None:
            try:
                await asyncio.shield(conn.secured)
            except BaseException:  # a TLS failure, or too slow (cancelled)
                conn.abort()
                raise
        return conn

    def _verify_server(self, conn: Connection) -> None:
        """Check the server's key against the pin before anything is sent: sets
        :attr:`identity` to the server's."""
        from ..security.tls import peer_certificate

        assert self.tls is not None
        self.identity = self.tls.check_server(self.host, self.port, peer_certificate(conn.transport))


async def connect(host: str, port: int = DEFAULT_PORT, **kwargs: Any) -> Client:
    """Shortcut for :meth:`Client.connect`."""
    return await Client.connect(host, port, **kwargs)
