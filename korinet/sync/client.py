"""SyncClient: a blocking client that drives the sans-I/O Session in the caller's thread.

The I/O, the threads and the locks are those of every blocking driver
(:mod:`korinet.sync.driver`); this module adds what only a client does: dial the
server (TCP, then TLS with the server's key checked against its pin before the
HELLO), and, when the link is lost, reconnect after the delays of
:class:`korinet.reconnect.Reconnect` (restarted after every successful handshake),
by whichever thread leads, until the outage limit. Delays are spent in ``poll()``
on the wake-up pair, so a hand-over or ``close()`` interrupts them.
"""

from __future__ import annotations

import logging
import socket
import ssl as ssl_module
import time
from typing import TYPE_CHECKING, Any

from ..endpoint import Endpoint
from ..exceptions import AuthenticationError, KoriNetError, KoriNetTimeout
from ..plugins import PluginManager, default_manager
from ..reconnect import Reconnect, Reconnecting, fatal_error
from ..security.tlsbio import TLS, TLSEngine
from ..session import CLIENT, LinkOpened, Session, SessionConfig
from .driver import SyncDriver, tls_handshake

if TYPE_CHECKING:
    from ..security import ClientTLS

__all__ = ["DEFAULT_PORT", "SyncClient", "connect"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 1235  # the original KoriNet examples' port (as korinet.runtime.client)


class SyncClient(SyncDriver, Reconnecting):
    """A blocking, reconnecting KoriNet client (see the module docstring).

    Args:
        host, port: the server.
        timeout: seconds each ``send()`` may wait for its acknowledgement (None:
            forever). A send that times out raises KoriNetTimeout; its message stays
            queued and is delivered exactly once when the link returns.
        open_timeout: seconds the first connection may take.
        config: session limits and timings.
        plugins: the plugin manager (default: installed plugins).
        tls: TLS 1.3 with server pinning and, given an identity, mutual TLS
            (:class:`~korinet.security.ClientTLS`), as the asyncio Client: the
            server's key is checked before the HELLO, on every connection; a
            mismatch ends the session. None is plaintext.
        ssl: a ready ``ssl.SSLContext`` instead of ``tls`` (its own verification).
        server_hostname: the name TLS verifies (default: ``host``).
        connect_timeout: seconds allowed for one TCP (and TLS) connect attempt.
        backoff_cap: the longest wait between reconnection attempts (seconds).
        outage_limit: give up (the session ends with KoriNetTimeout) after this many
            seconds without a link; None retries forever.
        passphrase: prove this pre-shared passphrase by challenge-response, and
            require the server to prove it back (docs/PROTOCOL.md §3.4).

    Raises (from the constructor):
        KoriNetTimeout: no session within ``open_timeout`` (the last error chained).
        NegotiationError, AuthenticationError, ConnectionClosed: the server refused us.
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        timeout: float | None = None,
        open_timeout: float | None = 10.0,
        config: SessionConfig | None = None,
        plugins: PluginManager | None = None,
        tls: ClientTLS | None = None,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 5.0,
        backoff_cap: float = 5.0,
        outage_limit: float | None = None,
        passphrase: str | None = None,
    ) -> None:
        if tls is not None:
            if ssl is not None:
                raise ValueError("give tls= or ssl=, not both")
            ssl = tls.context()
        self.host, self.port = host, port
        self.timeout = timeout
        self.plugins = plugins or default_manager()
        self.session = Session(CLIENT, self.plugins.codecs(), config, passphrase=passphrase)
        # identity: who the server is, its pinned key with ``tls``, else None
        self.endpoint = Endpoint(self.session, self.plugins, self, self)
        self.tls = tls
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.connect_timeout = connect_timeout
        self.reconnect = Reconnect(f"{host}:{port}", cap=backoff_cap, outage_limit=outage_limit)
        self._retry_at = 0.0
        self._init_driver()

        deadline = None if open_timeout is None else time.monotonic() + open_timeout
        try:
            with self._mutex:
                self._wait(
                    lambda: self.links_opened > 0 or self.endpoint.ended is not None,
                    deadline,
                    "opening the session",
                )
                if self.endpoint.ended is not None:
                    raise self.endpoint.ended
        except KoriNetTimeout:
            last = self.last_error
            self._abort()
            raise KoriNetTimeout(
                f"could not open a session with {host}:{port} within {open_timeout}s"
                + (f" (last error: {last})" if last else "")
            ) from last
        except BaseException:
            self._abort()
            raise
        self._start_background(f"korinet-sync-{host}:{port}")

    def __repr__(self) -> str:
        return f"<SyncClient {self.host}:{self.port} {self.session.session_id} {self.session.state.name}>"

    # ------------------------------------------------------------------ the link

    def _link_step(self, now: float, deadline: float | None) -> None:
        """(mutex held, leader, no link) Wait out the backoff delay, or dial once."""
        if self._retry_at > now:
            until = self._retry_at if deadline is None else min(self._retry_at, deadline)
            self._idle_poll(until - now)
            return
        self.reconnect.attempts += 1
        limit = self.connect_timeout
        if deadline is not None and self._leader != self._bg_ident:  # (the caller's deadline)
            limit = min(limit, deadline - now)
        sock: socket.socket | None = None
        engine: TLSEngine | None = None
        early = b""
        error: BaseException | None = None
        self._mutex.release()
        try:
            sock, engine, early = self._open_socket(max(limit, 0.001))
        except (OSError, TimeoutError, AuthenticationError) as exc:  # ssl.SSLError is an OSError
            error = exc
        finally:
            self._mutex.acquire()
        if sock is None:
            assert error is not None
            self.last_error = error
            fatal = fatal_error(error, f"{self.host}:{self.port}")
            if fatal is not None:  # retrying cannot help
                self.last_error = fatal
                self.endpoint.finish(fatal)
            else:
                self._schedule_retry(opened=False)
            return
        if self.endpoint.ended is not None:
            sock.close()
            return
        try:
            self.session.connection_made(time.monotonic())
        except KoriNetError as exc:  # the session ended meanwhile
            sock.close()
            self.last_error = exc
            return
        self._install_socket(sock, engine)
        self._flush()  # the preface and HELLO
        if early:  # (a server speaks after our HELLO; the session judges what came before)
            self.session.receive_data(early, time.monotonic())
            self._after_input()

    def _open_socket(self, timeout: float) -> tuple[socket.socket, TLSEngine | None, bytes]:
        """Connect (TCP_NODELAY; TLS, and the server's key checked against the pin,
        before anything is sent, which sets :attr:`identity`); blocking, bounded by
        ``timeout``. Returns the socket, its TLS state, and any plaintext already in."""
        deadline = time.monotonic() + timeout
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            engine, early = None, b""
            if self.ssl is not None:
                tls = TLS(self.ssl, server_side=False, server_hostname=self.server_hostname or self.host)
                engine, early = tls_handshake(sock, tls, deadline)
                if self.tls is not None:
                    self.identity = self.tls.check_server(self.host, self.port, engine.peer_certificate())
        except BaseException:
            sock.close()
            raise
        return sock, engine, early

    def _schedule_retry(self, *, opened: bool) -> None:
        """(mutex held) After a failed attempt or a lost link: when to dial next."""
        now = time.monotonic()
        delay = self.reconnect.next_delay(opened, now)
        if isinstance(delay, KoriNetError):
            self.endpoint.finish(delay)
            return
        if delay:
            logger.debug("%r: reconnecting in %.2fs", self, delay)
        self._retry_at = now + delay

    def link_opened(self, ev: LinkOpened) -> None:
        super().link_opened(ev)
        self.reconnect.opened()
        self._retry_at = 0.0

    def _on_link_lost(self, exc: BaseException | None, opened: bool) -> None:
        if exc is not None:
            self.last_error = exc
        if self.endpoint.ended is None:
            self._schedule_retry(opened=opened)


def connect(host: str, port: int = DEFAULT_PORT, **kwargs: Any) -> SyncClient:
    """Shortcut for :class:`SyncClient` (``with connect(host, port) as client: ...``)."""
    return SyncClient(host, port, **kwargs)
