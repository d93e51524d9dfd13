"""Admission: a connection counts in the limits, and its handshake deadline runs,
from accept, TLS handshake included; connections without a session are capped
(the oldest dropped); a client speaking the wrong protocol (TLS or plaintext) is
refused at once, in words; every such refusal reaches korinet_session_refused."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR

from korinet import Client, Server, hookimpl
from korinet.exceptions import ConnectionClosedError
from korinet.plugins import PluginManager
from korinet.security import ClientTLS, Identity, KnownHosts, ServerTLS
from korinet.session import CloseCode, SessionConfig

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)

WAIT = 10 * TIMEOUT_FACTOR
#: Short enough that a test waits it out, long enough for a loopback TLS handshake.
HANDSHAKE = 1.0 * TIMEOUT_FACTOR


class Refusals:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    @hookimpl
    def korinet_session_refused(
        self, server: Any, peername: str, fingerprint: str | None, reason: str, code: int
    ) -> None:
        self.events.append({"peername": peername, "reason": reason, "code": code})
        self.changed.set()

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(WAIT):
            while len(self.events) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.events


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.generate()


async def echo(peer: Any) -> None:
    async for msg in peer:
        await peer.send(msg)


@contextlib.asynccontextmanager
async def tls_server(identity: Identity, refusals: Refusals, **kwargs: Any) -> AsyncIterator[Server]:
    plugins = PluginManager.load(entry_points=False, extra=[refusals])
    config = SessionConfig(handshake_timeout=HANDSHAKE)
    async with Server(
        "127.0.0.1", 0, tls=ServerTLS(identity), plugins=plugins, config=config, handler=echo, **kwargs
    ) as server:
        yield server


def silent_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.setblocking(False)
    return sock


async def closed_by_peer(sock: socket.socket) -> None:
    """Wait until the peer closes ``sock`` (EOF or reset)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            if not await loop.sock_recv(sock, 1024):
                return
        except ConnectionError:
            return


async def round_trip(port: int, tmp_path: Path) -> None:
    tls = ClientTLS(known_hosts=KnownHosts(tmp_path / "known_hosts"))
    plugins = PluginManager.load(entry_points=False)
    client = await Client.connect("127.0.0.1", port, plugins=plugins, tls=tls, open_timeout=WAIT)
    try:
        await client.send("hello")
        assert await client.recv(timeout=WAIT) == "hello"
    finally:
        await client.close()


async def test_a_silent_socket_at_a_tls_server_is_closed_at_the_handshake_timeout(
    identity: Identity,
) -> None:
    # Before: asyncio's own TLS handshake timeout (60 s) applied, and nobody was told.
    refusals = Refusals()
    async with tls_server(identity, refusals) as server:
        started = time.monotonic()
        sock = silent_socket(server.port)
        try:
            await asyncio.wait_for(closed_by_peer(sock), WAIT)
        finally:
            sock.close()
        assert time.monotonic() - started < HANDSHAKE + WAIT / 2
        (event,) = await refusals.wait_for(1)
        assert event["code"] == CloseCode.HANDSHAKE_TIMEOUT and "no TLS handshake" in event["reason"]


async def test_connections_before_tls_count_in_the_per_address_limit(identity: Identity) -> None:
    refusals = Refusals()
    async with tls_server(identity, refusals, max_connections_per_address=2) as server:
        held = [silent_socket(server.port) for _ in range(2)]
        try:
            await asyncio.wait_for(_until(lambda: server.hub._open == 2), WAIT)
            third = silent_socket(server.port)
            try:
                await asyncio.wait_for(closed_by_peer(third), WAIT)  # at once, not at the timeout
            finally:
                third.close()
            (event,) = await refusals.wait_for(1)
            assert event["code"] == CloseCode.TRY_AGAIN_LATER
            assert "too many connections from" in event["reason"]
        finally:
            for sock in held:
                sock.close()


async def test_the_oldest_unauthenticated_connection_makes_room_for_a_real_client(
    identity: Identity, tmp_path: Path
) -> None:
    refusals = Refusals()
    async with tls_server(identity, refusals, max_handshaking=4) as server:
        flood = [silent_socket(server.port) for _ in range(12)]
        try:
            # the first eight are dropped as the later ones arrive, the last four wait
            await asyncio.wait_for(asyncio.gather(*(closed_by_peer(s) for s in flood[:8])), WAIT)
            events = await refusals.wait_for(8)
            assert all("max_handshaking" in e["reason"] for e in events[:8]), events
            assert len(server.hub._handshaking) == 4
            await round_trip(server.port, tmp_path)  # a real client still gets in, and is served
        finally:
            for sock in flood:
                sock.close()


async def test_a_failed_tls_handshake_is_reported(identity: Identity) -> None:
    refusals = Refusals()
    async with tls_server(identity, refusals) as server:
        sock = silent_socket(server.port)
        try:
            sock.send(b"\x16\x03\x01\x00\x05hello")  # a TLS record, but no ClientHello
            await asyncio.wait_for(closed_by_peer(sock), WAIT)
        finally:
            sock.close()
        (event,) = await refusals.wait_for(1)
        assert event["code"] == CloseCode.PROTOCOL_ERROR
        assert event["reason"].startswith("TLS handshake failed")


async def test_a_plaintext_client_at_a_tls_server_is_told_at_once(identity: Identity) -> None:
    refusals = Refusals()
    async with tls_server(identity, refusals) as server:
        started = time.monotonic()
        with pytest.raises(ConnectionClosedError, match="this server speaks TLS only"):
            plugins = PluginManager.load(entry_points=False)
            await Client.connect("127.0.0.1", server.port, plugins=plugins, open_timeout=WAIT * 3)
        assert time.monotonic() - started < WAIT
        (event,) = await refusals.wait_for(1)
        assert "plaintext client at a TLS server" in event["reason"] or "TLS only" in event["reason"]


async def test_a_tls_client_at_a_plaintext_server_is_told_at_once(tmp_path: Path) -> None:
    refusals = Refusals()
    plugins = PluginManager.load(entry_points=False, extra=[refusals])
    async with Server("127.0.0.1", 0, plugins=plugins, handler=echo) as server:  # legacy v2 on too
        tls = ClientTLS(known_hosts=KnownHosts(tmp_path / "known_hosts"))
        started = time.monotonic()
        with pytest.raises(ConnectionClosedError, match="speaks plaintext, not TLS") as caught:
            await Client.connect(
                "127.0.0.1", server.port, plugins=PluginManager.load(entry_points=False), tls=tls,
                open_timeout=WAIT * 3,
            )  # fmt: skip
        assert time.monotonic() - started < WAIT
        assert f"127.0.0.1:{server.port}" in str(caught.value)
        (event,) = await refusals.wait_for(1)
        assert "a TLS client at a plaintext server" in event["reason"]


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def test_the_blocking_client_too_is_told_at_once_by_a_plaintext_server(tmp_path: Path) -> None:
    from korinet.sync import SyncClient

    async with Server("127.0.0.1", 0, plugins=PluginManager.load(entry_points=False), handler=echo) as server:
        tls = ClientTLS(known_hosts=KnownHosts(tmp_path / "known_hosts"))
        started = time.monotonic()
        with pytest.raises(ConnectionClosedError, match="speaks plaintext, not TLS"):
            await asyncio.to_thread(
                SyncClient, "127.0.0.1", server.port, tls=tls, open_timeout=WAIT * 3,
                plugins=PluginManager.load(entry_points=False),
            )  # fmt: skip
        assert time.monotonic() - started < WAIT


async def test_a_server_that_never_answers_tls_is_reported_in_words(tmp_path: Path) -> None:
    # Before: "last error: " and nothing (a bare TimeoutError from wait_for).
    from korinet import KoriNetTimeout

    with socket.socket() as listener:  # the kernel completes TCP; nobody speaks TLS
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        tls = ClientTLS(known_hosts=KnownHosts(tmp_path / "known_hosts"))
        expected = (
            rf"last error: no answer from 127\.0\.0\.1:{port} within [\d.]+s "
            r"\(TCP connect and TLS handshake\)"
        )
        with pytest.raises(KoriNetTimeout, match=expected):
            await Client.connect(
                "127.0.0.1", port, plugins=PluginManager.load(entry_points=False), tls=tls,
                connect_timeout=0.2 * TIMEOUT_FACTOR, open_timeout=WAIT / 2,
            )  # fmt: skip


async def test_an_adopted_socket_counts_and_is_reported_under_the_address_given() -> None:
    """``Hub.adopt(address=)``: what a relay reports is the address the limits count
    and the hooks name; ``peer.via`` keeps the socket's own peer."""
    from korinet.runtime import Hub

    refusals = Refusals()
    plugins = PluginManager.load(entry_points=False, extra=[refusals])
    hub = Hub(plugins=plugins, handler=echo, max_connections_per_address=1, legacy=False)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    loop = asyncio.get_running_loop()
    clients: list[Client] = []

    async def through(address: tuple[str, int]) -> Any:
        """A client connects; the 'relay' (this test) hands its socket over with ``address``."""
        accepted = loop.create_task(loop.sock_accept(listener))
        dialing = loop.create_task(
            Client.connect(
                "127.0.0.1", port, plugins=PluginManager.load(entry_points=False), open_timeout=WAIT
            )
        )
        sock, _ = await asyncio.wait_for(accepted, WAIT)
        try:
            peer = await asyncio.wait_for(hub.adopt(sock, address=address), WAIT)
            clients.append(await asyncio.wait_for(dialing, WAIT))
            return peer
        except BaseException:
            dialing.cancel()
            await asyncio.gather(dialing, return_exceptions=True)
            raise

    try:
        first = await through(("203.0.113.5", 4000))
        assert first.peername == "203.0.113.5:4000"
        assert first.via is not None and first.via.startswith("127.0.0.1:")  # the client's socket
        # another reported address from the same socket peer is admitted: the limit
        # of one per address counts reported addresses, not the relay's
        second = await through(("203.0.113.6", 4000))
        assert second.peername == "203.0.113.6:4000"
        # the same reported address again is over the limit, and refused under it
        with pytest.raises((ConnectionError, ConnectionClosedError, TimeoutError)):
            await through(("203.0.113.5", 4001))
        (event,) = await refusals.wait_for(1)
        assert event["peername"] == "203.0.113.5:4001"
        assert "too many connections from 203.0.113.5" in event["reason"]
    finally:
        for client in clients:
            await client.close()
        await hub.close()
        listener.close()
