"""The blocking API keeps its promise through cut connections.

The server side is the README's pattern (an accept loop, ``server(conn)``, then
``recv(giveID=True)`` / ``send`` until the connection fails, then accept again);
the client is ``korinet.client``. A relay between them cuts every connection at
random moments, half of the time inside a frame, while the ping/reply traffic
flows. Every ping must reach the server application exactly once and in order,
every reply the client application, and the client must stay in one session.
"""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest
from relay import Relay

from korinet import KoriNetError, client, server

N = 10_000  # messages each way (runs in ~15 s here)
CUTS = 24  # >= 20 cuts; a few spare in case one lands on a handshake
DEADLINE_S = 75.0


class ServerApp:
    """The README server loop, bounded, recording what its application receives."""

    def __init__(self, listener: socket.socket, n: int) -> None:
        self.listener = listener
        self.n = n
        self.received: list[int] = []
        self.accepted = 0
        self.legacy: list[bool] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="readme-server", daemon=True)

    def _run(self) -> None:
        self.listener.settimeout(0.5)
        deadline = time.monotonic() + DEADLINE_S
        while len(self.received) < self.n and not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            try:
                srv = server(conn)
                self.legacy.append(srv.legacy)
                while len(self.received) < self.n and not self.stop.is_set():
                    msg = srv.recv(giveID=True, timeout=10)
                    assert set(msg) == {"type", "num", "id"}, msg
                    self.received.append(msg["num"])
                    # if the link drops during send(), the reply is still delivered on resume
                    srv.send({"status": True, "num": msg["num"]})
            except (KoriNetError, OSError) as exc:  # a cut: accept the client's next connection
                self.failures.append(type(exc).__name__)


@pytest.mark.timeout(90)
def test_blocking_api_survives_cuts() -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    listener = socket.create_server(("127.0.0.1", 0))
    app = ServerApp(listener, N)
    app.thread.start()
    sent = 0
    replies: list[int] = []
    cut_log: list[tuple[int, bool]] = []
    done = threading.Event()
    # cut once traffic passes each of these message counts (spread over the run)
    milestones = sorted(rng.sample(range(N // 40, N - N // 40), CUTS))

    with Relay(listener.getsockname()) as relay:

        def cutter() -> None:
            for milestone in milestones:
                while sent < milestone and not done.is_set():
                    time.sleep(0.001)
                if done.is_set():
                    return
                time.sleep(rng.uniform(0, 0.003))  # anywhere in a round trip
                mid = relay.cut(mid_frame=rng.random() < 0.5, timeout=2.0)
                cut_log.append((sent, mid))

        cutter_thread = threading.Thread(target=cutter, name="cutter", daemon=True)
        cli = client("127.0.0.1", relay.port, timeout=10)
        session_id = cli.runtime.session_id
        assert session_id is not None
        started = time.monotonic()
        cutter_thread.start()
        try:
            for num in range(N):
                cli.send({"type": "ping", "num": num})
                sent = num + 1
                reply = cli.recv(timeout=10)
                replies.append(reply["num"])
                assert reply == {"status": True, "num": num}, (seed, reply)
        finally:
            done.set()
            cutter_thread.join(5)
        elapsed = time.monotonic() - started
        stats = cli.runtime.session.stats
        assert cli.runtime.session_id == session_id
        cli.close()
        app.thread.join(10)
        app.stop.set()
        listener.close()

    print(
        f"\n{N} messages each way in {elapsed:.1f}s; {relay.cuts} cuts ({relay.mid_frame_cuts} mid-frame), "
        f"{relay.accepted} relayed connections, server accepted {app.accepted}; client resumes "
        f"{stats.resumes}, replayed {stats.replayed}, duplicates dropped {stats.duplicates_dropped}; "
        f"seed {seed}"
    )
    assert app.received == list(range(N)), seed
    assert replies == list(range(N)), seed
    assert not any(app.legacy)
    assert relay.cuts >= 20, cut_log
    assert relay.mid_frame_cuts >= 5, cut_log
    assert stats.resumes >= 20, (stats, cut_log)
