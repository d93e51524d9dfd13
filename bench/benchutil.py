"""Shared helpers for the peers: stats, deadlines and spawned server processes."""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

LOOPBACK = "127.0.0.1"

# Window and ack cadence shared by every windowed peer, so the figures compare.
WINDOW = 1024
ACK_EVERY = 64

# Hard cap on the life of any child we start, whatever happens to the parent.
CHILD_MAX_S = 180.0
# How long to wait for outstanding acks once sending has stopped.
DRAIN_S = 10.0

# "spawn" gives each child a fresh interpreter: its own GIL and no inherited
# event loop, zmq context or paho thread (fork would copy those half-alive).
MP = mp.get_context("spawn")


def korinet_setup() -> str:
    """What KoriNet's side runs with here: the codec its sessions agree on and the
    plugins that load beyond what ``pip install .`` brings (a zstd plugin, say,
    compresses every message). Set KORINET_DISABLE_PLUGINS to leave them out."""
    from korinet.plugins import DISABLE_ENV, LOADED, default_manager

    pm = default_manager()
    extra = sorted(
        p.name for p in pm.plugins() if p.state == LOADED and p.distribution not in ("", "korinet")
    )
    text = f"codec {pm.codec_offer()[0]}, " + (
        f"more plugins loaded: {', '.join(extra)}" if extra else "no plugins beyond the apps"
    )
    disabled = os.environ.get(DISABLE_ENV, "")
    return text + (f", {DISABLE_ENV}={disabled}" if disabled else "")


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); no interpolation, so p99 is a real sample."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def latency_figures(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50/p99 in microseconds from per-exchange nanosecond samples."""
    return {
        "p50": percentile(samples_ns, 50) / 1000.0,
        "p99": percentile(samples_ns, 99) / 1000.0,
    }


class Deadline:
    """Monotonic deadline; every measurement loop checks one so none can run away."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers that can't report port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> bool:
    """Poll until something accepts TCP on the loopback port, bounded by timeout."""
    deadline = Deadline(timeout)
    while not deadline.expired():
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@contextlib.contextmanager
def spawn_child(
    target: Callable[..., None], *args: Any, startup_timeout: float = 30.0
) -> Iterator[tuple[Connection, Any]]:
    """Run target(conn, *args) in a spawned process and yield (conn, first message).

    The child must send one message once it is ready (usually its port). On exit we
    send "stop" (children poll for it when idle), then join, then terminate this one
    process if it still lingers.
    """
    parent, child = MP.Pipe()
    proc = MP.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(startup_timeout):
            raise RuntimeError(f"{getattr(target, '__name__', target)} did not start")
        yield parent, parent.recv()
    finally:
        with contextlib.suppress(OSError, ValueError):
            parent.send("stop")
        proc.join(5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)
        parent.close()


def stop_requested(conn: Connection) -> bool:
    """True once the parent asked a child to stop (or went away)."""
    try:
        return conn.poll(0)
    except (OSError, EOFError):
        return True
