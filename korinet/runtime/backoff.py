"""Reconnection delays: an immediate first retry, then capped exponential backoff
with jitter (half of each delay random), so that a thousand clients cut at once
do not all come back at once."""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["backoff"]


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
