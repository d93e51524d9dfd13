"""Bad input never crashes the server nor costs another client its session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import struct

import msgpack
import pytest
from testutil import TIMEOUT_FACTOR, eventually

from korinet import Client, Server, SessionConfig
from korinet.plugins import PluginManager
from korinet.session import CloseCode
from korinet.wire.frames import PREFACE, FrameType, encode_frame


def hello(**overrides) -> bytes:
    fields = {
        "versions": [3],
        "codecs": ["msgpack"],
        "heartbeat": 5.0,
        "window": 64,
        "window_bytes": 1 << 20,
        "max_frame": 1 << 20,
        "resume": None,
    }
    fields.update(overrides)
    return encode_frame(FrameType.HELLO, msgpack.packb(fields))


def close_code(data: bytes) -> int | None:
    """The code of the first CLOSE frame in ``data`` (after a WELCOME, if any)."""
    pos = 0
    while pos + 5 <= len(data):
        length, ftype = struct.unpack_from(">IB", data, pos)
        body = data[pos + 5 : pos + 4 + length]
        if ftype == FrameType.CLOSE:
            return int(msgpack.unpackb(body)["code"])
        pos += 4 + length
    return None


async def attack(port: int, payload: bytes, *, then_close: bool = False, wait: float = 3.0) -> bytes:
    """Send ``payload`` and return everything the server answered before closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    if then_close:
        writer.close()
        return b""
    received = b""
    try:
        async with asyncio.timeout(wait * TIMEOUT_FACTOR):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        writer.close()
        raise AssertionError(f"the server kept the connection open; it sent {received[:80]!r}") from None
    writer.close()
    return received


@pytest.fixture
async def setting():
    plugins = PluginManager.load(entry_points=False)

    async def echo(peer) -> None:
        async for msg in peer:
            await peer.send(msg)

    config = SessionConfig(handshake_timeout=1.0)
    server = await Server("127.0.0.1", 0, handler=echo, plugins=plugins, config=config).start()
    client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
    stop = asyncio.Event()
    exchanged = [0]

    async def well_behaved() -> None:  # must keep being served through every attack
        while not stop.is_set():
            await client.send(exchanged[0])
            assert await asyncio.wait_for(client.recv(), 5) == exchanged[0]
            exchanged[0] += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(well_behaved())
    session_id = client.session_id
    yield server
    before = exchanged[0]
    await eventually(lambda: exchanged[0] >= before + 3, what="the well-behaved client stopped being served")
    stop.set()
    await asyncio.wait_for(task, 5)
    assert exchanged[0] > before, "the well-behaved client stopped being served"
    assert client.session_id == session_id, "the well-behaved client lost its session"
    await client.close()
    await server.close()


pytestmark = pytest.mark.timeout(30 * TIMEOUT_FACTOR)


async def test_random_bytes(setting) -> None:
    for seed in range(20):
        await attack(setting.port, os.urandom(64 + seed * 97))


async def test_four_gib_length_prefix_costs_nothing(setting) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # legacy wire (no preface) and our wire (after the preface)
    await attack(setting.port, b"\xff\xff\xff\xff\x00")
    answer = await attack(setting.port, PREFACE + b"\xff\xff\xff\xff\x01")
    assert close_code(answer) == CloseCode.PROTOCOL_ERROR
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown_kib < 20_000


async def test_oversized_frame_on_an_open_session(setting) -> None:
    # An open session receives a 100 MiB length prefix (over its 16 MiB limit) and a
    # slow drip of body bytes: refused on the header, before any body is awaited.
    reader, writer = await asyncio.open_connection("127.0.0.1", setting.port)
    writer.write(PREFACE + hello() + struct.pack(">IB", 100 * 1024 * 1024, FrameType.MSG))

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(20):
                writer.write(b"\x00" * 10)
                await asyncio.sleep(0.05)

    dripper = asyncio.create_task(drip())
    received = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(3 * TIMEOUT_FACTOR):
            while chunk := await reader.read(65536):
                received += chunk
    dripper.cancel()
    assert close_code(received) == CloseCode.FRAME_TOO_LARGE
    writer.close()


async def test_silent_peer_is_dropped_after_the_handshake_timeout(setting) -> None:
    await attack(setting.port, b"", wait=2.5)
    await attack(setting.port, PREFACE, wait=2.5)


async def test_half_a_frame_then_close(setting) -> None:
    await attack(setting.port, PREFACE + hello()[:7], then_close=True)
    await attack(setting.port, b"\x00\x00\x00\x35\xa2\x64", then_close=True)


async def test_connect_close_burst(setting) -> None:
    for _ in range(200):
        _, writer = await asyncio.open_connection("127.0.0.1", setting.port)
        writer.transport.abort()
    await eventually(lambda: len(setting.hub.connections) <= 2, what="aborted connections are released")


async def test_unknown_frame_type(setting) -> None:
    answer = await attack(setting.port, PREFACE + struct.pack(">IB", 1, 0x7F))
    assert close_code(answer) == CloseCode.PROTOCOL_ERROR
    answer = await attack(setting.port, PREFACE + hello() + struct.pack(">IB", 1, 0x7F))
    assert close_code(answer) == CloseCode.PROTOCOL_ERROR


async def test_unsupported_version(setting) -> None:
    answer = await attack(setting.port, PREFACE + hello(versions=[1, 99]))
    assert close_code(answer) == CloseCode.UNSUPPORTED_VERSION


async def test_unknown_codec(setting) -> None:
    answer = await attack(setting.port, PREFACE + hello(codecs=["rot13"]))
    assert close_code(answer) == CloseCode.UNSUPPORTED_CODEC


async def test_garbage_after_a_good_handshake(setting) -> None:
    answer = await attack(setting.port, PREFACE + hello() + encode_frame(FrameType.MSG, b"\x01\x02"))
    assert close_code(answer) == CloseCode.PROTOCOL_ERROR


async def test_unknown_message_type_is_rejected_not_fatal(setting) -> None:
    plugins = PluginManager.load(entry_points=False)
    client = await Client.connect("127.0.0.1", setting.port, plugins=plugins)
    from korinet import MessageRejected

    with pytest.raises(MessageRejected, match="unknown message type"):
        await asyncio.wait_for(client.send({"x": 1}, "no.such.type"), 5)
    with pytest.raises(MessageRejected, match="unknown message type"):
        await asyncio.wait_for(client.request({"x": 1}, "no.such.type"), 5)
    await client.send("still fine")
    assert await asyncio.wait_for(client.recv(), 5) == "still fine"
    await client.close()


async def test_connections_per_address_are_capped_and_others_still_served() -> None:
    plugins = PluginManager.load(entry_points=False)

    async def echo(peer) -> None:
        async for msg in peer:
            await peer.send(msg)

    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins, max_connections_per_address=3) as server:
        held = []
        for _ in range(3):  # silent connections from 127.0.0.2 use up that address's share
            held.append(await asyncio.open_connection("127.0.0.1", server.port, local_addr=("127.0.0.2", 0)))
        await eventually(lambda: len(server.hub.connections) >= 3, what="the server took the 3 connections")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, local_addr=("127.0.0.2", 0))
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(100), 2) == b"", "a 4th connection was kept"
        writer.close()
        # another address is not affected
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        await client.send("still served")
        assert await client.recv() == "still served"
        await client.close()
        for _, w in held:
            w.close()
