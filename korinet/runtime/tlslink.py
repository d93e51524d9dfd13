"""TLS inside the runtime's own protocol (docs/ARCHITECTURE.md, "TLS").

asyncio's ``SSLProtocol`` gives every connection its own 256 KiB read buffer, so an
idle TLS session cost a server ~300 KiB against ~15 KiB in plaintext. Here the TLS
state of a connection is an ``ssl.SSLObject`` between two ``ssl.MemoryBIO``\\ s, driven
by the :class:`~korinet.runtime.connection.Connection` that owns it: ciphertext is
read into the connection's shared per-thread buffer, and plaintext is decrypted into
a second shared one, then copied out, as plaintext links do.

A memory BIO keeps the largest block it ever held, so ciphertext goes in, and
plaintext goes out, at most one TLS record at a time: a session that once moved a
large message then holds a few tens of KiB, not that message's size.

The context is the caller's (security/tls.py: TLS 1.3 only, no tickets, the client
certificate asked for with authorized keys); this module only moves bytes.
:class:`TLSTransport` is what the Connection writes to: it looks like asyncio's TLS
transport (``get_extra_info("ssl_object")``, no ``write_eof``), so the code reading
certificates, and the peers, are the same for either.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["TLS", "TLSTransport"]

#: Plaintext decrypted at most per delivery (ciphertext read per call is no larger).
PLAIN_SIZE: Final = 256 * 1024
#: The largest TLS record's payload: what goes through a memory BIO at once.
RECORD: Final = 16 * 1024

_plain_buffers = threading.local()


def _plain_view() -> memoryview:
    view: memoryview | None = getattr(_plain_buffers, "view", None)
    if view is None:
        view = _plain_buffers.view = memoryview(bytearray(PLAIN_SIZE))
    return view


@dataclass(frozen=True, slots=True)
class TLS:
    """How a Connection runs TLS: the context, which side it is, the name it sends
    (SNI) as a client. One is shared by every connection of a server or client."""

    context: ssl.SSLContext
    server_side: bool
    server_hostname: str | None = None


class TLSTransport(asyncio.Transport):
    """The TLS layer of one connection, over its socket transport ``raw``.

    Writes are encrypted and passed on at once; :meth:`received` takes ciphertext
    and hands the plaintext to the connection. A TLS error ends the connection with
    that error (``error``), after the alert OpenSSL wrote, if any, is sent.
    """

    __slots__ = (
        "_closing",
        "_conn",
        "_early",
        "_incoming",
        "_outgoing",
        "_raw",
        "_ready",
        "_sslobj",
        "error",
    )

    def __init__(self, raw: asyncio.Transport, conn: Connection, tls: TLS) -> None:
        super().__init__()
        self._raw = raw
        self._conn = conn
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = tls.context.wrap_bio(
            self._incoming, self._outgoing, server_side=tls.server_side, server_hostname=tls.server_hostname
        )
        self._ready = False
        self._closing = False
        self._early: list[bytes] | None = None  # written before the handshake was done
        #: the TLS error that ended the connection, if one did
        self.error: Exception | None = None

    def start(self) -> None:
        """Begin the handshake (a client sends its ClientHello now)."""
        self._handshake()

    # -------------------------------------------------------------- incoming

    def received(self, data: memoryview) -> None:
        """Ciphertext from the socket (a view of the shared read buffer, used here
        only): decrypt it, hand the plaintext to the connection."""
        plain = _plain_view()
        filled = 0
        ended = False
        failure: ssl.SSLError | None = None
        for start in range(0, len(data), RECORD):
            if self._closing:
                return
            self._incoming.write(data[start : start + RECORD])
            if not self._ready:
                if not self._handshake():
                    continue
                if self._closing:  # the owner dropped it as soon as it was secured
                    return
            try:
                while True:
                    if filled == len(plain):
                        self._conn.data_received(plain.tobytes())
                        filled = 0
                        if self._closing:
                            return
                    # Into a buffer, read() returns a count (typeshed says bytes).
                    count = cast(int, self._sslobj.read(len(plain) - filled, plain[filled:]))
                    if count == 0:  # close_notify
                        ended = True
                        break
                    filled += count
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLZeroReturnError:
                ended = True
            except ssl.SSLError as exc:
                failure = exc
            break
        if filled and not self._closing:
            self._conn.data_received(plain[:filled].tobytes())
        if failure is not None:
            self._fail(failure)
        elif ended:
            self.close()  # the peer closed its side; the session decides what that means
        elif not self._closing:
            self._flush()  # post-handshake messages (a KeyUpdate's answer)

    def _handshake(self) -> bool:
        """One step of the handshake; whether it is done."""
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError as exc:
            self._fail(exc)
            return False
        self._ready = True
        self._flush()
        early, self._early = self._early, None
        self._conn._secured()
        for data in early or ():
            self.write(data)
        return True

    def _fail(self, exc: Exception) -> None:
        if self._closing:
            return
        self.error = exc
        self._closing = True
        self._conn._tls_failed(exc)
        self._flush()  # the alert that tells the peer why
        self._raw.close()

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._raw.write(self._outgoing.read())

    # -------------------------------------------------------------- asyncio.Transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._ready:
            if self._early is None:
                self._early = []
            self._early.append(bytes(data))
            return
        try:
            if len(data) <= RECORD:
                self._sslobj.write(data)
                out = self._outgoing.read()
            else:  # a record at a time, so that the BIO never holds the whole message
                view = memoryview(data)
                parts = []
                for start in range(0, len(view), RECORD):
                    self._sslobj.write(view[start : start + RECORD])
                    parts.append(self._outgoing.read())
                out = b"".join(parts)
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
        if self._ready:
            try:
                self._sslobj.unwrap()  # writes close_notify; not waiting for the peer's
            except (ssl.SSLError, ValueError):
                pass
            self._flush()
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._sslobj
        if name == "sslcontext":
            return self._sslobj.context
        if name == "peercert":
            return self._sslobj.getpeercert() if self._ready else default
        if name == "cipher":
            return self._sslobj.cipher() if self._ready else default
        if name == "compression":
            return self._sslobj.compression() if self._ready else default
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
