"""Security: TLS 1.3, SSH-like identities, known hosts, authorized keys.

See docs/SECURITY.md for the threat model. In short::

    from korinet.security import AuthorizedKeys, ClientTLS, Identity, ServerTLS

    server = Server(host, port, tls=ServerTLS(Identity.load_or_create(), authorized=AuthorizedKeys()))
    client = await Client.connect(host, port, tls=ClientTLS(Identity.load_or_create()))

Importing this package imports ``cryptography``; the runtime imports it only
when TLS is asked for, so plaintext users do not pay for it.
"""

from __future__ import annotations

from .authorized import AuthorizedKey, AuthorizedKeys
from .files import korinet_home
from .identity import Identity, PeerIdentity, certificate_fingerprint, key_fingerprint, parse_fingerprint
from .known_hosts import KnownHosts, host_address
from .tls import ClientTLS, ServerTLS, client_context, peer_fingerprint, server_context

__all__ = [
    "AuthorizedKey",
    "AuthorizedKeys",
    "ClientTLS",
    "Identity",
    "KnownHosts",
    "PeerIdentity",
    "ServerTLS",
    "certificate_fingerprint",
    "client_context",
    "host_address",
    "key_fingerprint",
    "korinet_home",
    "parse_fingerprint",
    "peer_fingerprint",
    "server_context",
]
