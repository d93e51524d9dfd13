"""The names of the original API, and protocol.v2's size limit."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

import korinet
from korinet import FrameTooLarge, KoriNetError


def test_readme_imports_give_callables() -> None:
    # In KoriNet 0.0.1 these were modules, so the README's `client(...)` failed;
    # here they are what the README calls.
    from korinet import client, protocol, server

    assert callable(client) and isinstance(client, type)
    assert callable(server) and isinstance(server, type)
    assert callable(protocol.v2) and isinstance(protocol.v2, type)
    assert korinet.client is client and korinet.server is server
    assert korinet.protocol is protocol


def test_v2_default_limit_is_the_originals() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert korinet.protocol.v2(b).maxSizeBuffer == 524288


@pytest.mark.timeout(30)
def test_v2_refuses_a_4gib_prefix_before_reading_the_body() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(10)  # if it waited for the body it would time out, not raise FrameTooLarge
        a.sendall(struct.pack("!I", 2**32 - 1))  # 4 GiB announced, nothing follows
        session = korinet.protocol.v2(b)
        started = time.monotonic()
        with pytest.raises(FrameTooLarge) as info:
            session.recv()
        elapsed = time.monotonic() - started
    assert elapsed < 1.0, elapsed
    assert info.value.length == 2**32 - 1
    assert info.value.limit == 524288
    assert isinstance(info.value, KoriNetError)


@pytest.mark.timeout(30)
def test_v2_limit_is_inclusive_and_configurable() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(10)
        sender, receiver = korinet.protocol.v2(a), korinet.protocol.v2(b, maxSizeBuffer=100)
        # a body of exactly the limit is accepted (as in the original), one byte more is not
        [fill] = [k for k in range(100) if len(korinet.wire.legacy.encode_v2({"p": "x" * k})) == 4 + 100]
        sender.send({"p": "x" * fill})
        assert receiver.recv()["p"] == "x" * fill
        a.sendall(struct.pack("!I", 101))
        with pytest.raises(FrameTooLarge):
            receiver.recv()


@pytest.mark.timeout(30)
def test_v2_round_trip_and_eof() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(10)
        b.settimeout(10)
        left, right = korinet.protocol.v2(a), korinet.protocol.v2(b)
        # a writer that splits the frame: v2 reassembles by the length prefix
        frame = korinet.wire.legacy.encode_v2({"type": "ping", "n": 1}, "f" * 32)

        def trickle() -> None:
            for i in range(len(frame)):
                a.sendall(frame[i : i + 1])

        writer = threading.Thread(target=trickle)
        writer.start()
        assert right.recv(giveID=True) == {"type": "ping", "n": 1, "id": "f" * 32}
        writer.join(10)
        right.send({"status": True})
        reply = left.recv()
        assert reply["status"] is True and len(reply["id"]) == 32
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(korinet.ConnectionClosedError):
            right.recv()


@pytest.mark.timeout(60)
def test_a_v2_peer_s_server_waits_in_one_blocking_read_and_honours_timeouts() -> None:
    """server(conn) for an original v2 client: recv(timeout) raises KoriNetTimeout and the
    connection lives on; the socket stays blocking (SO_RCVTIMEO bounds each read: one
    system call per read, no poll() before it, as the original itself reads)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    peer = socket.create_connection(listener.getsockname(), timeout=10)
    with listener, peer:
        v2 = korinet.protocol.v2(peer)
        v2.send({"n": 1})
        conn, _ = listener.accept()
        conn.setblocking(True)
        srv = korinet.server(conn)
        assert srv.legacy
        assert srv.recv(timeout=10)["n"] == 1
        assert v2.recv()["statusP"] is True
        for timeout in (0.2, 0.0):
            with pytest.raises(korinet.KoriNetTimeout):
                srv.recv(timeout=timeout)
        assert srv.peer.sock.gettimeout() is None, "the socket must stay blocking"
        done = threading.Event()

        def later() -> None:
            v2.send({"n": 2})
            assert v2.recv()["statusP"] is True
            done.set()

        sender = threading.Thread(target=later)
        sender.start()
        assert srv.recv(timeout=10)["n"] == 2
        sender.join(10)
        assert done.is_set()
        replies: list[object] = []

        def acknowledge() -> None:  # as the original client's recv(): take it, then statusP
            replies.append(v2.recv())
            v2.send({"statusP": True})

        reader = threading.Thread(target=acknowledge)
        reader.start()
        srv.send({"status": True})  # returns once the v2 peer acknowledged it
        reader.join(10)
        assert [r["status"] for r in replies] == [True]  # type: ignore[index]
