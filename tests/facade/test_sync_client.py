"""korinet.sync.SyncClient: the blocking client that does its own I/O.

The server side is the asyncio runtime on KoriNet's shared loop thread (so the
client's threads are the only ones doing blocking calls here); a fault-injecting
relay (tests/testutil/relay.py) sits between them where a test needs one.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

import korinet
from korinet import (
    ConnectionClosedOK,
    InvalidState,
    KoriNetTimeout,
    Message,
    MessageRejected,
    MessageType,
    Server,
    SessionConfig,
    SessionExpired,
    hookimpl,
)
from korinet._loopthread import run
from korinet.plugins import PluginManager
from korinet.sync import SyncClient

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)


@pytest.fixture
def plugins() -> PluginManager:
    return PluginManager.load(entry_points=False)


class Recorder:
    """A server application that takes every message and records it."""

    def __init__(self) -> None:
        self.got: list[Any] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    async def handler(self, peer: korinet.Peer) -> None:
        async for data in peer:
            with self.changed:
                self.got.append(data)
                self.changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> list[Any]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.got) >= count, timeout)
            return list(self.got)


async def _echo(peer: korinet.Peer) -> None:
    async for data in peer:
        await peer.send(data)


def start_server(handler: Callable[[korinet.Peer], Coroutine[Any, Any, None]], **kwargs: Any) -> Server:
    return run(Server("127.0.0.1", kwargs.pop("port", 0), handler=handler, **kwargs).start())


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        run(server.close())


def on_loop(fn: Callable[[], Any]) -> Any:
    """Call fn on the server loop (the relay's methods are not thread-safe)."""

    async def call() -> Any:
        return fn()

    return run(call())


def test_heartbeats_are_answered_while_the_application_sleeps(
    plugins: PluginManager, servers: list[Server]
) -> None:
    config = SessionConfig(heartbeat_interval=0.2)  # the server drops a client silent for 0.5 s
    recorder = Recorder()
    server = start_server(recorder.handler, plugins=plugins, config=config)
    servers.append(server)
    cli = SyncClient("127.0.0.1", server.port, config=config, plugins=plugins, timeout=5)
    try:
        cli.send("before")
        time.sleep(2.0)  # the application is busy elsewhere: no call into the client
        session_id = cli.session_id
        assert session_id is not None
        server_peer = server.hub.sessions[session_id]
        assert server_peer.session.stats.heartbeat_timeouts == 0
        assert server_peer.session.stats.links == 1, "the server dropped the idle client"
        assert cli.session.stats.links == 1 and cli.session.stats.heartbeat_timeouts == 0
        assert cli.rtt is not None, "the client's own PINGs went out and were answered"
        cli.send("after")
        assert recorder.wait_for(2, 5) == ["before", "after"]
        assert cli.session.stats.links == 1
    finally:
        cli.close()


def test_server_restart_raises_session_expired_then_carries_on(
    plugins: PluginManager, servers: list[Server]
) -> None:
    server = start_server(_echo, plugins=plugins)
    port = server.port
    cli = SyncClient("127.0.0.1", port, plugins=plugins, timeout=10)
    try:
        cli.send("before")
        assert cli.recv(timeout=5) == "before"
        old_session = cli.session_id
        run(server.close())  # every session forgotten, as after a crash
        servers.append(start_server(_echo, plugins=plugins, port=port))
        with pytest.raises(SessionExpired) as info:
            cli.recv(timeout=10)
        assert info.value.session_id == old_session
        cli.send("after")
        assert cli.recv(timeout=5) == "after"
        assert cli.session_id not in (None, old_session)
    finally:
        cli.close()


def test_timed_out_send_keeps_its_message_and_delivers_it_once(
    plugins: PluginManager, servers: list[Server]
) -> None:
    recorder = Recorder()
    server = start_server(recorder.handler, plugins=plugins)
    servers.append(server)
    relay: Relay = run(Relay("127.0.0.1", server.port).start())
    cli = SyncClient("127.0.0.1", relay.port, plugins=plugins, timeout=0.5)
    try:
        cli.send("first")
        session_id = cli.session_id

        def go_down() -> None:
            relay.refuse = True  # connections are accepted and reset: the server looks down
            relay.cut()

        on_loop(go_down)
        started = time.monotonic()
        with pytest.raises(KoriNetTimeout):
            cli.send("while down")
        assert 0.4 < time.monotonic() - started < 3.0
        assert cli.queued == 1, "the timed-out message stays queued"
        assert recorder.wait_for(2, 0.3) == ["first"]
        on_loop(lambda: setattr(relay, "refuse", False))
        # nobody calls the client: its background thread reconnects and delivers it
        assert recorder.wait_for(2, 10) == ["first", "while down"]
        cli.timeout = 10
        cli.send("after")
        assert recorder.wait_for(3, 5) == ["first", "while down", "after"]
        assert cli.session_id == session_id, "the session resumed"
        assert cli.queued == 0
    finally:
        cli.close()
        run(relay.close())
    assert recorder.got == ["first", "while down", "after"], "exactly once"


def test_two_threads_send_concurrently(plugins: PluginManager, servers: list[Server]) -> None:
    recorder = Recorder()
    server = start_server(recorder.handler, plugins=plugins)
    servers.append(server)
    cli = SyncClient("127.0.0.1", server.port, plugins=plugins, timeout=10)
    n = 500
    errors: list[BaseException] = []

    def sender(name: str) -> None:
        try:
            for i in range(n):
                cli.send({"from": name, "i": i})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(name,)) for name in ("a", "b")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        got = recorder.wait_for(2 * n, 5)
        assert len(got) == 2 * n
        for name in ("a", "b"):
            assert [m["i"] for m in got if m["from"] == name] == list(range(n))
        assert cli.queued == 0
    finally:
        cli.close()


def test_senders_wait_for_window_space(servers: list[Server]) -> None:
    """More threads than the window has room for: the extra sends wait (backpressure)."""
    recorder = Recorder()
    plugins = PluginManager.load(entry_points=False)
    server = start_server(recorder.handler, plugins=plugins)
    servers.append(server)
    cli = SyncClient("127.0.0.1", server.port, plugins=plugins, config=SessionConfig(window=2), timeout=10)
    errors: list[BaseException] = []

    def sender(name: int) -> None:
        try:
            for i in range(50):
                cli.send([name, i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(5)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        got = recorder.wait_for(250, 5)
        for k in range(5):
            assert [i for name, i in got if name == k] == list(range(50))
        assert cli.session.send_window == 2
    finally:
        cli.close()


def test_one_thread_receives_while_another_sends(plugins: PluginManager, servers: list[Server]) -> None:
    """A thread blocked in recv() must not keep another thread's send() from going out."""
    server = start_server(_echo, plugins=plugins)
    servers.append(server)
    cli = SyncClient("127.0.0.1", server.port, plugins=plugins, timeout=10)
    received: list[Any] = []

    def receiver() -> None:
        for _ in range(100):
            received.append(cli.recv(timeout=10))

    thread = threading.Thread(target=receiver)
    try:
        thread.start()
        time.sleep(0.2)  # let the receiver block in recv() first (it leads the reading)
        for i in range(100):
            cli.send(i)
        thread.join(10)
        assert received == list(range(100))
    finally:
        cli.close()


class ClientTypes:
    """Message types the client knows: one with a handler, one left to recv()."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def double(self, peer: Any, msg: Message) -> Any:
        self.threads.append(threading.current_thread().name)
        return msg.data * 2

    def blocking(self, peer: Any, msg: Message) -> Any:
        try:
            peer.send("from a handler")
        except InvalidState:
            return "refused"
        return "sent"

    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [
            MessageType("test.double", handler=self.double),
            MessageType("test.blocking", handler=self.blocking),
            MessageType("test.note"),
        ]


def test_typed_messages_handlers_and_rejections(servers: list[Server]) -> None:
    types = ClientTypes()
    client_plugins = PluginManager.load(entry_points=False, extra=[types])
    outcome: dict[str, Any] = {}
    done = threading.Event()

    async def app(peer: korinet.Peer) -> None:
        try:
            await peer.recv()  # the client says hello first
            outcome["double"] = await peer.request(21, "test.double", timeout=5)
            outcome["blocking"] = await peer.request(None, "test.blocking", timeout=5)
            await peer.send({"text": "kept"}, "test.note")
            try:
                await peer.send("?", "test.unknown")
            except MessageRejected as exc:
                outcome["rejected"] = exc.reason
            await peer.send("last")
        finally:
            done.set()
        await asyncio.sleep(3600)

    server = start_server(app, plugins=PluginManager.load(entry_points=False))
    servers.append(server)
    cli = SyncClient("127.0.0.1", server.port, plugins=client_plugins, timeout=10)
    try:
        cli.send("hello")
        note = cli.recv_message(timeout=10)  # handlers ran in this (the reading) thread
        assert note.type == "test.note" and note.data == {"text": "kept"}
        assert note.message_id == f"{cli.session_id}-{note.seq}"
        assert cli.recv(timeout=10) == "last"
        assert done.wait(5)
        assert outcome["double"] == 42
        assert outcome["blocking"] == "refused"
        assert "unknown message type 'test.unknown'" in outcome["rejected"]
        assert types.threads == [threading.current_thread().name]
        # and the other way: the server rejects a type it does not know
        with pytest.raises(MessageRejected):
            cli.send("?", "test.note")
        assert cli.request("ping", "korinet.echo", timeout=5) == "ping"
    finally:
        cli.close()


def test_idle_client_runs_handlers_in_its_background_thread(servers: list[Server]) -> None:
    """Nobody calls the client: its background thread still answers requests."""
    types = ClientTypes()
    client_plugins = PluginManager.load(entry_points=False, extra=[types])
    outcome: dict[str, Any] = {}
    done = threading.Event()

    async def app(peer: korinet.Peer) -> None:
        try:
            await peer.recv()
            await asyncio.sleep(0.3)  # the client application is idle by now
            outcome["double"] = await peer.request(4, "test.double", timeout=5)
            outcome["blocking"] = await peer.request(None, "test.blocking", timeout=5)
        finally:
            done.set()
        await asyncio.sleep(3600)

    server = start_server(app, plugins=PluginManager.load(entry_points=False))
    servers.append(server)
    cli = SyncClient("127.0.0.1", server.port, plugins=client_plugins, timeout=10)
    try:
        cli.send("hello")
        assert done.wait(10)  # (the test thread makes no call into the client meanwhile)
        assert outcome == {"double": 8, "blocking": "refused"}
        assert types.threads == [f"korinet-sync-127.0.0.1:{server.port}"]
    finally:
        cli.close()


def test_close_ends_the_session_and_wakes_a_blocked_receiver(
    plugins: PluginManager, servers: list[Server]
) -> None:
    recorder = Recorder()
    server = start_server(recorder.handler, plugins=plugins)
    servers.append(server)
    cli = SyncClient("127.0.0.1", server.port, plugins=plugins, timeout=10)
    outcome: list[BaseException] = []

    def receiver() -> None:
        try:
            cli.recv()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=receiver)
    thread.start()
    time.sleep(0.2)
    cli.send("x")
    cli.close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionClosedOK)
    with pytest.raises(ConnectionClosedOK):
        cli.send("after close")
    assert cli._bg_thread is not None and not cli._bg_thread.is_alive()
    deadline = time.monotonic() + 5
    while server.hub.sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.hub.sessions, "the server saw the CLOSE"


@pytest.fixture
def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts around a fresh self-signed certificate for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    return server_ctx, client_ctx


def test_tls_round_trips_and_resumes_across_a_cut(
    plugins: PluginManager, servers: list[Server], tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = tls_contexts
    server = start_server(_echo, plugins=plugins, ssl=server_ctx)
    servers.append(server)
    relay: Relay = run(Relay("127.0.0.1", server.port).start())
    cli = SyncClient("127.0.0.1", relay.port, plugins=plugins, ssl=client_ctx, timeout=10)
    try:
        session_id = cli.session_id
        for i in range(200):
            cli.send({"i": i, "pad": "x" * (i * 100)})  # up to 20 KB: several TLS records
            assert cli.recv(timeout=10) == {"i": i, "pad": "x" * (i * 100)}
            if i % 50 == 25:
                on_loop(relay.cut)
        assert cli.session_id == session_id
        assert cli.session.stats.resumes >= 4
    finally:
        cli.close()
        run(relay.close())


def test_tls_refuses_an_unknown_certificate(
    plugins: PluginManager, servers: list[Server], tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, _ = tls_contexts
    server = start_server(_echo, plugins=plugins, ssl=server_ctx)
    servers.append(server)
    started = time.monotonic()
    with pytest.raises(korinet.ConnectionClosedError) as info:
        SyncClient(
            "127.0.0.1", server.port, plugins=plugins, ssl=ssl.create_default_context(), open_timeout=10
        )
    assert info.value.code == korinet.session.CloseCode.AUTH_FAILED
    assert time.monotonic() - started < 5, "verification failures are not retried"


def test_pinned_tls_identities(plugins: PluginManager, servers: list[Server], tmp_path: Path) -> None:
    """tls=ClientTLS as with the asyncio Client: mutual TLS, the server's key pinned
    on first use and checked before the HELLO on every connection."""
    from korinet.exceptions import HostKeyChanged
    from korinet.security import AuthorizedKeys, ClientTLS, Identity, KnownHosts, ServerTLS

    server_key, alice = Identity.generate(), Identity.generate()
    authorized = AuthorizedKeys(tmp_path / "authorized_keys")
    authorized.authorize(alice.fingerprint, "alice")
    known_hosts = KnownHosts(tmp_path / "known_hosts")
    seen: list[Any] = []

    async def app(peer: korinet.Peer) -> None:
        seen.append(peer.identity.name)
        await _echo(peer)

    server = start_server(app, plugins=plugins, tls=ServerTLS(server_key, authorized=authorized))
    servers.append(server)
    port = server.port
    relay: Relay = run(Relay("127.0.0.1", port).start())
    tls = ClientTLS(alice, known_hosts=known_hosts, on_first_use=lambda *_: None)
    cli = SyncClient("127.0.0.1", relay.port, plugins=plugins, tls=tls, timeout=10)
    try:
        assert cli.identity.fingerprint == server_key.fingerprint
        cli.send("one")
        assert cli.recv(timeout=5) == "one"
        on_loop(relay.cut)
        cli.send("two")
        assert cli.recv(timeout=5) == "two"
        assert cli.session.stats.resumes == 1 and seen == ["alice"]
        cli.close()
        run(server.close())
        # another key behind the same address: refused before any HELLO, not retried
        impostor = start_server(app, plugins=plugins, port=port, tls=ServerTLS(Identity.generate()))
        servers.append(impostor)
        started = time.monotonic()
        with pytest.raises(HostKeyChanged):
            SyncClient("127.0.0.1", relay.port, plugins=plugins, tls=tls, open_timeout=10)
        assert time.monotonic() - started < 5
        assert not impostor.hub.sessions
    finally:
        cli.close()
        run(relay.close())


def test_facade_runs_on_the_sync_client(plugins: PluginManager, servers: list[Server]) -> None:
    server = start_server(_echo, plugins=plugins)
    servers.append(server)
    with korinet.client("127.0.0.1", server.port, timeout=5, plugins=plugins) as cli:
        assert isinstance(cli.runtime, SyncClient)
        cli.send({"n": 1})
        reply = cli.recv(giveID=True, timeout=5)
        assert reply == {"n": 1, "id": f"{cli.runtime.session_id}-1"}
        assert cli.runtime.session.stats.messages_sent == 1


def test_first_connection_times_out_with_the_last_error() -> None:
    with socket_closed_port() as port:
        started = time.monotonic()
        with pytest.raises(KoriNetTimeout) as info:
            SyncClient("127.0.0.1", port, open_timeout=0.5)
        assert time.monotonic() - started < 3
        assert isinstance(info.value.__cause__, OSError)


class socket_closed_port:  # noqa: N801 - a context manager used like a function
    """A loopback port with nothing listening."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        pass
