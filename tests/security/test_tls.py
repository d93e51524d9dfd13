"""TLS 1.3 only, end to end: refused versions, encryption on the wire, resume across a cut."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay
from tls_helpers import Tap, echo

from korinet import Client, KoriNetTimeout, Server
from korinet.plugins import PluginManager
from korinet.security import AuthorizedKeys, ClientTLS, Identity, ServerTLS, client_context, server_context

pytestmark = pytest.mark.timeout(30 * TIMEOUT_FACTOR)


def test_contexts_speak_tls13_only(server_identity: Identity) -> None:
    for context in (
        server_context(server_identity, require_client_cert=True),
        server_context(server_identity, require_client_cert=False),
        client_context(server_identity),
        client_context(None),
    ):
        assert context.minimum_version is ssl.TLSVersion.TLSv1_3
        assert context.maximum_version is ssl.TLSVersion.TLSv1_3
    assert server_context(server_identity, require_client_cert=True).verify_mode is ssl.CERT_OPTIONAL
    assert server_context(server_identity, require_client_cert=False).verify_mode is ssl.CERT_NONE


async def test_a_tls12_client_is_refused(
    plugins: PluginManager, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=old)
            writer.write(b"KORI")
            await reader.read()  # a handshake that did pass would fail here
        assert not server.hub.sessions
        # ... and the server goes on serving a TLS 1.3 client.
        client = await Client.connect("127.0.0.1", server.port, tls=ClientTLS(alice), plugins=plugins)
        await client.send("still here")
        assert await client.recv() == "still here"
        await client.close()


async def test_our_client_refuses_a_tls12_server(plugins: PluginManager, server_identity: Identity) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_identity.load_into(context)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    async with Server("127.0.0.1", 0, ssl=context, plugins=plugins) as server:
        with pytest.raises(KoriNetTimeout) as info:
            await Client.connect(
                "127.0.0.1", server.port, tls=ClientTLS(), plugins=plugins, open_timeout=1 * TIMEOUT_FACTOR
            )
        assert isinstance(info.value.__cause__, (ssl.SSLError, ConnectionError))


async def test_round_trip_and_resume_across_a_cut(
    plugins: PluginManager, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    seen = []

    async def handler(peer) -> None:  # type: ignore[no-untyped-def]
        seen.append(peer.identity)
        await echo(peer)

    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=handler, plugins=plugins) as server:
        relay = await Relay("127.0.0.1", server.port).start()
        client = await Client.connect("127.0.0.1", relay.port, tls=ClientTLS(alice), plugins=plugins)
        try:
            assert client.conn is not None and client.conn.transport is not None
            assert client.conn.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
            assert client.identity.fingerprint == server_identity.fingerprint
            session = client.session_id
            for i in range(20):
                await client.send(i)
            relay.cut()  # the TLS connection dies; the session must not
            for i in range(20, 40):
                client.send_nowait(i)
            got = [await asyncio.wait_for(client.recv(), 10 * TIMEOUT_FACTOR) for _ in range(40)]
            assert got == list(range(40)), "lost, duplicated or reordered across the cut"
            assert client.session_id == session and client.links_opened == 2
            assert client.session.stats.resumes == 1
            # one session, one handler run, one identity: the resume re-authenticated alice
            assert [i.name for i in seen] == ["alice"]
            assert server.hub.sessions[session].identity.fingerprint == alice.fingerprint
        finally:
            await client.close()
            await relay.close()


async def test_nothing_readable_crosses_the_wire(
    plugins: PluginManager, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    secret = "correct horse battery staple"

    async def exchange(server: Server, tls: ClientTLS | None) -> bytes:
        tap = await Tap(server.port).start()
        client = await Client.connect("127.0.0.1", tap.port, tls=tls, plugins=plugins)
        await client.send(secret)
        assert await client.recv() == secret
        await client.close()
        await tap.close()
        return bytes(tap.captured)

    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins) as plain:
        captured = await exchange(plain, None)
        assert secret.encode() in captured  # the tap does see plaintext ...
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
        captured = await exchange(server, ClientTLS(alice))
    assert len(captured) > 1000
    for clear in (secret.encode(), b"KORI", b"msgpack", b"korinet-py"):
        assert clear not in captured  # ... but nothing of the session under TLS
