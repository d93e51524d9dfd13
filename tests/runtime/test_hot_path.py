"""The acked path's cost in counts (bench/acked_profile.py measures the same): how
many writes and scheduled callbacks a message takes, independent of machine speed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR, eventually

from korinet import Client, KoriNetTimeout, Peer, Server, SessionConfig
from korinet.builtin import ECHO
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


def _spy_on(loop: asyncio.AbstractEventLoop, method: str, record: Callable[..., Any]) -> Callable[[], None]:
    """Call ``record(*args)`` on every call of the loop's ``method`` (call_soon,
    call_at...), which then runs as usual; returns the undo."""
    original = getattr(loop, method)

    def spy(*args: Any, **kwargs: Any) -> Any:
        record(*args)
        return original(*args, **kwargs)

    setattr(loop, method, spy)
    return lambda: delattr(loop, method)


def _count_flushes(loop: asyncio.AbstractEventLoop, peer: Peer) -> tuple[list[str], Callable[[], None]]:
    """Record the peer's callbacks scheduled with call_soon; returns (names, undo)."""
    scheduled: list[str] = []

    def record(callback: Callable[..., Any], *args: Any) -> None:
        if getattr(callback, "__self__", None) is peer:
            scheduled.append(callback.__name__)

    return scheduled, _spy_on(loop, "call_soon", record)


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
    # A timeout abandons the wait (its future fails with KoriNetTimeout), never the message.
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


def _count_timers(loop: asyncio.AbstractEventLoop) -> tuple[list[float], Callable[[], None]]:
    """Record every timer armed on ``loop`` (call_at; call_later goes through it)."""
    armed: list[float] = []
    return armed, _spy_on(loop, "call_at", lambda when, *args: armed.append(when))


async def test_waits_with_a_timeout_share_one_timer() -> None:
    # A stop-and-wait loop with a timeout (send, request, recv) arms no timer per
    # message: one timer, armed for the earliest deadline, serves every wait.
    plugins = PluginManager.load(entry_points=False)

    async with Server("127.0.0.1", 0, handler=_echo, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        await client.send("warm-up", timeout=T)
        assert await client.recv(timeout=T) == "warm-up"
        armed, undo = _count_timers(asyncio.get_running_loop())
        try:
            for i in range(50):
                await client.send(i, timeout=T)
                assert await client.recv(timeout=T) == i
        finally:
            undo()
        # (a lazy-ack timer may be armed for the echo's ack if the loop is slow)
        assert len(armed) <= 5, armed
        await client.close()


async def test_a_shorter_timeout_fires_on_time_under_a_longer_one() -> None:
    # The shared timer is re-armed for a wait whose deadline comes first, and a wait
    # that times out leaves the others (and their timer) alone.
    plugins = PluginManager.load(entry_points=False)
    release = asyncio.Event()

    async def late(peer: Peer) -> None:
        await release.wait()  # takes nothing until told: no ack comes
        async for _ in peer:
            pass

    async with Server("127.0.0.1", 0, handler=late, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        long_wait = asyncio.ensure_future(client.send("long", timeout=T))
        await asyncio.sleep(0)  # the long wait is registered first
        with pytest.raises(KoriNetTimeout, match=r"timed out after 0\.05s waiting for the ack"):
            await client.send("short", timeout=0.05)
        assert not long_wait.done()
        with pytest.raises(KoriNetTimeout, match="waiting for a message"):
            await client.recv(timeout=0.01)
        assert not long_wait.done()
        release.set()
        await asyncio.wait_for(long_wait, T)  # acked: the timer did not fail it
        assert client.queued == 0
        await client.close()


async def test_a_request_needs_no_ack_future_and_close_still_waits_for_its_ack() -> None:
    # A request's ack resolves nothing (its reply does): no future per request. But
    # close() still waits for a request in flight to be acknowledged, as for a send.
    plugins = PluginManager.load(entry_points=False)
    release = asyncio.Event()

    async def late(peer: Peer) -> None:
        await release.wait()  # the application takes nothing until told
        while True:  # (ends when the session does)
            msg = await peer.recv_message()
            await peer.reply(msg, ("re", msg.data))

    async with Server("127.0.0.1", 0, handler=late, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        request = asyncio.ensure_future(client.request("q", timeout=T))
        await eventually(lambda: client.queued == 1, T, "the request is queued")
        assert client.endpoint.acks is None  # no ack future for it
        peer = next(iter(server.hub.sessions.values()))
        await eventually(lambda: peer.endpoint.inbox, T, "the request is in")
        closing = asyncio.ensure_future(client.close())
        await asyncio.sleep(0)  # close() has started and waits for the ack
        release.set()
        assert await asyncio.wait_for(request, T) == ["re", "q"]
        await asyncio.wait_for(closing, T)
        assert client.queued == 0


async def _echo(peer: Peer) -> None:
    async for item in peer:
        peer.post(item)


async def _echoes(client: Client, count: int) -> None:
    for i in range(count):
        await client.send(i, timeout=T)
        assert await client.recv(timeout=T) == i


async def test_an_answer_carries_the_ack_of_what_it_answers() -> None:
    # An echo round trip takes one write a side: the ACK of the message taken rides
    # on the answer queued in the same step, on the server (the echo) and on the
    # client (its next message carries the ACK of the echo it read).
    plugins = PluginManager.load(entry_points=False)

    async with Server("127.0.0.1", 0, handler=_echo, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        await _echoes(client, 3)  # warm-up: both sides learn that the other answers
        peer = next(iter(server.hub.sessions.values()))
        client_writes, server_writes = _count_writes(client), _count_writes(peer)
        for i in range(50):
            await client.send(i, timeout=T)
            assert await client.recv(timeout=T) == i
        assert len(server_writes) == 50  # the echo and the ACK of the message together
        assert len(client_writes) <= 51  # each message with the ACK of the last echo
        await client.close()


async def test_a_waiting_reader_takes_the_message_in_the_turn_that_reads_it() -> None:
    # The application waits in recv(): the message is its as the bytes are read, so
    # the ACK goes in that loop turn, before the reader's task resumes (not a turn
    # later, when it resumes and takes the message itself).
    plugins = PluginManager.load(entry_points=False)
    seen: list[str] = []

    async def consume(peer: Peer) -> None:
        async for item in peer:
            seen.append(f"app {item}")

    async with Server("127.0.0.1", 0, handler=consume, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        await client.send("warm-up", timeout=T)
        peer = next(iter(server.hub.sessions.values()))
        await eventually(lambda: peer._inbox_waiter is not None, T, "the application waits in recv()")
        write = peer.conn.write if peer.conn is not None else None
        assert write is not None

        def record(data: bytes) -> None:
            if data:  # written as the bytes are read, not by the reader's task
                seen.append("ack" if asyncio.current_task() is None else "ack by the reader")
            write(data)

        peer.conn.write = record  # type: ignore[method-assign,union-attr]
        seen.clear()
        for i in range(20):
            await client.send(i, timeout=T)
            await eventually(lambda n=2 * (i + 1): len(seen) == n, T, "the application has it")
        assert seen == [e for i in range(20) for e in ("ack", f"app {i}")]
        await client.close()


async def test_a_reader_cancelled_after_the_hand_over_loses_nothing() -> None:
    # The message was handed to a waiting recv() (and acknowledged), but its task is
    # cancelled before it resumes: the next recv() returns that message.
    plugins = PluginManager.load(entry_points=False)
    got: list[Any] = []
    ready = asyncio.Event()

    async def handler(peer: Peer) -> None:
        reader = asyncio.ensure_future(peer.recv())
        hand_over = peer.inbox_readable

        def cancel_at_once() -> None:
            hand_over()
            reader.cancel()  # same loop turn: the reader never saw the message

        peer.inbox_readable = cancel_at_once  # type: ignore[method-assign]
        ready.set()
        with pytest.raises(asyncio.CancelledError):
            await reader
        del peer.inbox_readable
        got.append(await peer.recv(timeout=T))
        got.append(await peer.recv(timeout=T))

    async with Server("127.0.0.1", 0, handler=handler, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        await asyncio.wait_for(ready.wait(), T)
        await client.send("first", timeout=T)  # acknowledged at the hand-over
        await client.send("second", timeout=T)
        await eventually(lambda: len(got) == 2, T, "both taken")
        assert got == ["first", "second"]
        await client.close()


async def test_an_ack_owed_to_an_application_that_stops_answering_still_goes() -> None:
    # The application answered so far, then takes a message and awaits something
    # else: the ACK does not wait for an answer that never comes (at most a loop turn).
    plugins = PluginManager.load(entry_points=False)
    acked = asyncio.Event()

    async def echo_then_stall(peer: Peer) -> None:
        async for item in peer:
            if item == "stall":
                await acked.wait()  # set only once the client has our ACK
                return
            peer.post(item)

    # heartbeats far apart: a PING's flush must not be what sends the ACK
    config = SessionConfig(heartbeat_interval=60.0)
    async with Server("127.0.0.1", 0, handler=echo_then_stall, plugins=plugins, config=config) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins, config=config)
        await _echoes(client, 3)
        await client.send("stall", timeout=T)  # acknowledged without an answer
        acked.set()
        await client.close()


async def test_a_client_keeps_its_attributes_within_the_shared_key_limit() -> None:
    # CPython shares the attribute names of a class's instances only up to a limit
    # (30 keys); near it every attribute lookup of the hot path costs more (a
    # Client with 30 attributes spent 2% more instructions per message than one
    # with 28). State most sessions never use starts as class defaults. After the
    # busiest pattern (send, recv and request, all with timeouts), with a margin:
    plugins = PluginManager.load(entry_points=False)

    async with Server("127.0.0.1", 0, handler=_echo, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        await _echoes(client, 3)
        assert await client.request("q", ECHO, timeout=T) == "q"
        assert len(vars(client)) <= 26, sorted(vars(client))
        peer = next(iter(server.hub.sessions.values()))
        assert len(vars(peer)) <= 26, sorted(vars(peer))
        await client.close()
