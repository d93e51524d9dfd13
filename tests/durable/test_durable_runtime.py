"""Client and Server with a store, in one process: restart, resume, forget, fail."""

from __future__ import annotations

import asyncio
import random
import select
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR

from korinet import Client, ConnectionClosedError, Server, SessionExpired
from korinet.plugins import PluginManager
from korinet.runtime.store import SessionStore, StoreError
from korinet.session import SERVER

T = 10 * TIMEOUT_FACTOR


@pytest.fixture
def plugins() -> PluginManager:
    return PluginManager.load(entry_points=False)


class Collector:
    """A server application: records what each handler run received."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.runs: list[tuple[str | None, bool]] = []  # (session id, restored)

    async def handler(self, peer: Any) -> None:
        self.runs.append((peer.session_id, peer.restored))
        async for data in peer:
            self.received.append(data)


def client_sessions(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT count(*) FROM korinet_sessions").fetchone()[0])
    finally:
        db.close()


def stored_keys(path: Path) -> list[str]:
    store = SessionStore(path)
    try:
        return [r.key for r in store.records(SERVER)]
    finally:
        store.close()


@pytest.mark.timeout(60 * TIMEOUT_FACTOR)
async def test_both_sides_restart_and_resume_the_same_session(tmp_path: Path, plugins: PluginManager) -> None:
    app = Collector()
    server_db, client_db = tmp_path / "server.db", tmp_path / "client.db"
    server = await Server("127.0.0.1", 0, handler=app.handler, plugins=plugins, store=server_db).start()
    port = server.port
    client = await Client.connect("127.0.0.1", port, plugins=plugins, store=client_db)
    for i in range(1, 51):
        client.post(i)
    await client.wait_acked(50, timeout=T)
    for i in range(51, 101):
        client.post(i)  # accepted: in the store, whatever happens now
    session_id = client.session_id
    await client.abort()  # as if killed: no CLOSE, the store keeps the session
    await server.close()  # a stopping server keeps its sessions in the store too
    assert stored_keys(server_db) == [session_id]

    server = await Server("127.0.0.1", port, handler=app.handler, plugins=plugins, store=server_db).start()
    try:
        restored = server.hub.sessions[session_id]
        assert restored.restored and not restored.is_connected
        client = await Client.connect("127.0.0.1", port, plugins=plugins, store=client_db)
        assert client.session_id == session_id and client.last_seq == 100
        await client.wait_acked(100, timeout=T)
        assert app.received == list(range(1, 101))
        # The handler ran once for the new session, then again when the restored one resumed.
        assert app.runs == [(session_id, False), (session_id, True)]
        await client.close()
        assert client_sessions(client_db) == 0  # closed: forgotten
    finally:
        await server.close()
    assert stored_keys(server_db) == []  # closed by the client: forgotten


@pytest.mark.timeout(60 * TIMEOUT_FACTOR)
async def test_replies_and_requests_continue_after_a_client_restart(
    tmp_path: Path, plugins: PluginManager
) -> None:
    async def echo(peer: Any) -> None:
        async for data in peer:
            await peer.send(["echo", data])

    server = await Server("127.0.0.1", 0, handler=echo, plugins=plugins, store=tmp_path / "s.db").start()
    try:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins, store=tmp_path / "c.db")
        await client.send("a")
        assert await client.recv(timeout=T) == ["echo", "a"]
        client.post("b")
        await client.wait_acked(client.last_seq, timeout=T)
        await client.abort()  # "b"'s echo is on its way, or waiting in the server's buffer
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins, store=tmp_path / "c.db")
        assert await client.recv(timeout=T) == ["echo", "b"]  # delivered once, after the restart
        await client.send("c")
        assert await client.recv(timeout=T) == ["echo", "c"]
        await client.close()
    finally:
        await server.close()


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_a_restored_session_nobody_resumes_expires_and_is_deleted(
    tmp_path: Path, plugins: PluginManager
) -> None:
    db = tmp_path / "s.db"
    server = await Server("127.0.0.1", 0, plugins=plugins, store=db).start()
    client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
    client.post("x")  # (no handler reads it: never acknowledged)
    await client.abort()
    await server.close()
    assert len(stored_keys(db)) == 1
    server = await Server("127.0.0.1", 0, plugins=plugins, store=db, session_ttl=0.2 * TIMEOUT_FACTOR).start()
    try:
        assert len(server.hub.sessions) == 1
        (peer,) = server.hub.sessions.values()
        await asyncio.wait_for(asyncio.shield(peer.closed), T)
        assert server.hub.sessions == {}
    finally:
        await server.close()
    assert stored_keys(db) == []


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_a_stored_client_whose_server_forgot_it_starts_over(
    tmp_path: Path, plugins: PluginManager
) -> None:
    app = Collector()
    server = await Server("127.0.0.1", 0, handler=app.handler, plugins=plugins).start()  # no store
    port = server.port
    client = await Client.connect("127.0.0.1", port, plugins=plugins, store=tmp_path / "c.db")
    await client.send("before")
    old = client.session_id
    await client.abort()
    await server.close()
    server = await Server("127.0.0.1", port, handler=app.handler, plugins=plugins).start()
    try:
        client = await Client.connect("127.0.0.1", port, plugins=plugins, store=tmp_path / "c.db")
        with pytest.raises(SessionExpired):
            await client.recv(timeout=T)
        assert client.session_id != old
        await client.send("after", timeout=T)
        assert client.store is not None
        record = client.store.load("client")
        assert record is not None and record.snapshot.session_id == client.session_id
        await client.close()
    finally:
        await server.close()
    assert app.received == ["before", "after"]


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_a_store_used_by_two_clients_is_refused(tmp_path: Path, plugins: PluginManager) -> None:
    server = await Server("127.0.0.1", 0, plugins=plugins).start()
    try:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins, store=tmp_path / "c.db")
        with pytest.raises(StoreError, match="in use"):
            Client("127.0.0.1", server.port, plugins=plugins, store=tmp_path / "c.db")
        await client.close()
    finally:
        await server.close()


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_a_failing_store_ends_the_session_without_sending(
    tmp_path: Path, plugins: PluginManager
) -> None:
    app = Collector()
    server = await Server("127.0.0.1", 0, handler=app.handler, plugins=plugins).start()
    try:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins, store=tmp_path / "c.db")
        await client.send(1)
        assert client.store is not None
        client.store.db.close()  # the disk is gone, say
        with pytest.raises(StoreError):
            client.post(2)
        assert client.is_closed
        with pytest.raises(StoreError):
            await client.send(3)
        await asyncio.sleep(0.1 * TIMEOUT_FACTOR)
        assert app.received == [1]  # 2 was never accepted, so it never left either
    finally:
        await server.close()


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_without_a_store_nothing_changes(plugins: PluginManager) -> None:
    server = await Server("127.0.0.1", 0, plugins=plugins).start()
    try:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        assert client.store is None and server.hub.store is None
        client.post("x")
        (peer,) = server.hub.sessions.values()
        assert peer.store is None and not peer.restored
        await client.abort()
        assert isinstance(client.closed.result(), ConnectionClosedError)
    finally:
        await server.close()


class DyingListener(threading.Thread):
    """A server that keeps dying as it accepts: it listens, and a moment (0-3 ms)
    after a connection is queued it closes the listening socket, which resets the
    queued connection, as the kernel does when a server process is killed."""

    def __init__(self, port: int, cycles: int) -> None:
        super().__init__(daemon=True)
        self.port, self.cycles = port, cycles
        self.resets = 0
        self.stop = False

    def run(self) -> None:
        rng = random.Random(4)
        idle = 0
        while not self.stop and self.resets < self.cycles and idle < 3:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", self.port))
                s.listen(8)
                ready, _, _ = select.select([s], [], [], 1.0)
                time.sleep(rng.random() * 0.003)
            if ready:
                self.resets += 1
                idle = 0
            else:
                idle += 1  # nobody dialled for a second: the client has stalled


@pytest.mark.timeout(60 * TIMEOUT_FACTOR)
async def test_a_server_dying_as_it_accepts_does_not_stall_the_reconnect(plugins: PluginManager) -> None:
    """The reset can arrive after the client's connect succeeded but before the
    connection is attached to its session; the client must still see it and dial
    again (it used to wait on that dead connection forever)."""
    app = Collector()
    server = await Server("127.0.0.1", 0, handler=app.handler, plugins=plugins).start()
    port = server.port
    client = await Client.connect("127.0.0.1", port, plugins=plugins, backoff_cap=0.005)
    await client.send("before")
    await server.close()
    dying = DyingListener(port, cycles=500)
    dying.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, dying.join, 30 * TIMEOUT_FACTOR)
    dying.stop = True
    assert dying.resets == 500, f"the client stopped dialling after {dying.resets} resets"
    server = await Server("127.0.0.1", port, handler=app.handler, plugins=plugins).start()
    try:
        with pytest.raises(SessionExpired):  # (no store here: the server forgot it)
            await client.recv(timeout=T)
        await client.send("after", timeout=T)
        assert app.received == ["before", "after"]
        await client.close()
    finally:
        await server.close()


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_a_batch_commits_its_messages_together(tmp_path: Path, plugins: PluginManager) -> None:
    server = await Server("127.0.0.1", 0, plugins=plugins).start()  # no handler: nothing is acked
    db = tmp_path / "c.db"
    try:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins, store=db)
        assert client.store is not None
        reader = sqlite3.connect(db)  # another connection sees only what is committed
        try:
            with client.store.batch():
                assert client.store.batching
                for i in range(10):
                    client.post(i)
                # Only the first went out at once (and was committed before it left).
                assert reader.execute("SELECT count(*) FROM korinet_messages").fetchone()[0] == 1
            assert not client.store.batching
            assert reader.execute("SELECT count(*) FROM korinet_messages").fetchone()[0] == 10
            client.post(10)  # outside a batch: durable at once
            assert reader.execute("SELECT count(*) FROM korinet_messages").fetchone()[0] == 11
        finally:
            reader.close()
        await client.abort()
    finally:
        await server.close()
