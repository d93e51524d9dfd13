"""The installed korinet-zstd plugin end to end on loopback: negotiation, fallback
to msgpack when one side lacks it, fewer bytes on the wire, and a bomb refused."""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any

import pytest
import zstandard
from korinet_zstd import CODEC_NAME, prefer_zstd
from korinet_zstd.codec import MARK_ZSTD
from testutil import TIMEOUT_FACTOR

from korinet import Client, ConnectionClosedError, Server, SessionConfig, hookimpl
from korinet.plugins import DISABLE_ENV, PluginManager

T = 10 * TIMEOUT_FACTOR
ADMIN_OUTPUT = "".join(
    f"Nov 26 23:{i % 60:02d}:01 host kernel: [{i}.000] eth0: link up\n" for i in range(400)
)


def installed(*keep: str, disabled: tuple[str, ...] = ()) -> PluginManager:
    """A manager loading the installed entry points named ``keep`` (others blocked,
    so another package's plugin cannot disturb these tests)."""
    others = [ep.name for ep in importlib.metadata.entry_points(group="korinet") if ep.name not in keep]
    return PluginManager.load(disabled=[*others, *disabled])


def test_installed_as_a_distribution_with_an_entry_point() -> None:
    dist = importlib.metadata.distribution("korinet-zstd")
    eps = [ep for ep in dist.entry_points if ep.group == "korinet"]
    assert [(ep.name, ep.value) for ep in eps] == [("zstd", "korinet_zstd.plugin")]
    assert {"korinet", "zstandard"} <= {r.split()[0].split(">")[0] for r in dist.requires or []}
    pm = installed("zstd")
    assert CODEC_NAME in pm.codecs()
    [info] = [i for i in pm.plugins() if i.name == "zstd"]
    assert info.codecs == (CODEC_NAME,) and info.version == dist.version


def test_disabled_by_name_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "zstd")
    assert CODEC_NAME not in installed("zstd").codecs()


def test_prefer_zstd_puts_it_first_once() -> None:
    config = prefer_zstd(prefer_zstd(SessionConfig(codecs=("json", "msgpack"))))
    assert config.codecs == (CODEC_NAME, "json", "msgpack")


class CountingProxy:
    """Forwards one TCP connection at a time and counts the bytes each way."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = self.down = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [cw, sw]

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
            while data := await r.read(65536):
                if up:
                    self.up += len(data)
                else:
                    self.down += len(data)
                w.write(data)
            w.close()

        await asyncio.gather(pump(cr, sw, True), pump(sr, cw, False), return_exceptions=True)

    async def close(self) -> None:
        for w in self._writers:
            w.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def _echo(peer: Any) -> None:
    async for data in peer:
        await peer.send(data)


async def _session(
    server_pm: PluginManager, client_pm: PluginManager, config: SessionConfig | None = None
) -> tuple[str, int, list[Any]]:
    """Echo chat lines and admin output; return the codec, the bytes the client
    sent, and what came back. The client's config is the default one unless given:
    installed codecs are offered without being asked for."""
    server = await Server("127.0.0.1", 0, handler=_echo, plugins=server_pm).start()
    proxy = CountingProxy(server.port)
    port = await proxy.start()
    sent: list[Any] = [{"text": "hello"}, {"stdout": ADMIN_OUTPUT.encode()}, {"text": "é" * 20}]
    client = await Client.connect("127.0.0.1", port, plugins=client_pm, config=config, open_timeout=T)
    try:
        assert client.session.codec is not None
        codec = client.session.codec.name
        got = []
        for obj in sent:
            await client.send(obj, timeout=T)
            got.append(await client.recv(timeout=T))
    finally:
        await client.close()
        await server.close()
        await proxy.close()
    assert got == sent
    return codec, proxy.up, got


def test_installed_it_is_offered_first_by_default_and_msgpack_stays_last() -> None:
    assert installed("zstd").codec_offer() == (CODEC_NAME, "msgpack", "json")
    assert installed().codec_offer() == ("msgpack", "json")


async def test_both_sides_have_it_so_it_is_negotiated_and_shrinks_the_wire() -> None:
    with_zstd, up_zstd, _ = await _session(installed("zstd"), installed("zstd"))
    without, up_plain, _ = await _session(installed("zstd"), installed())
    assert with_zstd == CODEC_NAME
    assert without == "msgpack"
    assert up_zstd < up_plain / 3, (up_zstd, up_plain)


async def test_falls_back_to_msgpack_when_the_server_lacks_it() -> None:
    codec, _, _ = await _session(installed("zstd", disabled=("zstd",)), installed("zstd"))
    assert codec == "msgpack"


async def test_an_application_can_still_pin_its_list() -> None:
    pinned = SessionConfig(codecs=("msgpack",))
    codec, _, _ = await _session(installed("zstd"), installed("zstd"), pinned)
    assert codec == "msgpack"
    codec, _, _ = await _session(installed("zstd"), installed("zstd"), prefer_zstd(pinned))
    assert codec == CODEC_NAME


async def test_falls_back_to_msgpack_when_the_client_lacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    server_pm = installed("zstd")
    monkeypatch.setenv(DISABLE_ENV, "zstd")  # as a user would switch it off on one machine
    client_pm = installed("zstd")
    assert CODEC_NAME not in client_pm.codecs()
    codec, _, _ = await _session(server_pm, client_pm)
    assert codec == "msgpack"


class BombCodec:
    """What a hostile client could register under the plugin's name: every payload is
    64 MiB of zeros squeezed into a few KiB."""

    name = CODEC_NAME

    def encode(self, obj: Any) -> bytes:
        comp = zstandard.ZstdCompressor(level=1).compressobj(size=64 << 20)
        chunk = bytes(1 << 20)
        return bytes([MARK_ZSTD]) + b"".join([comp.compress(chunk) for _ in range(64)] + [comp.flush()])

    def decode(self, data: bytes) -> Any:
        raise AssertionError("never decodes")


class Bombs:
    @hookimpl
    def korinet_register_codecs(self) -> list[Any]:
        return [BombCodec()]


async def test_a_zstd_bomb_ends_the_senders_session_with_a_protocol_error() -> None:
    received: list[Any] = []
    arrived = asyncio.Event()

    async def keep(peer: Any) -> None:
        async for data in peer:
            received.append(data)
            arrived.set()

    server = await Server("127.0.0.1", 0, handler=keep, plugins=installed("zstd")).start()
    try:
        evil = await Client.connect(
            "127.0.0.1",
            server.port,
            plugins=PluginManager.load(entry_points=False, extra=[Bombs()]),
            config=prefer_zstd(),
            open_timeout=T,
        )
        assert evil.session.codec is not None and evil.session.codec.name == CODEC_NAME
        with pytest.raises(ConnectionClosedError) as info:
            await evil.send("boom", timeout=T)
        assert info.value.code == 1002  # protocol error (docs/PROTOCOL.md §7)
        assert "limit" in str(info.value)
        await evil.abort()
        assert received == [] and not server.hub.sessions
        # The server lives on for everybody else.
        good = await Client.connect("127.0.0.1", server.port, plugins=installed("zstd"), config=prefer_zstd())
        await good.send({"stdout": ADMIN_OUTPUT}, timeout=T)
        await good.close()
        await asyncio.wait_for(arrived.wait(), T)
        assert received == [{"stdout": ADMIN_OUTPUT}]
    finally:
        await server.close()
