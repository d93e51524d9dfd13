"""Handshake frames and the server-side handshake parser (docs/PROTOCOL.md §3).

HELLO, WELCOME and CLOSE bodies are msgpack maps whatever codec the session later
uses, so they can be read before anything is negotiated. Every field is validated:
a peer's map never reaches the session unchecked.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import Any, Final, TypedDict

import msgpack

from ..exceptions import (
    AuthenticationError,
    KoriNetError,
    NegotiationError,
    RemoteProtocolError,
)
from ..security.passphrase import NONCE_SIZE, PROOF_SIZE, KdfParams, PassphraseVerifier
from ..wire.buffer import FrameDecoder
from ..wire.frames import PREFACE, FrameType, encode_frame
from .negotiation import choose_codec, choose_version
from .state import CloseCode, SessionConfig

__all__ = [
    "HANDSHAKE_MAX_FRAME",
    "Challenge",
    "HandshakeOutcome",
    "Hello",
    "ResumeRequest",
    "ServerHandshake",
    "Welcome",
    "decode_close",
    "decode_control",
    "encode_close",
    "encode_control",
    "parse_challenge",
    "parse_hello",
    "parse_welcome",
]

#: Handshake frames are small; a bigger one is hostile.
HANDSHAKE_MAX_FRAME: Final = 64 * 1024


class ResumeRequest(TypedDict):
    id: str
    token: str
    received: int


@dataclass(frozen=True, slots=True)
class Hello:
    """A validated HELLO plus the server's choices."""

    versions: tuple[int, ...]
    codecs: tuple[str, ...]
    heartbeat: float
    window: int
    window_bytes: int
    max_frame: int
    resume: ResumeRequest | None
    agent: str
    auth_nonce: bytes | None = None  # the client has a passphrase (§3.4)
    version: int = 0  # chosen by the server
    codec: str = ""  # chosen by the server
    server_proof: bytes | None = None  # the server's passphrase proof, for the WELCOME


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    codec: str
    session: str
    token: str
    resumed: bool
    received: int
    heartbeat: float
    window: int
    window_bytes: int
    max_frame: int
    expired: str | None
    auth: bytes | None = None  # the server's passphrase proof (§3.4)


@dataclass(frozen=True, slots=True)
class Challenge:
    """A server's CHALLENGE: prove the passphrase for this nonce (§3.4)."""

    nonce: bytes
    salt: bytes
    params: KdfParams


def encode_control(ftype: FrameType, fields: dict[str, Any]) -> bytes:
    return encode_frame(ftype, msgpack.packb(fields, use_bin_type=True))


def decode_control(body: bytes) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:
        raise RemoteProtocolError(f"control frame is not valid msgpack: {exc}") from exc
    if not isinstance(value, dict):
        raise RemoteProtocolError("control frame body is not a map")
    return value


def encode_close(code: int, reason: str, **extra: Any) -> bytes:
    return encode_control(FrameType.CLOSE, {"code": int(code), "reason": reason, **extra})


def decode_close(body: bytes) -> tuple[int, str, dict[str, Any]]:
    fields = decode_control(body)
    code = _field(fields, "code", int)
    reason = _field(fields, "reason", str, "")
    return code, reason, fields


def _field(fields: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    value = fields.get(name, default)
    if value is ...:
        raise RemoteProtocolError(f"handshake field {name!r} is missing")
    if value is None and default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RemoteProtocolError(f"handshake field {name!r} has the wrong type")
    return value


def _positive(value: Any, name: str) -> Any:
    # "not value > 0" also refuses NaN; an infinite heartbeat would disable dead-peer detection
    if not value > 0 or value == math.inf:
        raise RemoteProtocolError(f"handshake field {name!r} must be positive and finite")
    return value


def _list_of(fields: dict[str, Any], name: str, kind: type) -> tuple[Any, ...]:
    value = _field(fields, name, list)
    if (
        not value
        or len(value) > 64
        or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    ):
        raise RemoteProtocolError(f"handshake field {name!r} must be a short list of {kind.__name__}")
    return tuple(value)


def parse_hello(body: bytes) -> Hello:
    fields = decode_control(body)
    resume = fields.get("resume")
    if resume is not None:
        if not isinstance(resume, dict):
            raise RemoteProtocolError("handshake field 'resume' must be a map")
        resume = ResumeRequest(
            id=_field(resume, "id", str),
            token=_field(resume, "token", str),
            received=_field(resume, "received", int),
        )
        if resume["received"] < 0:
            raise RemoteProtocolError("resume.received must not be negative")
    auth = fields.get("auth")
    auth_nonce = None
    if auth is not None:
        if not isinstance(auth, dict):
            raise RemoteProtocolError("handshake field 'auth' must be a map")
        auth_nonce = _field(auth, "nonce", bytes)
        if len(auth_nonce) != NONCE_SIZE:
            raise RemoteProtocolError(f"auth.nonce must be {NONCE_SIZE} bytes")
    return Hello(
        versions=_list_of(fields, "versions", int),
        codecs=_list_of(fields, "codecs", str),
        heartbeat=_positive(_field(fields, "heartbeat", float), "heartbeat"),
        window=_positive(_field(fields, "window", int), "window"),
        window_bytes=_positive(_field(fields, "window_bytes", int), "window_bytes"),
        max_frame=_positive(_field(fields, "max_frame", int), "max_frame"),
        resume=resume,
        agent=_field(fields, "agent", str, ""),
        auth_nonce=auth_nonce,
    )


def parse_welcome(body: bytes) -> Welcome:
    fields = decode_control(body)
    return Welcome(
        version=_field(fields, "version", int),
        codec=_field(fields, "codec", str),
        session=_field(fields, "session", str),
        token=_field(fields, "token", str),
        resumed=_field(fields, "resumed", bool),
        received=_field(fields, "received", int),
        heartbeat=_positive(_field(fields, "heartbeat", float), "heartbeat"),
        window=_positive(_field(fields, "window", int), "window"),
        window_bytes=_positive(_field(fields, "window_bytes", int), "window_bytes"),
        max_frame=_positive(_field(fields, "max_frame", int), "max_frame"),
        expired=_field(fields, "expired", str, None),
        auth=_field(fields, "auth", bytes, None),
    )


def parse_challenge(body: bytes) -> Challenge:
    fields = decode_control(body)
    kdf = _field(fields, "kdf", dict)
    if kdf.get("name") != "scrypt":
        raise RemoteProtocolError(f"unknown passphrase key derivation {kdf.get('name')!r}")
    return Challenge(
        nonce=_field(fields, "nonce", bytes),
        salt=_field(fields, "salt", bytes),
        params=KdfParams(_field(kdf, "n", int), _field(kdf, "r", int), _field(kdf, "p", int)),
    )


class HandshakeOutcome(enum.Enum):
    NEED_DATA = "need-data"
    HELLO = "hello"  # a valid HELLO: see ServerHandshake.hello
    LEGACY = "legacy"  # the peer speaks the legacy v2 wire: see ServerHandshake.leftover
    REJECTED = "rejected"  # see ServerHandshake.error; send data_to_send() then close


class ServerHandshake:
    """Reads the first bytes of an accepted connection (sans-I/O).

    Feed bytes with :meth:`receive_data` until it returns something other than
    ``NEED_DATA``. ``HELLO``: hand :attr:`hello` and :attr:`leftover` to a Session.
    ``LEGACY``: hand :attr:`leftover` (every byte so far) to the legacy server.
    ``REJECTED``: write :meth:`data_to_send` (a CLOSE frame) and close; :attr:`error`
    is the typed reason (an :class:`AuthenticationError` for a missing or wrong
    passphrase, which a server answers after its failed-authentication delay).

    With a ``passphrase`` verifier, a valid HELLO is answered with a CHALLENGE
    (write :meth:`data_to_send` whenever it has bytes) and the outcome is ``HELLO``
    only once the client's AUTH proves the passphrase (§3.4). The v2 wire cannot
    prove one, so it is refused.
    """

    def __init__(
        self,
        config: SessionConfig,
        codecs: tuple[str, ...],
        *,
        legacy: bool = True,
        passphrase: PassphraseVerifier | None = None,
    ) -> None:
        self.config = config
        self.codecs = codecs
        self.legacy = legacy and passphrase is None
        self.passphrase = passphrase
        self.hello: Hello | None = None
        self.error: KoriNetError | None = None
        self.leftover = b""
        self._preface = bytearray()
        self._decoder: FrameDecoder | None = None
        self._out = b""
        self._challenged: tuple[Hello, bytes] | None = None  # (HELLO, server nonce) awaiting AUTH

    @property
    def saw_preface(self) -> bool:
        """Whether the peer sent the v3 preface (so it can read a CLOSE frame)."""
        return self._decoder is not None

    def data_to_send(self) -> bytes:
        out, self._out = self._out, b""
        return out

    def _reject(self, error: KoriNetError, code: CloseCode, **extra: Any) -> HandshakeOutcome:
        self.error = error
        self._out = encode_close(code, str(error), **extra)
        return HandshakeOutcome.REJECTED

    def receive_data(self, data: bytes) -> HandshakeOutcome:
        if self._decoder is None:
            self._preface += data
            if len(self._preface) < len(PREFACE):
                if PREFACE.startswith(bytes(self._preface)) or self.legacy:
                    return HandshakeOutcome.NEED_DATA
                return self._reject(RemoteProtocolError("not a KoriNet peer"), CloseCode.PROTOCOL_ERROR)
            head = bytes(self._preface[: len(PREFACE)])
            if head != PREFACE:
                if self.legacy:
                    self.leftover = bytes(self._preface)
                    return HandshakeOutcome.LEGACY
                return self._reject(
                    RemoteProtocolError("not a KoriNet peer (bad preface)"), CloseCode.PROTOCOL_ERROR
                )
            self._decoder = FrameDecoder(HANDSHAKE_MAX_FRAME)
            data = bytes(self._preface[len(PREFACE) :])
        self._decoder.feed(data)
        try:
            frame = self._decoder.next_frame()
            if frame is None:
                return HandshakeOutcome.NEED_DATA
            if self._challenged is not None:
                if frame.type is not FrameType.AUTH:
                    raise RemoteProtocolError(f"expected AUTH, got {frame.type.name}")
                return self._check_proof(_field(decode_control(frame.body), "proof", bytes))
            if frame.type is not FrameType.HELLO:
                raise RemoteProtocolError(f"expected HELLO, got {frame.type.name}")
            hello = parse_hello(frame.body)
        except RemoteProtocolError as exc:
            return self._reject(exc, CloseCode.PROTOCOL_ERROR)
        try:
            version = choose_version(self.config.versions, hello.versions)
        except NegotiationError as exc:
            return self._reject(exc, CloseCode.UNSUPPORTED_VERSION, versions=list(self.config.versions))
        try:
            codec = choose_codec(self.codecs, hello.codecs)
        except NegotiationError as exc:
            return self._reject(exc, CloseCode.UNSUPPORTED_CODEC, codecs=list(self.codecs))
        hello = replace(hello, version=version, codec=codec)
        if self.passphrase is not None:
            if hello.auth_nonce is None:
                return self._reject(
                    AuthenticationError("this server requires a passphrase, and the client offered none"),
                    CloseCode.AUTH_FAILED,
                )
            nonce, fields = self.passphrase.challenge()
            self._challenged = (hello, nonce)
            self._out = encode_control(FrameType.CHALLENGE, fields)
            return self.receive_data(b"") if self._decoder.buffered else HandshakeOutcome.NEED_DATA
        return self._accept(hello)

    def _check_proof(self, proof: bytes) -> HandshakeOutcome:
        assert self._challenged is not None and self.passphrase is not None
        hello, server_nonce = self._challenged
        assert hello.auth_nonce is not None
        server_proof = None
        if len(proof) == PROOF_SIZE:
            server_proof = self.passphrase.check(hello.auth_nonce, server_nonce, proof)
        if server_proof is None:
            return self._reject(AuthenticationError("wrong passphrase"), CloseCode.AUTH_FAILED)
        return self._accept(replace(hello, server_proof=server_proof))

    def _accept(self, hello: Hello) -> HandshakeOutcome:
        assert self._decoder is not None
        self.hello = hello
        self.leftover = self._decoder.take_rest()
        return HandshakeOutcome.HELLO
