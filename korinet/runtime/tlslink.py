"""TLS inside the runtime's own protocol (docs/ARCHITECTURE.md, "TLS").

asyncio's ``SSLProtocol`` gives every connection its own 256 KiB read buffer, so an
idle TLS session cost a server ~300 KiB against ~15 KiB in plaintext. Here the TLS
state of a connection is a :class:`~korinet.security.tlsbio.TLSEngine` (an
``ssl.SSLObject`` between two memory BIOs, sans-I/O, the blocking driver's too),
driven by the :class:`~korinet.runtime.connection.Connection` that owns it:
ciphertext is read into the connection's shared per-thread buffer, and plaintext is
decrypted into a second shared one, then copied out, as plaintext links do.
:class:`TLSTransport` is what the Connection writes to: it looks like asyncio's TLS
transport (``get_extra_info("ssl_object")``, no ``write_eof``), so the code reading
certificates, and the peers, are the same for either.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

from ..security.tlsbio import TLS, TLSEngine

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["TLS", "TLSTransport"]


class TLSTransport(asyncio.Transport):
    """The TLS layer of one connection, over its socket transport ``raw``.

    Writes are encrypted and passed on at once; :meth:`received` takes ciphertext
    and hands the plaintext to the connection. A TLS error ends the connection with
    that error (``error``), after the alert OpenSSL wrote, if any, is sent.
    """

    __slots__ = ("_closing", "_conn", "_early", "_engine", "_raw", "error")

    def __init__(self, raw: asyncio.Transport, conn: Connection, tls: TLS) -> None:
        super().__init__()
        self._raw = raw
        self._conn = conn
        self._engine = TLSEngine(tls)
        self._closing = False
        self._early: list[bytes] | None = None  # written before the handshake was done
        #: the TLS error that ended the connection, if one did
        self.error: Exception | None = None

    @property
    def _ready(self) -> bool:
        return self._engine.ready

    def start(self) -> None:
        """Begin the handshake (a client sends its ClientHello now)."""
        try:
            if self._engine.handshake():
                self._secured()
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush()

    # -------------------------------------------------------------- incoming

    def received(self, data: memoryview) -> None:
        """Ciphertext from the socket (a view of the shared read buffer, used here
        only): decrypt it, hand the plaintext to the connection."""
        if self._closing:
            return
        try:
            ended = self._engine.receive(data, self._deliver, self._secured)
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        if ended:
            self.close()  # the peer closed its side; the session decides what that means
        elif not self._closing:
            self._flush()  # handshake flights, post-handshake messages (a KeyUpdate's answer)

    def _deliver(self, plain: memoryview) -> bool:
        if self._closing:
            return False
        self._conn.data_received(plain.tobytes())
        return not self._closing

    def _secured(self) -> bool:
        """The handshake is done: tell the connection, send what waited for it."""
        self._flush()
        early, self._early = self._early, None
        self._conn._secured()
        for data in early or ():
            self.write(data)
        return not self._closing  # the owner may drop it as soon as it is secured

    def _fail(self, exc: Exception) -> None:
        if self._closing:
            return
        self.error = exc
        self._closing = True
        self._conn._tls_failed(exc)
        self._flush()  # the alert that tells the peer why
        self._raw.close()

    def _flush(self) -> None:
        out = self._engine.data_to_send()
        if out:
            self._raw.write(out)

    # -------------------------------------------------------------- asyncio.Transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._engine.ready:
            if self._early is None:
                self._early = []
            self._early.append(bytes(data))
            return
        try:
            out = self._engine.encrypt(data)
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._raw.write(out)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # as asyncio's TLS transport: half-closing TLS is not offered

    def write_eof(self) -> None:
        raise NotImplementedError("TLS does not support half-closing (write_eof)")

    def close(self) -> None:
        """Send close_notify (best effort) after what is written, then close."""
        if self._closing:
            return
        self._closing = True
        out = self._engine.close_notify()  # not waiting for the peer's
        if out:
            self._raw.write(out)
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sslobj = self._engine.sslobj
        if name == "ssl_object":
            return sslobj
        if name == "sslcontext":
            return sslobj.context
        if name == "peercert":
            return sslobj.getpeercert() if self._ready else default
        if name == "cipher":
            return sslobj.cipher() if self._ready else default
        if name == "compression":
            return sslobj.compression() if self._ready else default
        return self._raw.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._conn

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError("the protocol of a KoriNet TLS link is its Connection")
