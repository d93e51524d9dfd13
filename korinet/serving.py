"""What every KoriNet server decides about a new connection, sans-I/O.

The asyncio :class:`~korinet.runtime.server.Hub` and the blocking ``server(conn)``
(:mod:`korinet.sync.server`) make the same decisions with different I/O, so the
decisions live here, once: who a TLS client is (its certificate's key against the
authorized keys), whether a HELLO resumes a session (its token, its codec, and the
identity the session is bound to), the CLOSE code of a rejected handshake, how
long a failed authentication holds back the next one, and which detached session
goes first when too many wait for their clients.
"""

from __future__ import annotations

import enum
import hmac
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from .codecs.base import default_offer
from .exceptions import AuthenticationError, KoriNetError, NegotiationError
from .session import CloseCode, HandshakeOutcome, Hello, ServerHandshake, SessionConfig

if TYPE_CHECKING:
    from .codecs.base import Codec
    from .endpoint import SessionHandle
    from .security import AuthorizedKeys, PeerIdentity

__all__ = [
    "AUTH_DELAY_FIRST",
    "AUTH_DELAY_MAX",
    "AUTH_FAILURE_MEMORY",
    "AuthFailures",
    "DetachedSessions",
    "Verdict",
    "authenticate",
    "find_resumable",
    "fingerprint_of",
    "handshake_step",
    "rejection_code",
    "server_codecs",
]

logger = logging.getLogger(__name__)

#: The delay after a second failed authentication from one address; it doubles after
#: each further one, up to AUTH_DELAY_MAX.
AUTH_DELAY_FIRST: Final = 0.5
AUTH_DELAY_MAX: Final = 30.0
#: Failures older than this (seconds) are forgotten.
AUTH_FAILURE_MEMORY: Final = 600.0

H = TypeVar("H", bound="SessionHandle")
D = TypeVar("D")


def fingerprint_of(identity: Any) -> str | None:
    """The key fingerprint of a peer's identity (None: anonymous)."""
    return getattr(identity, "fingerprint", None)


def authenticate(
    authorized: AuthorizedKeys, certificate: bytes | None, peername: str, log: logging.Logger = logger
) -> tuple[PeerIdentity | None, str | None, str | None]:
    """Check a TLS client's certificate (DER, as the TLS layer gives it) against the
    authorized keys. Returns ``(identity, None, fingerprint)``, or ``(None, reason,
    fingerprint)`` when the client is refused (the reason is what it is told). The
    outcome is logged to ``log`` (the server's logger)."""
    from .security.identity import certificate_fingerprint  # TLS users only pay for cryptography

    try:
        fingerprint = certificate_fingerprint(certificate) if certificate else None
    except ValueError:  # OpenSSL accepted it, so this should not happen
        fingerprint = None
    if fingerprint is None:
        log.warning("%s: refused: no client certificate", peername)
        return (
            None,
            "this server admits only authorized keys, and the client presented none "
            "(connect with TLS and an identity)",
            None,
        )
    entry = authorized.lookup(fingerprint)
    if entry is None:
        log.warning("%s: refused: key %s is not authorized", peername, fingerprint)
        return (
            None,
            f"key {fingerprint} is not authorized on this server "
            f"(its operator can run: korinet authorize {fingerprint} --name NAME)",
            fingerprint,
        )
    log.info("%s: authenticated as %s (%s)", peername, entry.name, fingerprint)
    return entry.identity(), None, fingerprint


def find_resumable(
    sessions: Mapping[str, H], hello: Hello, identity: Any, peername: str, log: logging.Logger = logger
) -> tuple[H | None, str | None, str | None]:
    """The session a HELLO may resume. Returns ``(session, None, None)`` to resume it,
    ``(None, expired_id, None)`` for a new session (the client is told its old one is
    gone), ``(None, None, None)`` for a new session without a resume request, or
    ``(None, None, reason)`` to refuse: a resume token is bound to the identity that
    opened the session, so a stolen one is useless to anyone else (docs/SECURITY.md)."""
    resume = hello.resume
    if resume is None:
        return None, None, None
    handle = sessions.get(resume["id"])
    if handle is not None:
        session = handle.session
        if (
            session.token is not None
            and hmac.compare_digest(session.token, resume["token"])
            and session.codec is not None
            and session.codec.name in hello.codecs
        ):
            if fingerprint_of(handle.identity) != fingerprint_of(identity):
                log.warning(
                    "%s: refused: %s presented the resume token of %r, which belongs to %s",
                    peername,
                    fingerprint_of(identity) or "an anonymous client",
                    handle,
                    fingerprint_of(handle.identity) or "an anonymous client",
                )
                return None, None, "this session belongs to another identity"
            log.debug("%s: resumes %r", peername, handle)
            return handle, None, None
    log.info("%s: asked to resume unknown session %s", peername, resume["id"])
    return None, resume["id"], None


class Verdict(enum.Enum):
    """What a server does after feeding bytes to its :class:`ServerHandshake`."""

    WAIT = "wait"  #: read more
    WRITE = "write"  #: write the bytes (a passphrase CHALLENGE), then read more
    REFUSE = "refuse"  #: the HELLO is in: answer the refusal decided before it
    AUTH_FAILED = "auth failed"  #: wrong or missing passphrase: answer after the delay
    REJECT = "reject"  #: write the bytes (a CLOSE with the reason) and close
    LEGACY = "legacy"  #: serve the original v2 wire (``handshake.leftover``)
    HELLO = "hello"  #: open or resume a session (``handshake.hello``)


def handshake_step(
    handshake: ServerHandshake, data: bytes, refused: bool, peername: str, log: logging.Logger = logger
) -> tuple[Verdict, bytes]:
    """Feed ``data`` to ``handshake``; returns what to do, and the bytes to write for
    WRITE and REJECT. ``refused``: the connection is already refused (TLS client key,
    plaintext at a TLS server), and waits for the HELLO only so that the client reads
    our CLOSE (written earlier, it could be lost to the reset its late HELLO causes)."""
    outcome = handshake.receive_data(data)
    if outcome is HandshakeOutcome.NEED_DATA:
        challenge = handshake.data_to_send()  # a passphrase CHALLENGE after the HELLO
        if not challenge:
            return Verdict.WAIT, b""
        if not refused:
            return Verdict.WRITE, challenge
        # else the HELLO is in: refuse now, the client can read our CLOSE
    if refused:
        return Verdict.REFUSE, b""
    if outcome is HandshakeOutcome.REJECTED:
        if isinstance(handshake.error, AuthenticationError):
            log.warning("%s: refused: %s", peername, handshake.error)
            return Verdict.AUTH_FAILED, b""
        log.warning("%s: handshake rejected: %s", peername, handshake.error)
        return Verdict.REJECT, handshake.data_to_send()
    if outcome is HandshakeOutcome.LEGACY:
        log.info("%s: speaks the legacy v2 wire", peername)
        return Verdict.LEGACY, b""
    return Verdict.HELLO, b""


def server_codecs(config: SessionConfig, codecs: Mapping[str, Codec]) -> tuple[str, ...]:
    """The codec names a server offers, its preference first: those its config pins
    (or the default offer), then every other codec it has."""
    pinned = config.codecs or default_offer(codecs)
    return tuple(n for n in pinned if n in codecs) + tuple(n for n in codecs if n not in pinned)


def rejection_code(error: KoriNetError | None) -> CloseCode:
    """The CLOSE code ServerHandshake sent with a rejection that is not an
    authentication failure (it keeps only the bytes)."""
    if isinstance(error, NegotiationError):
        return CloseCode.UNSUPPORTED_CODEC if error.what == "codec" else CloseCode.UNSUPPORTED_VERSION
    return CloseCode.PROTOCOL_ERROR


class AuthFailures:
    """Failed authentications per address, and the delay each one imposes: it doubles
    with every failure from the same address (reset by a success, forgotten after
    AUTH_FAILURE_MEMORY). The asyncio Hub answers a failure only after its delay;
    the blocking server answers at once and closes the address's next connections
    until the delay has passed (:meth:`retry_in`), so that a guesser does not stall
    its single-threaded accept loop. Either way, with the per-address connection
    limit, it bounds the rate of guesses."""

    def __init__(self, log: logging.Logger = logger) -> None:
        self._log = log
        #: address -> (failures, time of the last one)
        self._failures: dict[str, tuple[int, float]] = {}

    def failed(self, address: str, now: float, peername: str) -> float:
        """Count a failure from ``address``; returns its delay (seconds)."""
        count, last = self._failures.get(address, (0, now))
        if now - last > AUTH_FAILURE_MEMORY:
            count = 0
        self._failures[address] = (count + 1, now)
        delay = _auth_delay(count + 1)
        if delay:
            self._log.warning("%s: failed authentication #%d from %s, delayed %.1fs", peername,
                           count + 1, address, delay)  # fmt: skip
        return delay

    def retry_in(self, address: str, now: float) -> float:
        """Seconds until the delay of the last failure from ``address`` has passed
        (0.0: it may try now)."""
        count, last = self._failures.get(address, (0, now))
        return max(last + _auth_delay(count) - now, 0.0)

    def succeeded(self, address: str) -> None:
        """A success clears the address."""
        self._failures.pop(address, None)


def _auth_delay(failures: int) -> float:
    """The delay imposed by the ``failures``-th failure in a row: none for the first."""
    return min(AUTH_DELAY_FIRST * 2 ** (failures - 2), AUTH_DELAY_MAX) if failures > 1 else 0.0


class DetachedSessions(Generic[D]):
    """The sessions waiting for their client to come back, the one detached longest
    first, at most ``limit`` of them: clients that connect and vanish must not fill
    the server (memory, and the blocking server's threads) until their TTL. Beyond
    the limit the one detached longest is taken off, for the server to expire now
    (its client gets SessionExpired, as after the TTL). Not thread-safe."""

    def __init__(self, limit: int, log: logging.Logger = logger) -> None:
        self.limit = limit
        self._log = log
        self._order: dict[D, None] = {}  # a dict keeps insertion order

    def note(self, session: D) -> list[D]:
        """``session`` lost its link. Returns the sessions to expire early, taken off."""
        self._order[session] = None
        overflow = []
        while len(self._order) > self.limit:
            oldest = next(iter(self._order))
            del self._order[oldest]
            self._log.warning(
                "%r: expired early: more than %d detached sessions (max_detached)", oldest, self.limit
            )
            overflow.append(oldest)
        return overflow

    def forget(self, session: D) -> None:
        """``session`` resumed or ended."""
        self._order.pop(session, None)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, session: object) -> bool:
        return session in self._order

    def __iter__(self) -> Iterator[D]:
        return iter(list(self._order))
