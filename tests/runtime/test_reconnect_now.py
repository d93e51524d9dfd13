"""Client.reconnect_now(): a caller who knows the server is back (it announced itself)
cuts the backoff wait short instead of sleeping it out."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Client, Server
from korinet import reconnect as reconnect_module
from korinet.plugins import PluginManager

pytestmark = pytest.mark.timeout(30 * TIMEOUT_FACTOR)

WAIT = 10 * TIMEOUT_FACTOR


async def echo(peer: Any) -> None:
    async for data in peer:
        peer.send_nowait(data)


def one_hour_waits(**kwargs: Any) -> Iterator[float]:
    """Backoff that retries at once, then waits an hour: only a nudge brings the link back."""
    yield 0.0
    while True:
        yield 3600.0


async def test_reconnect_now_cuts_the_backoff_wait_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconnect_module, "backoff", one_hour_waits)
    plugins = PluginManager.load(entry_points=False)
    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins) as server:
        relay = await Relay("127.0.0.1", server.port).start()
        client = await Client.connect("127.0.0.1", relay.port, plugins=plugins, open_timeout=WAIT)
        try:
            assert relay._server is not None
            port = relay.port
            relay._server.close()  # the server "goes away": connections are refused
            await relay._server.wait_closed()
            attempts = client.attempts
            relay.cut()
            # the immediate retry is refused; then the hour starts
            while client.attempts == attempts or not isinstance(client.last_error, ConnectionRefusedError):
                await asyncio.sleep(0.01)
            assert not client.is_connected
            relay._server = await asyncio.start_server(relay._accept, "127.0.0.1", port)
            await asyncio.sleep(0.2)  # back, but the client sleeps its hour...
            assert not client.is_connected
            client.reconnect_now()  # ...until told
            await client.wait_connected(WAIT)
            await client.send("back")
            assert await client.recv(timeout=WAIT) == "back"
        finally:
            await client.close()
            await relay.close()
