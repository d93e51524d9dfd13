"""The server's limits on connections and sessions, each with its answer:
max_connections (closed at accept), max_sessions (CLOSE 1009, the client retries
and gets in once there is room), max_detached (the session detached longest expires
early, and its client is told). Per-address caps, handshake timeout, frame size and
the failed-authentication delay are tested in test_hostile.py and tests/security/."""

from __future__ import annotations

import asyncio
import logging

import pytest
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Client, Server, SessionExpired
from korinet.plugins import PluginManager

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)


async def echo(peer) -> None:  # type: ignore[no-untyped-def]
    async for data in peer:
        peer.send_nowait(data)


async def wait_for(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + 10 * TIMEOUT_FACTOR
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def test_the_session_detached_longest_expires_first(caplog: pytest.LogCaptureFixture) -> None:
    plugins = PluginManager.load(entry_points=False)
    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins, max_detached=2) as server:
        hub = server.hub
        relays = [await Relay("127.0.0.1", server.port).start() for _ in range(3)]
        clients = [
            await Client.connect("127.0.0.1", r.port, plugins=plugins, backoff_cap=0.2, open_timeout=10)
            for r in relays
        ]
        ids = [c.session_id for c in clients]
        for r in relays:
            r.refuse = True  # stay detached until the test lets them back
        with caplog.at_level(logging.WARNING, logger="korinet.runtime.server"):
            for i, r in enumerate(relays):
                r.cut()
                await wait_for(lambda i=i: hub.sessions[ids[i]].conn is None, "the hub saw the detach")
        # The first one to detach is gone; the two others are still kept.
        assert ids[0] not in hub.sessions and ids[1] in hub.sessions and ids[2] in hub.sessions
        assert "more than 2 detached sessions" in caplog.text
        for r in relays:
            r.refuse = False
        with pytest.raises(SessionExpired) as info:
            await asyncio.wait_for(clients[0].recv(), 10 * TIMEOUT_FACTOR)
        assert info.value.session_id == ids[0]
        for c, sid in zip(clients[1:], ids[1:], strict=True):
            await c.send("still here")
            assert await c.recv(timeout=10 * TIMEOUT_FACTOR) == "still here"
            assert c.session_id == sid  # resumed, not replaced
        assert not hub._detached
        for c in clients:
            await c.close()
        for r in relays:
            await r.close()


async def test_max_connections_closes_the_one_too_many_at_accept() -> None:
    plugins = PluginManager.load(entry_points=False)
    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins, max_connections=2) as server:
        stalled = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await wait_for(lambda: len(server.hub.connections) == 2, "two connections held")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        # the third is closed without a word (it could be a v2 peer that misreads a CLOSE)
        assert await asyncio.wait_for(reader.read(), 10 * TIMEOUT_FACTOR) == b""
        writer.close()
        for _, w in stalled:
            w.close()
        await wait_for(lambda: not server.hub.connections, "the stalled ones gone")
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins, open_timeout=10)
        await client.send("room again")
        assert await client.recv(timeout=10 * TIMEOUT_FACTOR) == "room again"
        await client.close()


async def test_max_sessions_asks_the_next_client_to_retry_until_there_is_room() -> None:
    plugins = PluginManager.load(entry_points=False)
    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins, max_sessions=1) as server:
        first = await Client.connect("127.0.0.1", server.port, plugins=plugins, open_timeout=10)
        second = Client("127.0.0.1", server.port, plugins=plugins, backoff_cap=0.1)
        second.start()
        await wait_for(lambda: second.attempts >= 2, "the second client was refused and retried")
        assert not second.is_connected and len(server.hub.sessions) == 1
        assert "too many sessions" in str(second.last_error)
        await first.close()  # an orderly close frees the slot at once
        await second.wait_connected(10 * TIMEOUT_FACTOR)
        await second.send("my turn")
        assert await second.recv(timeout=10 * TIMEOUT_FACTOR) == "my turn"
        await second.close()
