"""The original blocking API: ``server(conn)`` on a socket you accepted.

It runs in the caller's thread, with no event loop on its path: the handshake, and
then every ``recv()`` and ``send()``, read and write the socket in the calling thread
(:mod:`korinet.sync.server`), and a background thread answers heartbeats while the
application is busy elsewhere.

Every ``server(conn)`` in a process shares one session table, so when a client
comes back on a new socket, the next ``server(conn)`` continues its session: what
it had not received is replayed, nothing twice. A peer speaking the original v2
wire is served the way v2 expects.

Plaintext by default, as the original; ``tls=`` (a :class:`~korinet.security.ServerTLS`)
serves TLS 1.3 with the server's identity and, if it lists authorized keys, admits
only those clients; ``passphrase=`` admits only clients that prove it. Each distinct
``(tls, passphrase)`` pair has its own session table. For other limits (how many
sessions, how long a detached one waits, the session config), build a
:class:`~korinet.sync.SessionTable` and pass it as ``table=`` to every ``server(conn)``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
import threading
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from .client import with_id
from .exceptions import ConnectionClosedError
from .session import CloseCode
from .sync.legacy import SyncLegacyPeer
from .sync.server import SessionTable, SyncServerSession

if TYPE_CHECKING:
    from .runtime.server import AnyPeer, Hub
    from .security import ServerTLS

__all__ = ["default_hub", "server"]

T = TypeVar("T")

#: one session table per (id of the ServerTLS, passphrase); the table keeps its
#: ServerTLS alive, so that the id stays its own
_tables: dict[tuple[int, str | None], SessionTable] = {}
_tables_lock = threading.Lock()


def _table(tls: ServerTLS | None = None, passphrase: str | None = None) -> SessionTable:
    key = (id(tls), passphrase)
    with _tables_lock:
        if key not in _tables:
            _tables[key] = SessionTable(tls=tls, passphrase=passphrase)
        return _tables[key]


def default_hub() -> SessionTable:
    """The session table shared by every plaintext ``server(conn)`` of this process.

    It is a blocking :class:`~korinet.sync.server.SessionTable` (its ``sessions``
    maps session ids to sessions), no longer an asyncio Hub: give ``server(conn,
    hub=...)`` a :class:`~korinet.runtime.Hub` of your own to serve on asyncio.
    """
    return _table()


class server:  # noqa: N801 - the original API's name
    """Serve one client connection (blocking, in the caller's thread).

    ``recv()`` and ``send()`` raise :class:`~korinet.ConnectionClosedError` when this
    connection drops; the session waits (its TTL) for the client to reconnect, and
    the next ``server(conn)`` continues it (from then on this object's calls raise
    that error at once). A ``send()`` interrupted this way is not lost: it is
    delivered when the session resumes.

    Args:
        conn: an accepted socket (taken over: do not use it afterwards).
        tls: serve TLS 1.3 (:class:`~korinet.security.ServerTLS`); pass the same
            object to every ``server(conn)`` so that they share one session table.
        passphrase: admit only clients that prove this passphrase.
        ssl: a ready ``ssl.SSLContext`` instead of ``tls`` (no client authentication).
        table: a :class:`~korinet.sync.SessionTable` of your own instead of the shared
            one, with its limits (``max_sessions``, ``session_ttl``, ``config``...)
            and its own ``tls`` and ``passphrase``; pass the same table to every
            ``server(conn)`` whose clients may resume each other's sessions.
        hub: an asyncio :class:`~korinet.runtime.Hub` of your own instead of a
            table: the session then runs on KoriNet's loop thread.
    """

    def __init__(
        self,
        conn: socket.socket,
        *,
        tls: ServerTLS | None = None,
        passphrase: str | None = None,
        hub: Hub | None = None,
        ssl: ssl_module.SSLContext | None = None,
        table: SessionTable | None = None,
    ) -> None:
        if tls is not None and ssl is not None:
            raise ValueError("give tls= or ssl=, not both")
        if hub is not None and table is not None:
            raise ValueError("give hub= or table=, not both")
        if (hub is not None or table is not None) and (tls is not None or passphrase is not None):
            which = "hub" if hub is not None else "table"
            raise ValueError(
                f"a {which} of your own carries its own TLS identity, authorized keys and passphrase"
            )
        if table is not None and ssl is not None and table.tls is not None:
            raise ValueError("this table serves its own tls=: give no ssl=")
        # Take the socket over: the driver owns it from now on.
        sock = socket.socket(conn.family, conn.type, conn.proto, fileno=conn.detach())
        self._link: int | None = None
        self._adoption = 0
        if hub is not None:
            sock.setblocking(False)
            self._peer: SyncServerSession | SyncLegacyPeer | AnyPeer = _on_hub(hub, sock, ssl)
            return
        if table is None:
            table = _table(tls, passphrase)
        peer, self._link = table.adopt(sock, ssl)
        self._peer = peer
        if isinstance(peer, SyncServerSession):
            self._adoption = peer.adoptions

    @property
    def peer(self) -> Any:
        """The session underneath (a :class:`~korinet.sync.server.SyncServerSession`,
        a v2 peer, or with ``hub=`` the asyncio peer)."""
        return self._peer

    @property
    def legacy(self) -> bool:
        """Whether the client speaks the original v2 wire."""
        from .runtime.legacy import LegacyPeer

        return isinstance(self._peer, SyncLegacyPeer | LegacyPeer)

    def recv(self, giveID: bool = False, timeout: float | None = None) -> Any:  # noqa: N803
        """Return the next message; with ``giveID`` a dict gains its ``"id"``."""
        peer = self._peer
        if isinstance(peer, SyncServerSession):
            msg = peer.recv_message(timeout, link=self._link)
        elif isinstance(peer, SyncLegacyPeer):
            msg = peer.recv_message(timeout)
        else:
            msg = _run_linked(peer, peer.recv_message(timeout))
        return with_id(msg) if giveID else msg.data

    def send(self, obj: Any, type: str = "") -> None:
        """Send ``obj`` and return once the client's application has it."""
        peer = self._peer
        if isinstance(peer, SyncServerSession):
            peer.send(obj, type, link=self._link)
        elif isinstance(peer, SyncLegacyPeer):
            peer.send(obj, type)
        else:
            _run_linked(peer, peer.send(obj, type))

    def close(self) -> None:
        """End the session (unless a newer ``server(conn)`` has taken it over)."""
        peer = self._peer
        if isinstance(peer, SyncServerSession):
            if peer.adoptions == self._adoption:
                peer.close()
        elif isinstance(peer, SyncLegacyPeer):
            peer.close()
        else:
            from ._loopthread import run

            run(peer.close())


# ---------------------------------------------------------------------- server(conn, hub=Hub)


def _on_hub(hub: Hub, sock: socket.socket, ssl: ssl_module.SSLContext | None) -> AnyPeer:
    """Hand ``sock`` to an asyncio Hub, on KoriNet's loop thread."""
    from ._loopthread import run

    async def adopt() -> AnyPeer:
        return await hub.adopt(sock, ssl)

    return run(adopt())


def _run_linked(peer: AnyPeer, aw: Awaitable[T]) -> T:
    """Run ``aw`` on the loop thread, but give up when the peer's connection drops
    (the session stays)."""
    from ._loopthread import run
    from .runtime.server import ServerPeer

    async def while_linked() -> T:
        task = asyncio.ensure_future(aw)
        if isinstance(peer, ServerPeer):
            conn = peer.conn
            if conn is None:
                lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                lost.set_result(None)
            else:
                lost = conn.lost
            await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                raise ConnectionClosedError(
                    CloseCode.LINK_LOST,
                    "the client's connection dropped; its session waits for it to reconnect",
                )
        return await task

    return run(while_linked())
