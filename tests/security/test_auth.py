"""Authentication and authorization: unknown keys, changed server keys, stolen
resume tokens, revoked keys, roles."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay
from tls_helpers import close_code, echo, raw_hello

from korinet import AuthenticationError, Client, MessageRejected, MessageType, Server, hookimpl
from korinet.exceptions import HostKeyChanged
from korinet.plugins import PluginManager
from korinet.security import (
    AuthorizedKeys,
    ClientTLS,
    Identity,
    KnownHosts,
    ServerTLS,
    client_context,
)
from korinet.session import CloseCode

pytestmark = pytest.mark.timeout(30 * TIMEOUT_FACTOR)


async def connect(port: int, plugins: PluginManager, tls: ClientTLS) -> Client:
    return await Client.connect("127.0.0.1", port, tls=tls, plugins=plugins, open_timeout=10 * TIMEOUT_FACTOR)


async def test_an_unknown_key_is_refused_and_logged(
    plugins: PluginManager,
    server_identity: Identity,
    alice: Identity,
    authorized: AuthorizedKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stranger = Identity.generate()
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
        with caplog.at_level(logging.WARNING, logger="korinet.runtime.server"):
            with pytest.raises(AuthenticationError) as info:
                await connect(server.port, plugins, ClientTLS(stranger))
        assert not isinstance(info.value, HostKeyChanged)
        assert stranger.fingerprint in str(info.value) and "not authorized" in str(info.value)
        assert f"refused: key {stranger.fingerprint} is not authorized" in caplog.text
        assert not server.hub.sessions, "a session was opened for an unknown key"
        # The server goes on serving authorized clients.
        client = await connect(server.port, plugins, ClientTLS(alice))
        await client.send("hello")
        assert await client.recv() == "hello"
        await client.close()


async def test_a_client_without_a_certificate_is_refused(
    plugins: PluginManager, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, plugins=plugins) as server:
        with pytest.raises(AuthenticationError, match="presented none"):
            await connect(server.port, plugins, ClientTLS(identity=None))
        assert not server.hub.sessions


async def test_without_authorized_keys_clients_are_anonymous(
    plugins: PluginManager, server_identity: Identity
) -> None:
    identities = []

    async def handler(peer) -> None:  # type: ignore[no-untyped-def]
        identities.append(peer.identity)
        await echo(peer)

    async with Server(
        "127.0.0.1", 0, tls=ServerTLS(server_identity), handler=handler, plugins=plugins
    ) as server:
        client = await connect(server.port, plugins, ClientTLS())
        await client.send(1)
        assert await client.recv() == 1
        await client.close()
    assert identities == [None]


async def test_a_changed_server_key_is_refused_by_a_client_that_pinned_it(
    plugins: PluginManager, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys, home: Path
) -> None:
    first_uses: list[tuple[str, str]] = []

    def tls() -> ClientTLS:
        return ClientTLS(alice, on_first_use=lambda a, f, _: first_uses.append((a, f)))

    server = await Server(
        "127.0.0.1", 0, tls=ServerTLS(server_identity, authorized=authorized), plugins=plugins
    ).start()
    port = server.port
    client = await connect(port, plugins, tls())
    await client.close()
    client = await connect(port, plugins, tls())  # the same key again: silently accepted
    await client.close()
    await server.close()
    assert first_uses == [(f"127.0.0.1:{port}", server_identity.fingerprint)]

    impostor = Identity.generate()
    server = await Server(
        "127.0.0.1", port, tls=ServerTLS(impostor, authorized=authorized), handler=echo, plugins=plugins
    ).start()
    try:
        with pytest.raises(HostKeyChanged) as info:
            await connect(port, plugins, tls())
        error = info.value
        assert error.pinned == server_identity.fingerprint and error.offered == impostor.fingerprint
        assert error.path == str(home / "known_hosts")
        message = str(error)
        assert server_identity.fingerprint in message and impostor.fingerprint in message
        assert f"delete line {error.line} of {home / 'known_hosts'}" in message
        await asyncio.sleep(0.1)
        assert not server.hub.sessions, "the client sent its HELLO to a server it should not trust"
        # an explicitly expected fingerprint overrides known_hosts, both ways
        with pytest.raises(AuthenticationError, match="not the expected"):
            await connect(port, plugins, ClientTLS(alice, fingerprint=server_identity.fingerprint))
        client = await connect(port, plugins, ClientTLS(alice, fingerprint=impostor.fingerprint))
        await client.close()
    finally:
        await server.close()


async def test_a_changed_key_ends_a_live_session_at_its_next_reconnect(
    plugins: PluginManager, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    server = await Server(
        "127.0.0.1", 0, tls=ServerTLS(server_identity, authorized=authorized), plugins=plugins
    ).start()
    port = server.port
    client = await connect(port, plugins, ClientTLS(alice))
    await server.close()
    server = await Server(
        "127.0.0.1", port, tls=ServerTLS(Identity.generate(), authorized=authorized), plugins=plugins
    ).start()
    try:
        with pytest.raises(HostKeyChanged):
            await asyncio.wait_for(client.recv(), 10 * TIMEOUT_FACTOR)
        assert client.is_closed
    finally:
        await client.close()
        await server.close()


async def test_a_stolen_resume_token_is_refused_to_another_identity(
    plugins: PluginManager,
    server_identity: Identity,
    alice: Identity,
    bob: Identity,
    authorized: AuthorizedKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
        client = await connect(server.port, plugins, ClientTLS(alice))
        try:
            stolen = {"id": client.session.session_id, "token": client.session.token, "received": 0}
            # Bob is authorized, and holds alice's session id and token: not enough.
            with caplog.at_level(logging.WARNING, logger="korinet.runtime.server"):
                frames = await raw_hello(server.port, client_context(bob), stolen)
            code, reason = close_code(frames)
            assert code == CloseCode.AUTH_FAILED and "another identity" in reason
            assert len(frames) == 1, "the server sent something besides the CLOSE"
            assert f"{bob.fingerprint} presented the resume token" in caplog.text
            # Alice's session was not touched: same link, same identity, still working.
            assert client.is_connected and client.links_opened == 1
            assert server.hub.sessions[client.session_id].identity.name == "alice"
            await client.send("mine")
            assert await client.recv() == "mine"
            # The same token from alice's own key resumes (bound to the key, not the client object).
            frames = await raw_hello(server.port, client_context(alice), stolen)
            assert frames[0][0] == 0x02  # WELCOME
        finally:
            await client.close()


async def test_a_revoked_key_cannot_resume(
    plugins: PluginManager, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
        relay = await Relay("127.0.0.1", server.port).start()
        client = await connect(relay.port, plugins, ClientTLS(alice))
        try:
            await client.send("before")
            assert await client.recv() == "before"
            assert authorized.revoke(alice.fingerprint)
            relay.cut()  # the next link is authenticated against the edited file
            with pytest.raises(AuthenticationError, match="not authorized"):
                await asyncio.wait_for(client.recv(), 10 * TIMEOUT_FACTOR)
        finally:
            await client.close()
            await relay.close()


class AdminPlugin:
    """A message type only admins may send; its handler says who sent it."""

    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [
            MessageType(
                "test.shutdown",
                handler=lambda peer, msg: f"ok, {peer.identity.name}",
                required_role="admin",
            ),
            MessageType("test.whoami", handler=lambda peer, msg: sorted(peer.identity.roles)),
        ]


async def test_a_message_type_requiring_a_role(
    plugins: PluginManager,
    server_identity: Identity,
    alice: Identity,
    bob: Identity,
    authorized: AuthorizedKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugins.register(AdminPlugin(), name="admin-plugin")
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, plugins=plugins, accept_plain=False) as server:
        admin = await connect(server.port, plugins, ClientTLS(alice))
        user = await connect(server.port, plugins, ClientTLS(bob))
        try:
            assert await admin.request({}, "test.shutdown", timeout=5) == "ok, alice"
            assert await admin.request({}, "test.whoami", timeout=5) == ["admin"]
            assert await user.request({}, "test.whoami", timeout=5) == []
            with caplog.at_level(logging.WARNING, logger="korinet.runtime.peer"):
                with pytest.raises(MessageRejected, match="requires the role 'admin'"):
                    await user.request({}, "test.shutdown", timeout=5)
                with pytest.raises(MessageRejected, match="requires the role 'admin'"):
                    await user.send({}, "test.shutdown", timeout=5)  # not a request: same answer
            assert "requires the role 'admin'" in caplog.text  # logged on the server
            # the refusal costs bob nothing else
            assert await user.request({}, "test.whoami", timeout=5) == []
        finally:
            await admin.close()
            await user.close()


async def test_roles_follow_the_file_on_the_next_link(
    plugins: PluginManager, server_identity: Identity, bob: Identity, authorized: AuthorizedKeys
) -> None:
    plugins.register(AdminPlugin(), name="admin-plugin")
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, plugins=plugins) as server:
        relay = await Relay("127.0.0.1", server.port).start()
        client = await connect(relay.port, plugins, ClientTLS(bob))
        try:
            with pytest.raises(MessageRejected):
                await client.request({}, "test.shutdown", timeout=5)
            authorized.authorize(bob.fingerprint, "bob", ["admin"])
            relay.cut()
            assert await client.request({}, "test.shutdown", timeout=10 * TIMEOUT_FACTOR) == "ok, bob"
            assert client.links_opened == 2  # the same session, resumed with the new roles
        finally:
            await client.close()
            await relay.close()


def test_server_tls_settings_are_given_once(server_identity: Identity, authorized: AuthorizedKeys) -> None:
    with pytest.raises(ValueError, match="tls= alone"):
        Server(tls=ServerTLS(server_identity), authorized=authorized)


def test_known_hosts_default_follows_home(home: Path) -> None:
    assert ClientTLS().known_hosts.path == KnownHosts().path == home / "known_hosts"


async def test_failed_authentications_from_one_address_are_answered_ever_later(
    plugins: PluginManager, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    import time

    stranger = Identity.generate()
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
        took = []
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(AuthenticationError):
                await connect(server.port, plugins, ClientTLS(stranger))
            took.append(time.monotonic() - started)
        assert took[0] < 0.5, took  # the first failure is answered at once
        assert took[1] >= 0.5 and took[2] >= 1.0 and took[2] > took[1], took  # then 0.5 s, 1 s, ...
        # An authorized key still gets in (and clears the address's record).
        client = await connect(server.port, plugins, ClientTLS(alice))
        await client.send("in")
        assert await client.recv() == "in"
        await client.close()
