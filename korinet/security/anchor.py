"""The public client-certificate anchor: how a server accepts self-made client
certificates with Python's ``ssl`` module. Read this before changing tls.py.

The problem. KoriNet has no certificate authority: every node makes its own key
and certificate, and peers are recognised by the key's fingerprint, as SSH does.
Python's ``ssl`` offers no certificate-verification callback. A server that asks
for a client certificate (``CERT_OPTIONAL`` or ``CERT_REQUIRED``) makes OpenSSL
verify the chain the client sends, and a verification error aborts the handshake;
a self-signed certificate the server has never seen always fails ("unknown CA").
Loading each client's certificate as a trust anchor would work, but the server
only knows fingerprints (``korinet authorize FINGERPRINT``), not certificates.

The solution. Every KoriNet certificate is issued by one *public* anchor: a P-256
key derived from a fixed, published label (:data:`ANCHOR_LABEL`), so anyone can
compute it, and anyone can issue a certificate under it. A server that
authenticates clients loads the anchor's certificate as its only trust anchor;
OpenSSL's chain check then passes for any KoriNet certificate, and fails only
for certificates made some other way.

Why this is safe. The anchor vouches for nothing, and nothing relies on it:

* In TLS 1.3 a client that sends a certificate must also send CertificateVerify,
  a signature over the handshake transcript made with the certificate's private
  key; OpenSSL checks it against the certificate's public key whatever the chain.
  So the handshake proves the client holds the private key of the certificate it
  presented (the anchor key cannot produce that signature for someone else's key).
* The server then takes the leaf certificate, hashes its public key, and looks
  the fingerprint up in ``authorized_keys`` (runtime/server.py). That lookup is the
  authentication. A certificate issued under the anchor for a key not listed is
  refused with CLOSE 1007, exactly like any unknown key.
* Clients never use the anchor: they verify servers by the pinned fingerprint
  (known_hosts.py), with ``CERT_NONE`` at the ssl layer.

The anchor's certificate is made anew in memory each time it is needed; its
private key is derived, not stored: there is no secret here to protect or leak.
Changing :data:`ANCHOR_LABEL` would invalidate every certificate issued so far
(the keys, and so the fingerprints, would stay valid: ``Identity.load`` re-issues
a certificate that does not chain to the current anchor).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["ANCHOR_LABEL", "ANCHOR_NAME", "NOT_AFTER", "NOT_BEFORE", "anchor_certificate_der", "anchor_key"]

#: Hashed into the anchor's private key. Public on purpose: see the module docstring.
ANCHOR_LABEL: Final = b"KoriNet public client-certificate anchor, v1. Not a secret: it certifies nothing."
#: Subject of the anchor, and issuer of every KoriNet certificate.
ANCHOR_NAME: Final = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "KoriNet public anchor (not a CA)")])
#: Validity of KoriNet certificates: keys are rotated by their owner, never by a
#: calendar (RFC 5280 §4.1.2.5: 9999-12-31 means "no well-defined expiration").
NOT_BEFORE: Final = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
NOT_AFTER: Final = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)

# The order of the P-256 group: a private scalar must lie in [1, n - 1].
_P256_ORDER: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@functools.cache
def anchor_key() -> ec.EllipticCurvePrivateKey:
    """The anchor's private key, derived from :data:`ANCHOR_LABEL` (public by design)."""
    scalar = int.from_bytes(hashlib.sha256(ANCHOR_LABEL).digest(), "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


@functools.cache
def anchor_certificate_der() -> bytes:
    """The anchor's self-signed CA certificate (DER), for ``load_verify_locations``."""
    key = anchor_key()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(ANCHOR_NAME)
        .issuer_name(ANCHOR_NAME)
        .public_key(public)
        .serial_number(1)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)
