"""The rules both servers take from korinet/serving.py, sans-I/O: which detached
session goes first past max_detached, and how long a failed authentication holds
back its address (AuthFailures.retry_in, what the blocking server enforces)."""

from __future__ import annotations

import pytest

from korinet.serving import (
    AUTH_DELAY_FIRST,
    AUTH_DELAY_MAX,
    AUTH_FAILURE_MEMORY,
    AuthFailures,
    DetachedSessions,
)


def test_past_the_limit_the_session_detached_longest_goes_first() -> None:
    detached: DetachedSessions[str] = DetachedSessions(2)
    assert detached.note("a") == [] and detached.note("b") == []
    assert detached.note("c") == ["a"]
    detached.forget("b")  # resumed: it leaves the line
    assert detached.note("d") == []
    assert list(detached) == ["c", "d"] and len(detached) == 2 and "a" not in detached
    assert detached.note("e") == ["c"]
    detached.forget("a")  # (gone already: nothing happens)
    assert list(detached) == ["d", "e"]


def test_a_limit_of_zero_expires_every_detached_session_at_once() -> None:
    detached: DetachedSessions[str] = DetachedSessions(0)
    assert detached.note("a") == ["a"] and not detached


def test_each_failure_holds_its_address_back_longer_until_a_success() -> None:
    failures = AuthFailures()
    assert failures.failed("10.0.0.1", 100.0, "p") == 0.0  # a typo costs nothing
    assert failures.retry_in("10.0.0.1", 100.0) == 0.0
    assert failures.failed("10.0.0.1", 101.0, "p") == AUTH_DELAY_FIRST
    assert failures.retry_in("10.0.0.1", 101.2) == pytest.approx(AUTH_DELAY_FIRST - 0.2)
    assert failures.retry_in("10.0.0.1", 101.0 + AUTH_DELAY_FIRST) == 0.0
    assert failures.retry_in("10.0.0.2", 101.2) == 0.0  # per address
    delays = [failures.failed("10.0.0.1", 200.0 + i, "p") for i in range(8)]
    assert delays == [2 * AUTH_DELAY_FIRST * 2**i for i in range(5)] + [AUTH_DELAY_MAX] * 3
    assert failures.retry_in("10.0.0.1", 207.0) == AUTH_DELAY_MAX
    failures.succeeded("10.0.0.1")
    assert failures.retry_in("10.0.0.1", 207.0) == 0.0


def test_failures_are_forgotten_after_a_while() -> None:
    failures = AuthFailures()
    for i in range(5):
        failures.failed("10.0.0.1", float(i), "p")
    later = 4.0 + AUTH_FAILURE_MEMORY + 1
    assert failures.retry_in("10.0.0.1", later) == 0.0
    assert failures.failed("10.0.0.1", later, "p") == 0.0  # counted from one again
