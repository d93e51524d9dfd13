"""The original blocking server API: ``server(conn)`` on a socket you accepted.

Every ``server(conn)`` in a process shares one session table, so when a client
comes back on a new socket, the next ``server(conn)`` continues its session: what
it had not received is replayed, nothing twice. A peer speaking the original v2
wire is served the way v2 expects.

Plaintext by default, as the original; ``tls=`` (a :class:`~korinet.security.ServerTLS`)
serves TLS 1.3 with the server's identity and, if it lists authorized keys, admits
only those clients; ``passphrase=`` admits only clients that prove it. Each distinct
``(tls, passphrase)`` pair has its own session table.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from ._loopthread import run
from .client import with_id
from .exceptions import ConnectionClosedError
from .runtime.legacy import LegacyPeer
from .runtime.server import AnyPeer, Hub, ServerPeer
from .session import CloseCode

if TYPE_CHECKING:
    from .security import ServerTLS

__all__ = ["default_hub", "server"]

T = TypeVar("T")

#: one hub (session table) per (id of the ServerTLS, passphrase); the ServerTLS is
#: kept in the value so that its id stays its own
_hubs: dict[tuple[int, str | None], tuple[ServerTLS | None, Hub]] = {}


async def _get_hub(tls: ServerTLS | None = None, passphrase: str | None = None) -> Hub:
    key = (id(tls), passphrase)
    if key not in _hubs:
        authorized = tls.authorized if tls is not None else None
        _hubs[key] = (tls, Hub(authorized=authorized, passphrase=passphrase))
    return _hubs[key][1]


def default_hub() -> Hub:
    """The session table shared by every plaintext ``server(conn)`` of this process."""
    return run(_get_hub())


class server:  # noqa: N801 - the original API's name
    """Serve one client connection (blocking).

    ``recv()`` and ``send()`` raise :class:`~korinet.ConnectionClosedError` when this
    connection drops; the session waits (its TTL) for the client to reconnect, and
    the next ``server(conn)`` continues it. A ``send()`` interrupted this way is not
    lost: it is delivered when the session resumes.

    Args:
        conn: an accepted socket (taken over: do not use it afterwards).
        tls: serve TLS 1.3 (:class:`~korinet.security.ServerTLS`); pass the same
            object to every ``server(conn)`` so that they share one session table.
        passphrase: admit only clients that prove this passphrase.
        ssl: a ready ``ssl.SSLContext`` instead of ``tls`` (no client authentication).
        hub: a session table of your own instead of the shared one.
    """

    def __init__(
        self,
        conn: socket.socket,
        *,
        tls: ServerTLS | None = None,
        passphrase: str | None = None,
        hub: Hub | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        if tls is not None and ssl is not None:
            raise ValueError("give tls= or ssl=, not both")
        if hub is not None and (tls is not None or passphrase is not None):
            raise ValueError("a hub of your own carries its own authorized keys and passphrase")
        if tls is not None:
            ssl = tls.context()
        # Take the socket over: the runtime owns it from now on.
        sock = socket.socket(conn.family, conn.type, conn.proto, fileno=conn.detach())
        sock.setblocking(False)
        self._peer: AnyPeer = run(self._adopt(hub, tls, passphrase, sock, ssl))

    @staticmethod
    async def _adopt(
        hub: Hub | None,
        tls: ServerTLS | None,
        passphrase: str | None,
        sock: socket.socket,
        ssl: ssl_module.SSLContext | None,
    ) -> AnyPeer:
        return await (hub or await _get_hub(tls, passphrase)).adopt(sock, ssl)

    @property
    def peer(self) -> AnyPeer:
        """The runtime peer underneath."""
        return self._peer

    @property
    def legacy(self) -> bool:
        """Whether the client speaks the original v2 wire."""
        return isinstance(self._peer, LegacyPeer)

    def recv(self, giveID: bool = False, timeout: float | None = None) -> Any:  # noqa: N803
        """Return the next message; with ``giveID`` a dict gains its ``"id"``."""
        msg = run(self._while_linked(self._peer.recv_message(timeout)))
        return with_id(msg) if giveID else msg.data

    def send(self, obj: Any, type: str = "") -> None:
        """Send ``obj`` and return once the client's application has it."""
        run(self._while_linked(self._peer.send(obj, type)))

    def close(self) -> None:
        run(self._peer.close())

    async def _while_linked(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` but give up when this connection drops (the session stays)."""
        task = asyncio.ensure_future(aw)
        peer = self._peer
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
