"""A token bucket: the hub's flood control (pure, the clock is passed in)."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``burst`` messages at once, then ``rate`` per second.

    A rate of 0 (or less) disables the limit.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.tokens = self.burst
        self.stamp = now

    def delay(self, now: float) -> float:
        """Seconds until a token is available (0.0: one is), without taking it."""
        if self.rate <= 0:
            return 0.0
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        return max(0.0, (1.0 - tokens) / self.rate)

    def take(self, now: float) -> float:
        """Take one token. Returns 0.0 when one was there, else the seconds to wait
        until one will be (the token is then already spent: waiting is the price)."""
        if self.rate <= 0:
            return 0.0
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self.rate
