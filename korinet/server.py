"""The original blocking server API: ``server(conn)`` on a socket you accepted.

Every ``server(conn)`` in a process shares one session table, so when a client
comes back on a new socket, the next ``server(conn)`` continues its session: what
it had not received is replayed, nothing twice. A peer speaking the original v2
wire is served the way v2 expects.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
from collections.abc import Awaitable
from typing import Any, TypeVar

from ._loopthread import run
from .client import with_id
from .exceptions import ConnectionClosedError
from .runtime.legacy import LegacyPeer
from .runtime.server import AnyPeer, Hub, ServerPeer
from .session import CloseCode

__all__ = ["default_hub", "server"]

T = TypeVar("T")

_hub: Hub | None = None


async def _get_hub() -> Hub:
    global _hub
    if _hub is None:
        _hub = Hub()
    return _hub


def default_hub() -> Hub:
    """The session table shared by every ``server(conn)`` of this process."""
    return run(_get_hub())


class server:  # noqa: N801 - the original API's name
    """Serve one client connection (blocking).

    ``recv()`` and ``send()`` raise :class:`~korinet.ConnectionClosedError` when this
    connection drops; the session waits (its TTL) for the client to reconnect, and
    the next ``server(conn)`` continues it. A ``send()`` interrupted this way is not
    lost: it is delivered when the session resumes.
    """

    def __init__(
        self, conn: socket.socket, *, hub: Hub | None = None, ssl: ssl_module.SSLContext | None = None
    ) -> None:
        # Take the socket over: the runtime owns it from now on.
        sock = socket.socket(conn.family, conn.type, conn.proto, fileno=conn.detach())
        sock.setblocking(False)
        self._peer: AnyPeer = run(self._adopt(hub, sock, ssl))

    @staticmethod
    async def _adopt(hub: Hub | None, sock: socket.socket, ssl: ssl_module.SSLContext | None) -> AnyPeer:
        return await (hub or await _get_hub()).adopt(sock, ssl)

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
