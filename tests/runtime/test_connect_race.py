"""A connection that is reset between connect() and the client attaching to it must
count as a failed attempt, not leave the client waiting for a drop it never hears."""

from __future__ import annotations

from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR

from korinet import Client, Server
from korinet.plugins import PluginManager
from korinet.runtime import Connection

pytestmark = pytest.mark.timeout(30 * TIMEOUT_FACTOR)


async def echo(peer: Any) -> None:
    async for data in peer:
        peer.send_nowait(data)


async def test_a_reset_before_attach_is_a_failed_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    plugins = PluginManager.load(entry_points=False)
    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins) as server:
        client = Client("127.0.0.1", server.port, plugins=plugins, backoff_cap=0.05)
        real = client.loop.create_connection
        resets = 0

        async def reset_first_two(factory: Any, *args: Any, **kwargs: Any) -> tuple[Any, Connection]:
            nonlocal resets
            transport, conn = await real(factory, *args, **kwargs)
            if resets < 2:  # the reset arrives before the client's task resumes
                resets += 1
                transport.abort()
                conn.connection_lost(ConnectionResetError("reset by peer"))
            return transport, conn

        monkeypatch.setattr(client.loop, "create_connection", reset_first_two)
        client.start()
        await client.wait_connected(10 * TIMEOUT_FACTOR)
        await client.send("through")
        assert await client.recv(timeout=10 * TIMEOUT_FACTOR) == "through"
        assert resets == 2 and client.attempts == 3
        await client.close()
