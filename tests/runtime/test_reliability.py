"""Exactly-once, in-order delivery through connection cuts, via the asyncio API."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Client, Server, SessionConfig
from korinet.plugins import PluginManager

N = 10_000
CUTS = 24


@pytest.fixture
def plugins() -> PluginManager:
    return PluginManager.load(entry_points=False)


async def _cut_at_milestones(
    relay: Relay,
    progress: Callable[[], int],
    advanced: asyncio.Event,
    done: asyncio.Event,
    rng: random.Random,
) -> None:
    """Cut once the traffic passes each milestone (a message count, not a moment), so
    every planned cut lands while messages still flow, however fast the machine is.
    Half are clean cuts, half cut a few bytes later (usually mid-frame)."""
    milestones = sorted(rng.sample(range(2 * N // 50, 2 * N - 2 * N // 50), CUTS))
    for milestone in milestones:
        while progress() < milestone:
            advanced.clear()
            await advanced.wait()
        await relay.wait_linked()  # the previous cut's reconnect: a cut now counts
        if rng.random() < 0.5:
            relay.cut()
            continue
        await relay.cut_within(rng.randint(1, 3000), done)


@pytest.mark.timeout(120 * TIMEOUT_FACTOR)
async def test_ten_thousand_each_way_through_cuts(plugins: PluginManager) -> None:
    rng = random.Random(1234)
    server_got: list[int] = []
    client_got: list[int] = []
    server_done = asyncio.Event()
    advanced = asyncio.Event()  # set whenever either application takes a message

    async def handler(peer):  # the server application: receive N, send N, concurrently
        async def receive() -> None:
            while len(server_got) < N:
                server_got.append((await peer.recv())["n"])
                advanced.set()
            server_done.set()

        async def send() -> None:
            for i in range(N):
                await peer.send({"n": i})

        await asyncio.gather(receive(), send())
        await asyncio.sleep(3600)  # keep the session; the test closes it

    config = SessionConfig(heartbeat_interval=1.0)
    async with Server("127.0.0.1", 0, handler=handler, plugins=plugins, config=config) as server:
        relay = await Relay("127.0.0.1", server.port).start()
        client = await Client.connect("127.0.0.1", relay.port, plugins=plugins, config=config)
        done = asyncio.Event()
        cutter = asyncio.create_task(
            _cut_at_milestones(relay, lambda: len(server_got) + len(client_got), advanced, done, rng)
        )

        async def client_send() -> None:
            pending = [client.send_nowait({"n": i}) if i % 50 else await _send(client, i) for i in range(N)]
            await asyncio.gather(*[p for p in pending if p is not None])

        async def client_recv() -> None:
            while len(client_got) < N:
                client_got.append((await client.recv())["n"])
                advanced.set()

        await asyncio.wait_for(asyncio.gather(client_send(), client_recv(), server_done.wait()), 90)
        done.set()
        await asyncio.wait_for(cutter, 30)
        assert relay.cuts == CUTS
        await client.close()
        await relay.close()

    assert client_got == list(range(N)), "client: lost, duplicated or reordered"
    assert server_got[:N] == list(range(N)), "server: lost, duplicated or reordered"
    assert client.session.stats.resumes >= 20, "the cuts did not happen during the traffic"


async def _send(client: Client, i: int) -> None:
    # every 50th message waits for its ack: a mix of pipelined and stop-and-wait senders
    await client.send({"n": i})
    return None


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_send_returns_only_when_the_peer_application_has_it(plugins: PluginManager) -> None:
    release = asyncio.Event()
    taken: list[object] = []

    async def handler(peer):
        await release.wait()
        taken.append(await peer.recv())
        await asyncio.sleep(3600)

    async with Server("127.0.0.1", 0, handler=handler, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        send = asyncio.create_task(client.send("hello"))
        await asyncio.sleep(0.3)
        assert not send.done(), "send() returned before the server application took the message"
        release.set()
        await asyncio.wait_for(send, 5)
        assert taken == ["hello"]
        await client.close()
