"""The acked path's cost in counts (bench/acked_profile.py measures the same): how
many writes and scheduled callbacks a message takes, independent of machine speed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR

from korinet import Client, KoriNetTimeout, Peer, Server
from korinet.plugins import PluginManager

T = 10 * TIMEOUT_FACTOR


async def _consume(peer: Peer) -> None:
    async for _ in peer:
        pass


def _count_writes(peer: Peer) -> list[bytes]:
    """Record every non-empty write on the peer's current connection."""
    conn = peer.conn
    assert conn is not None
    writes: list[bytes] = []
    write = conn.write

    def counting(data: bytes) -> None:
        if data:
            writes.append(data)
        write(data)

    conn.write = counting  # type: ignore[method-assign]
    return writes


def _count_flushes(loop: asyncio.AbstractEventLoop, peer: Peer) -> tuple[list[str], Callable[[], None]]:
    """Record the peer's callbacks scheduled with call_soon; returns (names, undo)."""
    scheduled: list[str] = []
    call_soon = loop.call_soon

    def spy(callback: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Handle:
        if getattr(callback, "__self__", None) is peer:
            scheduled.append(callback.__name__)
        return call_soon(callback, *args, **kwargs)

    loop.call_soon = spy  # type: ignore[method-assign]

    def undo() -> None:
        del loop.call_soon  # type: ignore[method-assign]

    return scheduled, undo


async def test_stop_and_wait_writes_once_and_schedules_nothing() -> None:
    # One write per message on each side (the MSG, the ACK), and no deferred flush:
    # the ack arriving in between ends the sender's "burst".
    plugins = PluginManager.load(entry_points=False)
    async with Server("127.0.0.1", 0, handler=_consume, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        await client.send(b"warm-up", timeout=T)
        peer = next(iter(server.hub.sessions.values()))
        client_writes, server_writes = _count_writes(client), _count_writes(peer)
        scheduled, undo = _count_flushes(asyncio.get_running_loop(), client)
        try:
            for i in range(50):
                await client.send(i, timeout=T)
        finally:
            undo()
        assert scheduled == []
        assert len(client_writes) == 50
        assert len(server_writes) == 50  # each ACK in a write of its own, none extra
        await client.close()


@pytest.mark.parametrize("count", [1, 2, 63, 64, 65, 200])
async def test_a_burst_goes_out_in_few_writes_and_all_arrives(count: int) -> None:
    # The first message of a burst goes out at once, the rest together at the end
    # of the loop turn (or every FLUSH_EVERY): few writes, nothing left behind.
    plugins = PluginManager.load(entry_points=False)
    got: list[int] = []
    all_in = asyncio.Event()

    async def take(peer: Peer) -> None:
        async for n in peer:
            got.append(n)
            if len(got) == count:
                all_in.set()

    async with Server("127.0.0.1", 0, handler=take, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        writes = _count_writes(client)
        last = 0
        for n in range(count):
            last = client.post(n)
        await client.wait_acked(last, timeout=T)
        await asyncio.wait_for(all_in.wait(), T)
        assert got == list(range(count))
        assert len(writes) <= 2 + count // 64
        await client.close()


async def test_a_timed_out_send_is_still_delivered_once_and_the_session_goes_on() -> None:
    # A timeout abandons the wait (its future is cancelled), never the message.
    plugins = PluginManager.load(entry_points=False)
    got: list[object] = []
    release = asyncio.Event()
    both_in = asyncio.Event()

    async def late(peer: Peer) -> None:
        await release.wait()  # the application takes nothing until told
        async for item in peer:
            got.append(item)
            if len(got) == 2:
                both_in.set()

    async with Server("127.0.0.1", 0, handler=late, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        with pytest.raises(KoriNetTimeout):
            await client.send("first", timeout=0.05)
        assert client.queued == 1
        release.set()
        await client.send("second", timeout=T)  # acked after the first: both are in
        await asyncio.wait_for(both_in.wait(), T)
        assert got == ["first", "second"] and client.queued == 0
        await client.close()
