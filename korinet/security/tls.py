"""TLS 1.3 for KoriNet links: ``ssl`` contexts and the settings objects that the
runtime takes (``Server(tls=ServerTLS(...))``, ``Client(tls=ClientTLS(...))``).

Only TLS 1.3 is offered or accepted (minimum and maximum version): a TLS 1.2 peer
fails the TLS handshake. Certificates are not checked against any CA:

* a **client** accepts whatever certificate the server sends at the ssl layer
  (``CERT_NONE``), then, before sending its HELLO, compares the fingerprint of the
  server's key with the pinned one (:meth:`ClientTLS.verify_server`);
* a **server** that authenticates clients asks for a certificate (``CERT_OPTIONAL``,
  trusting only the public anchor, see anchor.py) and looks its fingerprint up in
  ``authorized_keys`` before it reads the client's HELLO (runtime/server.py).

In both directions the TLS 1.3 handshake itself proves that the peer holds the
private key of the certificate it sent (CertificateVerify), so matching the key's
fingerprint authenticates the peer.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from ..exceptions import AuthenticationError, ConnectionClosedError
from .anchor import anchor_certificate_der
from .authorized import AuthorizedKeys
from .identity import Identity, PeerIdentity, certificate_fingerprint
from .known_hosts import KnownHosts, host_address

__all__ = [
    "ClientTLS",
    "ServerTLS",
    "client_context",
    "peer_certificate",
    "peer_fingerprint",
    "plaintext_answer",
    "server_context",
]

logger = logging.getLogger(__name__)


def _tls13_only(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    return context


def server_context(identity: Identity, *, require_client_cert: bool) -> ssl.SSLContext:
    """A TLS 1.3-only server context presenting ``identity``.

    With ``require_client_cert`` the server asks every client for its certificate.
    The ssl layer only checks that a certificate, if sent, comes with proof of its
    private key and chains to the public anchor (``CERT_OPTIONAL``); the *requirement*
    is enforced by the Hub against authorized_keys, so that a client without a
    certificate, or with an unknown one, gets a CLOSE 1007 it can report instead of
    an opaque TLS alert.
    """
    context = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    identity.load_into(context)
    # No session tickets: every link runs a full handshake, so every link (every
    # resume too) re-proves the client's key and is checked against the current file.
    context.num_tickets = 0
    if require_client_cert:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=anchor_certificate_der())
    return context


def client_context(identity: Identity | None) -> ssl.SSLContext:
    """A TLS 1.3-only client context, presenting ``identity`` when asked (mutual TLS).

    The server's certificate is not verified here (no CA, no host name): the runtime
    compares its key's fingerprint with the pinned one right after the handshake.
    """
    context = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if identity is not None:
        identity.load_into(context)
    return context


#: OpenSSL's reasons for a first answer that is no TLS record at all.
NOT_TLS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"}
)


def plaintext_answer(exc: BaseException, address: str) -> ConnectionClosedError | None:
    """The error that ends a client's session when ``exc`` (from its TLS handshake) says
    the server at ``address`` answered in plaintext: a KoriNet server without TLS
    answers a ClientHello with a CLOSE frame at once (runtime/server.py), and retrying
    cannot help. None for any other error."""
    if not isinstance(exc, ssl.SSLError) or exc.reason not in NOT_TLS:
        return None
    from ..session import CloseCode

    error = ConnectionClosedError(
        CloseCode.PROTOCOL_ERROR,
        f"the server at {address} speaks plaintext, not TLS (started with --insecure-plaintext?)",
    )
    error.__cause__ = exc
    return error


def peer_certificate(transport: asyncio.BaseTransport | None) -> bytes | None:
    """The DER certificate the peer presented on a TLS transport, or None."""
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der: bytes | None = ssl_object.getpeercert(binary_form=True)
    return der


def peer_fingerprint(transport: asyncio.BaseTransport | None) -> str | None:
    """The fingerprint of the key the peer proved on a TLS transport, or None."""
    der = peer_certificate(transport)
    return certificate_fingerprint(der) if der else None


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """TLS settings of a server.

    Attributes:
        identity: the server's key and certificate (clients pin its fingerprint).
        authorized: the clients let in; ``None`` lets in any client without asking
            for a certificate (encrypted, but anonymous: ``peer.identity`` is None).
    """

    identity: Identity
    authorized: AuthorizedKeys | None = None

    def context(self) -> ssl.SSLContext:
        return server_context(self.identity, require_client_cert=self.authorized is not None)


def _log_first_use(address: str, fingerprint: str, known_hosts: KnownHosts) -> None:
    logger.warning("first connection to %s: pinned its key %s in %s", address, fingerprint, known_hosts.path)


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """TLS settings of a client.

    Attributes:
        identity: our key and certificate, sent when the server asks (servers with
            authorized keys refuse clients without one).
        known_hosts: where server keys are pinned on first use (default: the file
            in the configuration directory).
        fingerprint: accept only this server key, whatever known_hosts says (for
            a fingerprint learnt out of band).
        on_first_use: called with ``(address, fingerprint, known_hosts)`` when a new
            server key is pinned; by default a warning is logged.
    """

    identity: Identity | None = None
    known_hosts: KnownHosts = field(default_factory=KnownHosts)
    fingerprint: str | None = None
    on_first_use: Callable[[str, str, KnownHosts], None] = _log_first_use

    def context(self) -> ssl.SSLContext:
        return client_context(self.identity)

    def verify_server(self, address: str, certificate: bytes | None) -> PeerIdentity:
        """Check the key the server presented (``certificate``, DER, as the TLS layer
        gives it: any driver, asyncio or blocking) for ``address`` (``host:port``);
        pin it if the address is new.

        Raises:
            HostKeyChanged: the pinned key differs (the message says how to fix it).
            AuthenticationError: no certificate, or not the expected fingerprint.
        """
        offered = certificate_fingerprint(certificate) if certificate else None
        if offered is None:
            raise AuthenticationError(f"{address} presented no certificate over TLS")
        if self.fingerprint is not None:
            if offered != self.fingerprint:
                raise AuthenticationError(
                    f"{address} presented the key {offered}, not the expected {self.fingerprint}"
                )
        elif self.known_hosts.check(address, offered):
            self.on_first_use(address, offered, self.known_hosts)
        return PeerIdentity(address, offered)

    def check_server(self, host: str, port: int, certificate: bytes | None) -> PeerIdentity:
        """:meth:`verify_server` for a client connected to ``host``:``port``, before it
        sends anything (§3.1 comes after TLS); the one check of both clients.

        Raises:
            AuthenticationError: as :meth:`verify_server`, or known_hosts could not
                be read or written.
        """
        address = host_address(host, port)
        try:
            return self.verify_server(address, certificate)
        except (OSError, ValueError) as exc:  # known_hosts unreadable or unwritable
            raise AuthenticationError(f"cannot check the key of {address}: {exc}") from exc
