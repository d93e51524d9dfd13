"""A pre-shared passphrase, proven by challenge-response (docs/PROTOCOL.md §3.4).

The passphrase never crosses the wire. Both sides derive a key from it with scrypt
and a salt the server picks; each then proves it holds the key with an HMAC over
both sides' fresh nonces. The client proves first (in an AUTH frame, answering the
server's CHALLENGE); the server proves itself in its WELCOME, so a client never
joins a hub that does not know the passphrase either.

Pure functions and small state holders, no I/O: the session layer calls them.

What it does not do: an eavesdropper on a *plaintext* link who records one exchange
can test passphrase guesses offline (scrypt makes each guess cost ~50 ms). Over TLS
(the apps' default) the exchange is encrypted and guesses must be made online, where
the server's growing delay after failures bounds them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Final

__all__ = [
    "NONCE_SIZE",
    "KdfParams",
    "PassphraseProver",
    "PassphraseVerifier",
]

NONCE_SIZE: Final = 16
SALT_SIZE: Final = 16
PROOF_SIZE: Final = 32
#: a hostile server must not make a client spend more than this on one derivation
MAX_SCRYPT_N: Final = 1 << 17
_CLIENT_LABEL: Final = b"korinet passphrase v1 client"
_SERVER_LABEL: Final = b"korinet passphrase v1 server"


@dataclass(frozen=True, slots=True)
class KdfParams:
    """scrypt cost parameters (the server chooses, the client checks they are sane)."""

    n: int = 1 << 14
    r: int = 8
    p: int = 1

    def acceptable(self) -> bool:
        return (
            2 <= self.n <= MAX_SCRYPT_N
            and self.n & (self.n - 1) == 0
            and 1 <= self.r <= 16
            and 1 <= self.p <= 4
        )

    def derive(self, passphrase: str, salt: bytes) -> bytes:
        return hashlib.scrypt(
            passphrase.encode(), salt=salt, n=self.n, r=self.r, p=self.p, maxmem=256 * 1024 * 1024, dklen=32
        )


def _proof(key: bytes, label: bytes, client_nonce: bytes, server_nonce: bytes, salt: bytes) -> bytes:
    return hmac.new(key, label + client_nonce + server_nonce + salt, hashlib.sha256).digest()


class PassphraseVerifier:
    """The server's side: one salt and one derived key for the server's lifetime
    (so an unauthenticated client never makes the server run scrypt)."""

    def __init__(self, passphrase: str, params: KdfParams | None = None) -> None:
        if not passphrase:
            raise ValueError("the passphrase must not be empty")
        self.params = params or KdfParams()
        self.salt = secrets.token_bytes(SALT_SIZE)
        self._key = self.params.derive(passphrase, self.salt)

    def challenge(self) -> tuple[bytes, dict[str, object]]:
        """A fresh server nonce and the CHALLENGE fields that carry it."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        fields: dict[str, object] = {
            "nonce": nonce,
            "salt": self.salt,
            "kdf": {"name": "scrypt", "n": self.params.n, "r": self.params.r, "p": self.params.p},
        }
        return nonce, fields

    def check(self, client_nonce: bytes, server_nonce: bytes, proof: bytes) -> bytes | None:
        """The server's own proof if the client's is right, else None."""
        expected = _proof(self._key, _CLIENT_LABEL, client_nonce, server_nonce, self.salt)
        if not hmac.compare_digest(expected, proof):
            return None
        return _proof(self._key, _SERVER_LABEL, client_nonce, server_nonce, self.salt)


class PassphraseProver:
    """The client's side. Keeps the key of the last salt, so a reconnect to the same
    server does not run scrypt again."""

    def __init__(self, passphrase: str) -> None:
        if not passphrase:
            raise ValueError("the passphrase must not be empty")
        self._passphrase = passphrase
        self._cache: tuple[bytes, KdfParams, bytes] | None = None
        self.nonce = b""
        self._expected_server_proof = b""

    def __repr__(self) -> str:  # never show the passphrase in a traceback or a log
        return "PassphraseProver(<hidden>)"

    def new_nonce(self) -> bytes:
        """A fresh client nonce for the next HELLO."""
        self.nonce = secrets.token_bytes(NONCE_SIZE)
        self._expected_server_proof = b""
        return self.nonce

    def answer(self, server_nonce: bytes, salt: bytes, params: KdfParams) -> bytes:
        """The client's proof for a CHALLENGE. Raises ValueError on unusable parameters."""
        if len(server_nonce) != NONCE_SIZE or not 8 <= len(salt) <= 64 or not params.acceptable():
            raise ValueError("the server's passphrase challenge has unusable parameters")
        if self._cache is not None and self._cache[0] == salt and self._cache[1] == params:
            key = self._cache[2]
        else:
            key = params.derive(self._passphrase, salt)
            self._cache = (salt, params, key)
        self._expected_server_proof = _proof(key, _SERVER_LABEL, self.nonce, server_nonce, salt)
        return _proof(key, _CLIENT_LABEL, self.nonce, server_nonce, salt)

    def server_proved(self, proof: object) -> bool:
        """Whether the WELCOME's proof shows the server knows the passphrase too."""
        return (
            bool(self._expected_server_proof)
            and isinstance(proof, bytes)
            and hmac.compare_digest(self._expected_server_proof, proof)
        )
