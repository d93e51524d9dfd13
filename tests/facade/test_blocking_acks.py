"""When the blocking drivers acknowledge what recv() hands out.

The ACK of the inbox's last message waits for the application's next call:
- an answer (recv() then send()) is one write carrying the ACK and the answer, as
  a raw ping-pong is, instead of an ACK and then the answer;
- a recv() that must block sends the ACK first, from the application's thread;
- an application that does neither (busy elsewhere) still has it sent, by the
  background thread, so the sender's send() returns.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR, wait_until

from korinet import client, server
from korinet.sync.driver import SyncDriver
from korinet.sync.server import SyncServerSession
from korinet.wire.buffer import FrameDecoder
from korinet.wire.frames import FrameType

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)

T = 20 * TIMEOUT_FACTOR  # generous waits for events


def _frame_types(data: bytes) -> list[FrameType]:
    decoder = FrameDecoder(1 << 20)
    decoder.feed(data)
    return [FrameType(kind) for kind, _ in decoder.frames()]


class _Writes:
    """Every write of one driver: (thread name, frame types written)."""

    def __init__(self, driver: SyncDriver) -> None:
        self.log: list[tuple[str, list[FrameType]]] = []
        self.lock = threading.Lock()
        real = driver._write_raw

        def spy(data: bytes) -> None:
            with self.lock:
                self.log.append((threading.current_thread().name, _frame_types(bytes(data))))
            real(data)

        driver._write_raw = spy  # type: ignore[method-assign]

    def take(self) -> list[tuple[str, list[FrameType]]]:
        with self.lock:
            log, self.log = self.log, []
        return log


def _no_background_reading(self: SyncServerSession) -> bool:
    """A background step that never reads (as when the application calls often)."""
    self._stopping.wait(0.05)
    return not self._stopping.is_set()


@contextmanager
def _pair(monkeypatch: pytest.MonkeyPatch, background: bool) -> Iterator[tuple[Any, Any, _Writes]]:
    """A plaintext client() and the server(conn) serving it, whose writes are logged.
    Without ``background``, the server's background thread never reads, so which
    thread writes what is deterministic."""
    if not background:
        monkeypatch.setattr(SyncServerSession, "_background_step", _no_background_reading)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[Any] = []
    accepting = threading.Thread(target=lambda: accepted.append(server(listener.accept()[0])), daemon=True)
    accepting.start()
    cli = client("127.0.0.1", listener.getsockname()[1], timeout=T)
    accepting.join(T)
    srv = accepted[0]

    def warm_up() -> None:
        cli.send("warm-up")
        assert cli.recv(timeout=T) == "back"

    # one exchange each way, so that the handshake's writes and the warm-up's ACKs are
    # behind us (srv.send() returns on the ACK of its answer, sent by the client's
    # background thread)
    thread = threading.Thread(target=warm_up)
    thread.start()
    assert srv.recv(timeout=T) == "warm-up"
    srv.send("back")
    thread.join(T)
    writes = _Writes(srv.peer)
    try:
        yield cli, srv, writes
    finally:
        srv.close()  # (first: the client's background thread answers its CLOSE)
        cli.close()
        listener.close()


def test_an_answer_is_one_write_that_carries_the_ack(monkeypatch: pytest.MonkeyPatch) -> None:
    with _pair(monkeypatch, background=False) as (cli, srv, writes):
        answers: list[Any] = []

        def ask() -> None:
            cli.send("ping")
            answers.append(cli.recv(timeout=T))

        asker = threading.Thread(target=ask)
        asker.start()
        assert srv.recv(timeout=T) == "ping"
        srv.send("pong")
        asker.join(T)
        assert answers == ["pong"]
        assert [types for _, types in writes.take()] == [[FrameType.MSG, FrameType.ACK]]


def test_a_recv_that_blocks_sends_the_ack_first(monkeypatch: pytest.MonkeyPatch) -> None:
    with _pair(monkeypatch, background=False) as (cli, srv, writes):
        sent = threading.Event()

        def send_two() -> None:
            cli.send("one")  # returns on the ACK of "one"
            sent.set()
            cli.send("two")
            assert cli.recv(timeout=T) == "bye"

        sender = threading.Thread(target=send_two)
        sender.start()
        assert srv.recv(timeout=T) == "one"
        assert srv.recv(timeout=T) == "two"  # "one" had to be acknowledged first
        assert sent.is_set()
        srv.send("bye")  # (with the ACK of "two")
        sender.join(T)
        log = writes.take()
        assert log[0] == (threading.current_thread().name, [FrameType.ACK]), log


def test_an_application_busy_elsewhere_still_has_its_ack_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    with _pair(monkeypatch, background=True) as (cli, srv, writes):
        returned = threading.Event()
        me = threading.get_ident()

        def send_one() -> None:
            # once the application's own recv() reads: it takes "one", the ACK is left owed
            wait_until(lambda: srv.peer._leader == me, timeout=T, what="recv() reading")
            cli.send("one")
            returned.set()

        sender = threading.Thread(target=send_one)
        sender.start()
        assert srv.recv(timeout=T) == "one"
        # no further call on srv until the sender's send() has returned
        assert returned.wait(T), "the ACK of a message the application took never went out"
        sender.join(T)
        log = writes.take()
        assert log and log[0][1] == [FrameType.ACK], log
        assert log[0][0] != threading.current_thread().name, "not the background thread"
