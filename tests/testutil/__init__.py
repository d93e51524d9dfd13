"""Shared test settings. Every timing in the runtime tests scales by one factor."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

#: Raise on a slow machine (e.g. KORINET_TEST_TIMEOUT_FACTOR=3) instead of editing tests.
TIMEOUT_FACTOR = float(os.environ.get("KORINET_TEST_TIMEOUT_FACTOR", "1"))


async def eventually(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Wait until ``predicate()`` is true, checking every few milliseconds, or fail after
    ``timeout`` seconds (scaled by TIMEOUT_FACTOR). For tests that wait for an effect
    they cannot await directly: the wait ends as soon as the effect is there, so the
    outcome does not depend on the machine's speed, only the time it takes."""
    deadline = time.monotonic() + timeout * TIMEOUT_FACTOR
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout * TIMEOUT_FACTOR:.0f} s: {what or predicate}")
        await asyncio.sleep(0.005)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """The blocking twin of :func:`eventually`."""
    deadline = time.monotonic() + timeout * TIMEOUT_FACTOR
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout * TIMEOUT_FACTOR:.0f} s: {what or predicate}")
        time.sleep(0.005)
