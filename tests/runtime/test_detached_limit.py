"""max_detached: clients that vanish cannot fill the server's session table; past
the limit the session detached longest expires early, and its client is told."""

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
