"""One TCP (or TLS) connection driving a Session: the I/O edge of the runtime.

``Connection`` is an ``asyncio.BufferedProtocol`` (not a stream) because a server
holds thousands of them and the callback path is the cheapest asyncio offers; the
buffered flavour reads into one reusable buffer, where a plain Protocol would get
a freshly allocated 256 KiB bytes object for every read, small frames included.
TLS runs inside it too (tlslink.py), for the same reason: asyncio's TLS protocol
holds a 256 KiB buffer per connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .peer import Peer
    from .tlslink import TLS, TLSTransport

__all__ = ["Connection", "set_nodelay"]

#: Bytes read from the socket at most per call.
READ_SIZE = 256 * 1024
#: One read buffer per thread (an event loop reads from one connection at a time).
_read_buffers = threading.local()

logger = logging.getLogger(__name__)


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    # Small frames must not wait for the peer's delayed ACK (the original's 88 ms).
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class Connection(asyncio.BufferedProtocol):
    """Carries bytes between a transport and whoever owns it.

    Before the handshake the owner is a callback (``on_data``); afterwards it is a
    :class:`Peer` whose Session parses the bytes. ``lost`` resolves when the
    transport is gone, with the exception that ended it or ``None``.

    With ``tls``, the connection runs TLS itself: ``transport`` is then its
    :class:`~korinet.runtime.tlslink.TLSTransport`, ``on_made`` is called once the
    TLS handshake is done, and ``secured`` resolves then (or fails with the error
    that ended the handshake).

    ``reported``: the peer's ``(host, port)`` as told by whoever handed the socket
    over (``Hub.adopt(address=...)``, a relay): :attr:`peername` and the hub's
    per-address limits use it, and :attr:`via` names the socket's own peer.
    """

    def __init__(
        self, on_made: Callable[[Connection], None] | None = None, *, tls: TLS | None = None
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.tls = tls
        self._tls: TLSTransport | None = None
        self.secured: asyncio.Future[None] | None = None
        if tls is not None:
            self.secured = self.loop.create_future()
            self.secured.add_done_callback(_retrieve)  # a failure nobody awaits is no error
        self.peer: Peer | None = None
        self.reported: tuple[str, int] | None = None
        self.on_data: Callable[[bytes], None] | None = None
        self.on_made = on_made
        self.lost: asyncio.Future[BaseException | None] = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None

    # -------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        set_nodelay(transport)
        if self.tls is not None:
            from .tlslink import TLSTransport  # plaintext users do not import ssl

            self.transport = self._tls = TLSTransport(transport, self, self.tls)
            self._tls.start()
            return
        self.transport = transport
        if self.on_made is not None:
            self.on_made(self)

    def _secured(self) -> None:
        """The TLS handshake is done."""
        if self.secured is not None and not self.secured.done():
            self.secured.set_result(None)
        if self.on_made is not None:
            self.on_made(self)

    def _tls_failed(self, exc: BaseException) -> None:
        if self.secured is not None and not self.secured.done():
            self.secured.set_exception(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        view: memoryview | None = getattr(_read_buffers, "view", None)
        if view is None:
            view = _read_buffers.view = memoryview(bytearray(READ_SIZE))
        return view

    def buffer_updated(self, nbytes: int) -> None:
        # Copied out at once, so one buffer serves every connection of this thread.
        if self._tls is not None:
            self._tls.received(_read_buffers.view[:nbytes])
            return
        data = _read_buffers.view[:nbytes].tobytes()
        peer = self.peer
        if peer is not None:  # (data_received's first case, one call less per read)
            peer.link_data(self, data)
        elif self.on_data is not None:
            self.on_data(data)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.link_data(self, data)
        elif self.on_data is not None:
            self.on_data(data)

    def eof_received(self) -> bool | None:
        return None  # close our side too; the session decides what the loss means

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timer()
        if self._tls is not None:
            exc = exc or self._tls.error
            self._tls_failed(exc or ConnectionResetError("the connection closed during the TLS handshake"))
        if not self.lost.done():
            self.lost.set_result(exc)
        if self.peer is not None:
            self.peer.link_lost(self, exc)

    # -------------------------------------------------------------- helpers

    @property
    def write_backlog(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        return self.transport.get_write_buffer_size() if self.transport else 0

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        """Flush what is written, then close."""
        self.cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop at once (a dead or hostile peer)."""
        self.cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def schedule(self, when: float | None, callback: Callable[[], None]) -> None:
        self.cancel_timer()
        if when is not None and not self.lost.done():
            self._timer = self.loop.call_at(when, callback)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def peername(self) -> str:
        """``host:port`` of the peer: the reported one if any, else the socket's."""
        if self.reported is not None:
            return f"{self.reported[0]}:{self.reported[1]}"
        return self._socket_peername()

    @property
    def host(self) -> str:
        """The peer's host, what per-address limits count (the reported one if any)."""
        if self.reported is not None:
            return self.reported[0]
        if self.transport is None:
            return "?"
        name = self.transport.get_extra_info("peername")
        return str(name[0]) if isinstance(name, tuple) and name else str(name)

    @property
    def via(self) -> str | None:
        """With a reported peer, ``host:port`` of the socket's own peer (the relay or
        proxy that reported it, the only address this side saw); else None."""
        return self._socket_peername() if self.reported is not None else None

    def _socket_peername(self) -> str:
        if self.transport is None:
            return "?"
        name = self.transport.get_extra_info("peername")
        if isinstance(name, tuple) and len(name) >= 2:
            return f"{name[0]}:{name[1]}"
        return str(name)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
