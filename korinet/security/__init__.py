"""Security: TLS 1.3, SSH-like identities, known hosts, authorized keys.

See docs/SECURITY.md for the threat model. In short::

    from korinet.security import AuthorizedKeys, ClientTLS, Identity, ServerTLS

    server = Server(host, port, tls=ServerTLS(Identity.load_or_create(), authorized=AuthorizedKeys()))
    client = await Client.connect(host, port, tls=ClientTLS(Identity.load_or_create()))

The names load on first use (PEP 562), so that importing a light module of this
package (``korinet.security.passphrase``) does not import ``cryptography``: plaintext
users do not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .authorized import AuthorizedKey, AuthorizedKeys
    from .files import korinet_home
    from .identity import Identity, PeerIdentity, certificate_fingerprint, key_fingerprint, parse_fingerprint
    from .known_hosts import KnownHosts, host_address
    from .tls import ClientTLS, ServerTLS, client_context, peer_fingerprint, server_context

_HOME = {
    "AuthorizedKey": "authorized",
    "AuthorizedKeys": "authorized",
    "korinet_home": "files",
    "Identity": "identity",
    "PeerIdentity": "identity",
    "certificate_fingerprint": "identity",
    "key_fingerprint": "identity",
    "parse_fingerprint": "identity",
    "KnownHosts": "known_hosts",
    "host_address": "known_hosts",
    "ClientTLS": "tls",
    "ServerTLS": "tls",
    "client_context": "tls",
    "peer_fingerprint": "tls",
    "server_context": "tls",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


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
