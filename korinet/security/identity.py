"""Identities: this node's key pair and certificate, and what we know of a peer.

A node is its key, as in SSH: a P-256 (ECDSA) key pair made on first use, with
a certificate issued under the public anchor (anchor.py) so that OpenSSL accepts
it from a client. Peers recognise the key by its **fingerprint**, the SHA-256
of the public key (its DER SubjectPublicKeyInfo) written as ``SHA256:`` and
unpadded base64, the format of ``ssh-keygen -l``. The fingerprint does not
depend on the certificate, so re-issuing one never changes who a node is.

P-256 rather than Ed25519: every OpenSSL that Python links to signs TLS 1.3
handshakes with it, and it is the curve TLS implementations test most.

Files, in :func:`~korinet.security.files.korinet_home`: ``key.pem`` (PKCS#8,
mode 0600, not encrypted: passphrase protection is not implemented yet) and
``cert.pem`` (mode 0644).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import ssl
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .anchor import ANCHOR_NAME, NOT_AFTER, NOT_BEFORE, anchor_certificate_der, anchor_key
from .files import korinet_home, write_atomically

__all__ = [
    "CERT_FILE",
    "FINGERPRINT_PREFIX",
    "KEY_FILE",
    "Identity",
    "PeerIdentity",
    "certificate_fingerprint",
    "key_fingerprint",
    "parse_fingerprint",
]

logger = logging.getLogger(__name__)

KEY_FILE: Final = "key.pem"
CERT_FILE: Final = "cert.pem"
FINGERPRINT_PREFIX: Final = "SHA256:"
_FINGERPRINT_RE: Final = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


# ---------------------------------------------------------------------- fingerprints


def key_fingerprint(public_key: CertificatePublicKeyTypes) -> str:
    """``SHA256:<base64>`` of a public key's DER SubjectPublicKeyInfo."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(spki).digest()
    return FINGERPRINT_PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")


def certificate_fingerprint(der: bytes) -> str:
    """The fingerprint of the key in a DER certificate (as TLS hands it over).

    Raises:
        ValueError: the bytes are not a certificate.
    """
    return key_fingerprint(x509.load_der_x509_certificate(der).public_key())


def parse_fingerprint(text: str) -> str:
    """Check a fingerprint typed by a user; return it without surrounding blanks.

    Raises:
        ValueError: not of the form ``SHA256:`` followed by 43 base64 characters.
    """
    text = text.strip()
    if not _FINGERPRINT_RE.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a KoriNet fingerprint: expected SHA256: and 43 base64 characters, "
            "as `korinet id` prints"
        )
    try:
        base64.b64decode(text[len(FINGERPRINT_PREFIX) :] + "=", validate=True)
    except binascii.Error:  # pragma: no cover - the pattern already excludes it
        raise ValueError(f"{text!r} is not valid base64") from None
    return text


# ---------------------------------------------------------------------- peers


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is at the other end of a session, once authenticated.

    On a server, set as ``peer.identity`` from the client's authorized_keys entry;
    on a client, describes the server (``name`` is its ``host:port``, no roles).
    ``MessageType.required_role`` is checked against :attr:`roles`.
    """

    name: str
    fingerprint: str
    roles: frozenset[str] = frozenset()

    def has_role(self, role: str) -> bool:
        return role in self.roles


# ---------------------------------------------------------------------- this node


class Identity:
    """This node's private key and certificate.

    Make one with :meth:`load_or_create` (the usual way), :meth:`load`, or
    :meth:`generate` (in memory; :meth:`save` writes it).
    """

    def __init__(
        self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate, directory: Path | None = None
    ) -> None:
        if key_fingerprint(key.public_key()) != key_fingerprint(certificate.public_key()):
            raise ValueError("the certificate is not for this private key")
        self.key = key
        self.certificate = certificate
        #: where the identity is stored, or None for one kept in memory
        self.directory = directory
        #: ``SHA256:<base64>``: what peers pin and authorize
        self.fingerprint = key_fingerprint(key.public_key())

    def __repr__(self) -> str:
        return f"<Identity {self.fingerprint}{f' in {self.directory}' if self.directory else ''}>"

    # ------------------------------------------------------------------ making

    @classmethod
    def generate(cls) -> Identity:
        """A new key pair and certificate, in memory only."""
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(key, _issue_certificate(key))

    @staticmethod
    def exists(directory: Path | None = None) -> bool:
        """Whether a key is stored in ``directory`` (default: :func:`korinet_home`)."""
        return (Path(directory) if directory else korinet_home()).joinpath(KEY_FILE).exists()

    @classmethod
    def load(cls, directory: Path | None = None) -> Identity:
        """Read the identity stored in ``directory`` (default: :func:`korinet_home`).

        A missing certificate, or one not issued under the current anchor, is issued
        again from the key (the fingerprint does not change).

        Raises:
            FileNotFoundError: there is no key.pem.
            PermissionError: key.pem can be read by others than its owner (as ssh,
                we refuse to use an exposed key; the message says how to fix it).
            ValueError: the files are not a key and a certificate of ours.
        """
        directory = Path(directory) if directory else korinet_home()
        key_path = directory / KEY_FILE
        data = key_path.read_bytes()
        _check_private(key_path)
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} does not hold an elliptic-curve key")
        cert_path = directory / CERT_FILE
        cert: x509.Certificate | None = None
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (FileNotFoundError, ValueError):
            cert = None
        if cert is None or not _current(cert, key):
            logger.info("issuing a new certificate for the key in %s", key_path)
            cert = _issue_certificate(key)
            write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cls(key, cert, directory)

    @classmethod
    def load_or_create(cls, directory: Path | None = None) -> Identity:
        """:meth:`load` the stored identity, or generate and save one on first use.

        Call :meth:`exists` first to tell the user when a new one is made.
        """
        directory = Path(directory) if directory else korinet_home()
        if cls.exists(directory):
            return cls.load(directory)
        identity = cls.generate().save(directory)
        logger.info("created a new KoriNet identity %s in %s", identity.fingerprint, directory)
        return identity

    def save(self, directory: Path | None = None, *, overwrite: bool = False) -> Identity:
        """Write key.pem (0600) and cert.pem (0644) into ``directory``; return the
        stored identity.

        Raises:
            FileExistsError: a key is already there and ``overwrite`` is false.
        """
        directory = Path(directory) if directory else korinet_home()
        if not overwrite and self.exists(directory):
            raise FileExistsError(f"an identity already exists in {directory}")
        write_atomically(directory / KEY_FILE, self.key_pem(), 0o600)
        write_atomically(
            directory / CERT_FILE, self.certificate.public_bytes(serialization.Encoding.PEM), 0o644
        )
        return Identity(self.key, self.certificate, directory)

    # ------------------------------------------------------------------ using

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def load_into(self, context: ssl.SSLContext) -> None:
        """Make ``context`` present this identity (``load_cert_chain`` from this object,
        not from the files, which may have changed since).

        ``ssl`` reads keys only from files: they are written to a private temporary
        directory (0700, file 0600) and deleted at once.
        """
        with tempfile.TemporaryDirectory(prefix="korinet-") as tmp:
            cert_file = os.path.join(tmp, CERT_FILE)
            key_file = os.path.join(tmp, KEY_FILE)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.key_pem())
            with open(cert_file, "wb") as f:
                f.write(self.certificate.public_bytes(serialization.Encoding.PEM))
            context.load_cert_chain(cert_file, key_file)


def _check_private(path: Path) -> None:
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"the private key {path} is readable by others (mode {mode:04o}); "
            f"it must be private: run `chmod 600 {path}`"
        )


def _current(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    """Whether ``cert`` is for ``key`` and issued under the current anchor."""
    if key_fingerprint(cert.public_key()) != key_fingerprint(key.public_key()):
        return False
    try:
        cert.verify_directly_issued_by(x509.load_der_x509_certificate(anchor_certificate_der()))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _issue_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A certificate for ``key`` issued under the public anchor (see anchor.py).

    Usable for both TLS roles; it names no host (peers pin the key, not a name) and
    says nothing about the owner (the certificate is sent to whoever connects).
    """
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "KoriNet identity")]))
        .issuer_name(ANCHOR_NAME)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(anchor_key().public_key()), critical=False
        )
        .sign(anchor_key(), hashes.SHA256())
    )
