"""TLS over memory BIOs, sans-I/O: the TLS state of one link, for every driver.

``TLSEngine`` holds an ``ssl.SSLObject`` between two ``ssl.MemoryBIO``\\ s: ciphertext
in, plaintext out (into one shared per-thread buffer), plaintext in, ciphertext out.
It owns no socket; the asyncio driver (``runtime/tlslink.py``'s ``TLSTransport``) and
the blocking one (``sync/driver.py``) move its bytes. asyncio's ``SSLProtocol`` and
an ``ssl.SSLSocket`` each hold a read buffer per connection; here the only buffers
are the BIOs, and a memory BIO keeps the largest block it ever held, so ciphertext
goes in, and plaintext goes out, at most one TLS record at a time.

The context is the caller's (security/tls.py: TLS 1.3 only, no tickets, the client
certificate asked for with authorized keys).
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

__all__ = ["PLAIN_SIZE", "RECORD", "TLS", "TLSEngine"]

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
    """How a link runs TLS: the context, which side it is, the name it sends (SNI)
    as a client. One is shared by every link of a server or client."""

    context: ssl.SSLContext
    server_side: bool
    server_hostname: str | None = None


class TLSEngine:
    """The TLS state of one link (see the module docstring).

    Drive the handshake with :meth:`handshake` and :meth:`receive` (which completes
    it as bytes arrive), write :meth:`data_to_send` after each; then
    :meth:`receive` decrypts, :meth:`encrypt` encrypts. Errors are ``ssl.SSLError``;
    after one, write :meth:`data_to_send` (the alert that tells the peer why).
    """

    __slots__ = ("_incoming", "_outgoing", "ready", "sslobj")

    def __init__(self, tls: TLS) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.sslobj = tls.context.wrap_bio(
            self._incoming, self._outgoing, server_side=tls.server_side, server_hostname=tls.server_hostname
        )
        #: the handshake is done
        self.ready = False

    def handshake(self) -> bool:
        """One step of the handshake (a client's first one writes its ClientHello);
        whether it is done. Raises ssl.SSLError."""
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.ready = True
        return True

    def receive(
        self,
        data: memoryview,
        deliver: Callable[[memoryview], bool],
        secured: Callable[[], bool] | None = None,
    ) -> bool:
        """Take ciphertext ``data``: advance the handshake (``secured()`` is called when
        it completes), and hand the plaintext to ``deliver`` (a view of the shared
        buffer, valid during the call only). Either callback returns False to stop
        at once. Returns whether the peer closed its side (close_notify).

        Raises:
            ssl.SSLError: the link is broken (write :meth:`data_to_send`, then close).
        """
        plain = _plain_view()
        filled = 0
        for start in range(0, len(data), RECORD):
            self._incoming.write(data[start : start + RECORD])
            if not self.ready:
                if not self.handshake():
                    continue
                if secured is not None and not secured():
                    return False
            try:
                while True:
                    if filled == len(plain):
                        filled = 0
                        if not deliver(plain):
                            return False
                    # Into a buffer, read() returns a count (typeshed says bytes).
                    count = cast(int, self.sslobj.read(len(plain) - filled, plain[filled:]))
                    if count == 0:  # close_notify
                        break
                    filled += count
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLZeroReturnError:
                pass
            except ssl.SSLError:
                if filled:  # what was decrypted before the error is the peer's
                    deliver(plain[:filled])
                raise
            if filled:
                deliver(plain[:filled])
            return True
        if filled:
            deliver(plain[:filled])
        return False

    def decrypt(self, data: memoryview) -> tuple[bytes, bool]:
        """:meth:`receive` with the plaintext returned as one block (for a handshake's
        few bytes): ``(plaintext, the peer closed)``. Raises ssl.SSLError."""
        chunks: list[bytes] = []

        def keep(plain: memoryview) -> bool:
            chunks.append(plain.tobytes())
            return True

        ended = self.receive(data, keep)
        return b"".join(chunks), ended

    def encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        """The ciphertext of ``data`` (a record at a time, so that the BIO never holds
        a whole large message), after anything else waiting to be sent."""
        if len(data) <= RECORD:
            self.sslobj.write(data)
            return self._outgoing.read()
        view = memoryview(data)
        parts = []
        for start in range(0, len(view), RECORD):
            self.sslobj.write(view[start : start + RECORD])
            parts.append(self._outgoing.read())
        return b"".join(parts)

    def data_to_send(self) -> bytes:
        """Ciphertext waiting to be sent (handshake flights, alerts, close_notify...)."""
        return self._outgoing.read() if self._outgoing.pending else b""

    def close_notify(self) -> bytes:
        """Our close_notify (best effort; not waiting for the peer's), to be sent."""
        if self.ready:
            try:
                self.sslobj.unwrap()
            except (ssl.SSLError, ValueError):
                pass
        return self.data_to_send()

    def peer_certificate(self) -> bytes | None:
        """The DER certificate the peer presented (None: none)."""
        der: bytes | None = self.sslobj.getpeercert(binary_form=True)
        return der
