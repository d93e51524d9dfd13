"""The reconnection policy of every client, sans-I/O: when to dial again, when to
give up, and which connection errors no retry can fix.

Delays: an immediate first retry, then capped exponential backoff with jitter
(half of each delay random), so that a thousand clients cut at once do not all
come back at once. A completed handshake restarts the sequence.
"""

from __future__ import annotations

import random
import ssl as ssl_module
from collections.abc import Iterator

from .exceptions import AuthenticationError, ConnectionClosedError, KoriNetError, KoriNetTimeout
from .session import CloseCode

__all__ = ["Reconnect", "Reconnecting", "backoff", "fatal_error"]


def backoff(
    initial: float = 0.05, factor: float = 2.0, cap: float = 5.0, rng: random.Random | None = None
) -> Iterator[float]:
    """Yield delays: 0, then uniform(c/2, c) with c = min(cap, initial * factor**n), n = 0, 1, ...

    A caller restarts the generator after a success (the websockets client does the same).
    """
    draw = (rng or random).uniform
    yield 0.0
    ceiling = initial
    while True:
        yield draw(ceiling / 2, ceiling)
        ceiling = min(cap, ceiling * factor)


class Reconnect:
    """Backoff and outage limit for one client (``address`` names it in errors)."""

    def __init__(self, address: str, *, cap: float = 5.0, outage_limit: float | None = None) -> None:
        self.address = address
        self.cap = cap
        self.outage_limit = outage_limit
        #: connection attempts made (a metrics plugin reads it)
        self.attempts = 0
        #: the last connection error, for messages while reconnecting
        self.last_error: BaseException | None = None
        self._delays = backoff(cap=cap)
        self._outage_since: float | None = None

    def opened(self) -> None:
        """A handshake completed: the next outage starts from an immediate retry."""
        self._delays = backoff(cap=self.cap)
        self._outage_since = None

    def next_delay(self, opened: bool, now: float) -> float | KoriNetTimeout:
        """After an attempt failed or a link dropped (``opened``: it had completed a
        handshake): seconds until the next attempt, or the error that ends the
        session because the outage lasted longer than ``outage_limit``."""
        if opened:
            self._delays = backoff(cap=self.cap)
            self._outage_since = now
        elif self._outage_since is None:
            self._outage_since = now
        if self.outage_limit is not None and now - self._outage_since > self.outage_limit:
            return KoriNetTimeout(
                f"no connection to {self.address} for {self.outage_limit}s (last error: {self.last_error})"
            )
        return next(self._delays)


class Reconnecting:
    """What a reconnecting client (asyncio or blocking) shows of its policy."""

    reconnect: Reconnect

    @property
    def last_error(self) -> BaseException | None:
        """The last connection error, for messages while reconnecting."""
        return self.reconnect.last_error

    @last_error.setter
    def last_error(self, error: BaseException | None) -> None:
        self.reconnect.last_error = error

    @property
    def attempts(self) -> int:
        """Connection attempts made (a metrics plugin reads it)."""
        return self.reconnect.attempts

    @property
    def backoff_cap(self) -> float:
        return self.reconnect.cap

    @property
    def outage_limit(self) -> float | None:
        return self.reconnect.outage_limit


def fatal_error(exc: BaseException, address: str) -> KoriNetError | None:
    """The error that ends the session when connecting failed with ``exc``, or None
    when a retry may succeed. A pinned key that does not match, a certificate that
    does not verify and a plaintext server answering TLS are fatal."""
    if isinstance(exc, AuthenticationError):
        return exc
    if isinstance(exc, ssl_module.SSLCertVerificationError):
        error = ConnectionClosedError(CloseCode.AUTH_FAILED, f"TLS verification failed: {exc}")
        error.__cause__ = exc
        return error
    if isinstance(exc, ssl_module.SSLError):
        from .security.tls import plaintext_answer  # TLS users only pay for cryptography

        return plaintext_answer(exc, address)
    return None
