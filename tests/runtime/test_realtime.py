"""The realtime delivery class: best effort, never queued behind a reconnect, never replayed."""

from __future__ import annotations

import asyncio

import pytest
from testutil import TIMEOUT_FACTOR, eventually
from testutil.relay import Relay

from korinet import REALTIME, Client, MessageType, Server, hookimpl
from korinet.plugins import PluginManager

pytestmark = pytest.mark.timeout(30 * TIMEOUT_FACTOR)


class VoicePlugin:
    """A realtime message type with a handler, as an audio app would register."""

    def __init__(self) -> None:
        self.frames: list[int] = []

    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [
            MessageType(
                "test.voice", delivery=REALTIME, handler=lambda peer, msg: self.frames.append(msg.data)
            )
        ]


async def test_realtime_frames_are_dropped_while_down_and_never_replayed() -> None:
    voice = VoicePlugin()
    plugins = PluginManager.load(entry_points=False, extra=[voice])
    async with Server("127.0.0.1", 0, plugins=plugins) as server:
        relay = await Relay("127.0.0.1", server.port).start()
        client = await Client.connect("127.0.0.1", relay.port, plugins=plugins)
        for i in range(10):
            await client.send(i, "test.voice")  # realtime type: goes out at once, no ack
        await eventually(lambda: len(voice.frames) >= 10)
        assert voice.frames == list(range(10))

        relay.refuse = True  # the server looks down: the client keeps retrying
        relay.cut()
        await eventually(lambda: not client.is_connected)
        sent = [client.send_realtime(100 + i, "test.voice") for i in range(20)]
        assert sent == [False] * 20, "realtime frames must be dropped, not queued, while down"
        relay.refuse = False
        await client.request("marker", "korinet.echo", timeout=5)  # reliable: waits for the resume
        for i in range(5):
            await client.send(200 + i, "test.voice")
        # the server handles a link's frames in order: its echo follows the five frames
        await client.request("barrier", "korinet.echo", timeout=5)
        assert voice.frames == [*list(range(10)), 200, 201, 202, 203, 204], "a frame was replayed or lost"
        assert client.session.stats.realtime_dropped == 20
        await client.close()
        await relay.close()


async def test_realtime_is_not_acknowledged_and_does_not_use_the_window() -> None:
    plugins = PluginManager.load(entry_points=False)

    async def idle(peer) -> None:
        await asyncio.sleep(3600)

    async with Server("127.0.0.1", 0, handler=idle, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        for i in range(50):
            assert client.send_realtime({"frame": i})
        assert client.queued == 0  # nothing waits for an acknowledgement
        await client.request("barrier", "korinet.echo", timeout=5)  # the frames are in by then
        peer = next(iter(server.hub.sessions.values()))
        got = []
        while (msg := peer.recv_realtime_nowait()) is not None:
            got.append(msg.data["frame"])
        assert got == list(range(50))
        await client.close()


async def test_realtime_inbox_is_bounded_dropping_the_oldest() -> None:
    from korinet.endpoint import REALTIME_INBOX

    plugins = PluginManager.load(entry_points=False)
    async with Server("127.0.0.1", 0, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        total = REALTIME_INBOX + 100
        for i in range(total):
            assert client.send_realtime(i), "dropped by the sender: the test paces too fast"
            if i % 50 == 49:  # stay under the send backlog limit: let the link drain
                await client.request("barrier", "korinet.echo", timeout=5)
        await client.request("barrier", "korinet.echo", timeout=5)
        peer = next(iter(server.hub.sessions.values()))
        got = []
        while (msg := peer.recv_realtime_nowait()) is not None:
            got.append(msg.data)
        assert len(got) == REALTIME_INBOX
        assert got[-1] == total - 1, "the newest frames are kept"
        assert peer.session.stats.realtime_dropped == 100
        await client.close()
