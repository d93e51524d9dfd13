"""The security hooks: ``korinet_session_refused`` fires once for every connection a
hub refuses, ``korinet_message_rejected`` once for every received message the rules
reject (asyncio peers and the blocking client), with the right fields; a plugin
that raises in them is logged by name and costs nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR
from tls_helpers import close_code, echo, hello, raw_hello

from korinet import REALTIME, AuthenticationError, Client, MessageRejected, MessageType, Server, hookimpl
from korinet.plugins import PluginManager
from korinet.runtime import Hub
from korinet.security import AuthorizedKeys, ClientTLS, Identity, ServerTLS, client_context
from korinet.session import CloseCode, SessionConfig
from korinet.session.handshake import encode_control
from korinet.sync import SyncClient
from korinet.wire.buffer import FrameDecoder
from korinet.wire.frames import PREFACE, FrameType

pytestmark = pytest.mark.timeout(30 * TIMEOUT_FACTOR)

WAIT = 10 * TIMEOUT_FACTOR
SECRET = "correct horse battery staple"


class Recorder:
    """Records every security event; ``changed`` is set at each one (any thread)."""

    def __init__(self) -> None:
        self.refused: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.changed = threading.Event()

    @hookimpl
    def korinet_session_refused(
        self, server: Any, peername: str, fingerprint: str | None, reason: str, code: int
    ) -> None:
        self.refused.append(
            {
                "server": server,
                "peername": peername,
                "fingerprint": fingerprint,
                "reason": reason,
                "code": code,
            }
        )
        self.changed.set()

    @hookimpl
    def korinet_message_rejected(self, session: Any, message_type: str, reason: str) -> None:
        self.rejected.append({"session": session, "type": message_type, "reason": reason})
        self.changed.set()


class Types:
    """Message types of the server: one needing a role, one with a validator."""

    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [
            MessageType("test.admin", handler=lambda peer, msg: "ok", required_role="admin"),
            MessageType("test.even", validate=_even, handler=lambda peer, msg: msg.data),
        ]


class LaxTypes:
    """The client's view: the same names, no rules, plus a type the server lacks."""

    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [MessageType("test.admin"), MessageType("test.even"), MessageType("test.nosuch")]


def _even(data: Any) -> None:
    if not isinstance(data, int) or data % 2:
        raise ValueError(f"{data!r} is not even")


def manager(*plugins: object) -> PluginManager:
    return PluginManager.load(entry_points=False, extra=plugins)


async def connect(port: int, plugins: PluginManager, **kwargs: Any) -> Client:
    return await Client.connect("127.0.0.1", port, plugins=plugins, open_timeout=WAIT, **kwargs)


async def round_trip(port: int, plugins: PluginManager, **kwargs: Any) -> None:
    """A client that gets in and is echoed: the server went on (and every hook due
    before it has run)."""
    client = await connect(port, plugins, **kwargs)
    try:
        await client.send("still serving")
        assert await client.recv(timeout=WAIT) == "still serving"
    finally:
        await client.close()


async def plain_hello(port: int, payload: bytes) -> list[tuple[int, bytes]]:
    """Send ``payload`` on a plaintext connection; the frames answered until the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    data = b""
    with contextlib.suppress(ConnectionError):
        data = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    decoder = FrameDecoder(1 << 20)
    decoder.feed(data)
    return list(decoder.frames())


def only(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(events) == 1, f"expected exactly one event, got {events}"
    return events[0]


# ------------------------------------------------------------------ refusals


async def test_an_unknown_key_and_a_missing_certificate_are_each_reported_once(
    server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    recorder = Recorder()
    plugins = manager(recorder)
    stranger = Identity.generate()
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
        with pytest.raises(AuthenticationError, match="not authorized"):
            await connect(server.port, plugins, tls=ClientTLS(stranger))
        event = only(recorder.refused)
        assert event["server"] is server.hub and isinstance(event["server"], Hub)
        assert event["fingerprint"] == stranger.fingerprint
        assert event["code"] == CloseCode.AUTH_FAILED and "not authorized" in event["reason"]
        assert event["peername"].startswith("127.0.0.1:")
        recorder.refused.clear()

        with pytest.raises(AuthenticationError, match="presented none"):
            await connect(server.port, plugins, tls=ClientTLS(identity=None))
        event = only(recorder.refused)
        assert event["fingerprint"] is None and event["code"] == CloseCode.AUTH_FAILED
        assert "presented none" in event["reason"]
        recorder.refused.clear()

        await round_trip(server.port, plugins, tls=ClientTLS(alice))
    assert recorder.refused == [] and recorder.rejected == []


async def test_a_key_refused_before_its_hello_is_reported_once_not_again_at_the_timeout(
    server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    recorder = Recorder()
    stranger = Identity.generate()
    tls = ServerTLS(server_identity, authorized=authorized)
    config = SessionConfig(handshake_timeout=0.3 * TIMEOUT_FACTOR)
    async with Server("127.0.0.1", 0, tls=tls, plugins=manager(recorder), config=config) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=client_context(stranger))
        # the TLS handshake is done: the key is checked, and refused, before any HELLO
        await asyncio.wait_for(asyncio.to_thread(recorder.changed.wait, WAIT), WAIT)
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed at the timeout
        writer.close()
        assert only(recorder.refused)["fingerprint"] == stranger.fingerprint
        assert recorder.refused[0]["code"] == CloseCode.AUTH_FAILED


async def test_a_wrong_or_missing_passphrase_is_reported_once_each() -> None:
    recorder = Recorder()
    plugins = manager(recorder)
    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins, passphrase=SECRET) as server:
        with pytest.raises(AuthenticationError, match="wrong passphrase"):
            await connect(server.port, plugins, passphrase="guess")
        event = only(recorder.refused)
        assert event["server"] is server.hub and event["fingerprint"] is None
        assert event["code"] == CloseCode.AUTH_FAILED and event["reason"] == "wrong passphrase"
        recorder.refused.clear()

        with pytest.raises(AuthenticationError, match="requires a passphrase"):
            await connect(server.port, plugins, passphrase=None)
        event = only(recorder.refused)
        assert event["code"] == CloseCode.AUTH_FAILED and "requires a passphrase" in event["reason"]
        recorder.refused.clear()

        await round_trip(server.port, plugins, passphrase=SECRET)
    assert recorder.refused == []


async def test_a_stolen_resume_token_is_reported_with_the_thief_s_key(
    server_identity: Identity, alice: Identity, bob: Identity, authorized: AuthorizedKeys
) -> None:
    recorder = Recorder()
    plugins = manager(recorder)
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
        client = await connect(server.port, plugins, tls=ClientTLS(alice))
        try:
            stolen = {"id": client.session.session_id, "token": client.session.token, "received": 0}
            code, _ = close_code(await raw_hello(server.port, client_context(bob), stolen))
            assert code == CloseCode.AUTH_FAILED
            event = only(recorder.refused)
            assert event["fingerprint"] == bob.fingerprint and event["code"] == CloseCode.AUTH_FAILED
            assert "another identity" in event["reason"]
            assert client.is_connected
        finally:
            await client.close()


async def test_a_session_limit_refusal_is_reported_once() -> None:
    recorder = Recorder()
    plugins = manager(recorder)
    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins, max_sessions=1) as server:
        first = await connect(server.port, plugins)
        try:
            code, reason = close_code(await plain_hello(server.port, hello()))
            assert code == CloseCode.TRY_AGAIN_LATER
            event = only(recorder.refused)
            assert event["code"] == CloseCode.TRY_AGAIN_LATER and event["reason"] == reason
            assert event["fingerprint"] is None and event["server"] is server.hub
        finally:
            await first.close()


@pytest.mark.parametrize("limit", ["max_connections", "max_connections_per_address"])
async def test_a_connection_limit_refusal_is_reported_once(limit: str) -> None:
    recorder = Recorder()
    async with Server("127.0.0.1", 0, plugins=manager(recorder), **{limit: 1}) as server:
        _, held = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), WAIT) == b""  # cut, no CLOSE frame
            writer.close()
            event = only(recorder.refused)
            assert event["code"] == CloseCode.TRY_AGAIN_LATER and "too many connections" in event["reason"]
            assert event["fingerprint"] is None
        finally:
            held.close()


async def test_handshake_rejections_and_timeouts_are_reported_with_the_code_sent() -> None:
    recorder = Recorder()
    config = SessionConfig(handshake_timeout=0.3 * TIMEOUT_FACTOR)
    async with Server("127.0.0.1", 0, plugins=manager(recorder), legacy=False, config=config) as server:
        answer = await plain_hello(server.port, b"\x00\x00\x00\x05hello")  # not our preface
        assert close_code(answer)[0] == CloseCode.PROTOCOL_ERROR
        assert only(recorder.refused)["code"] == CloseCode.PROTOCOL_ERROR
        recorder.refused.clear()

        future = {"versions": [99], "codecs": ["msgpack"], "heartbeat": 5.0, "window": 64,
                  "window_bytes": 1 << 20, "max_frame": 1 << 20, "resume": None}  # fmt: skip
        answer = await plain_hello(server.port, PREFACE + encode_control(FrameType.HELLO, future))
        assert close_code(answer)[0] == CloseCode.UNSUPPORTED_VERSION
        event = only(recorder.refused)
        assert event["code"] == CloseCode.UNSUPPORTED_VERSION and "protocol version" in event["reason"]
        recorder.refused.clear()

        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # says nothing
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        event = only(recorder.refused)
        assert event["code"] == CloseCode.HANDSHAKE_TIMEOUT and event["fingerprint"] is None


# ------------------------------------------------------------------ rejections


async def test_each_rejected_message_is_reported_once_on_the_receiving_side() -> None:
    recorder = Recorder()
    server_plugins = manager(Types(), recorder)
    client_recorder = Recorder()
    client_plugins = manager(LaxTypes(), client_recorder)
    peers: list[Any] = []

    async def handler(peer: Any) -> None:
        peers.append(peer)
        await echo(peer)

    async with Server("127.0.0.1", 0, handler=handler, plugins=server_plugins, accept_plain=False) as server:
        client = await connect(server.port, client_plugins)
        try:
            cases = [
                ("test.nosuch", 1, "unknown message type 'test.nosuch'"),
                ("test.even", 3, "invalid 'test.even' message: 3 is not even"),
                ("test.admin", {}, "requires the role 'admin'"),
                ("", "plain", "only typed messages are accepted here"),
            ]
            for mtype, data, reason in cases:
                with pytest.raises(MessageRejected, match=reason):
                    await client.request(data, mtype, timeout=WAIT)
                event = only(recorder.rejected)
                assert event["session"] is peers[0] and event["type"] == mtype
                assert reason in event["reason"]
                recorder.rejected.clear()
            assert await client.request(4, "test.even", timeout=WAIT) == 4  # what passes is not reported
        finally:
            await client.close()
    assert recorder.rejected == [] and recorder.refused == []
    assert client_recorder.rejected == [], "the sender's side reported a rejection it did not make"


class Pusher:
    """The server sends a type the blocking client does not know."""

    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [MessageType("test.push")]


async def test_the_blocking_client_reports_what_it_rejects() -> None:
    recorder = Recorder()

    async def handler(peer: Any) -> None:
        peer.send_nowait({"n": 1}, "test.push")
        peer.send_nowait("after")
        await echo(peer)

    async with Server("127.0.0.1", 0, handler=handler, plugins=manager(Pusher())) as server:

        def blocking() -> Any:
            with SyncClient("127.0.0.1", server.port, plugins=manager(recorder), timeout=WAIT) as client:
                got = client.recv(timeout=WAIT)  # the push came first, and was rejected
                assert recorder.changed.wait(WAIT)
                return client, got

        client, got = await asyncio.to_thread(blocking)
    assert got == "after"
    event = only(recorder.rejected)
    assert event["session"] is client and event["type"] == "test.push"
    assert "unknown message type" in event["reason"]


class RealtimeTypes:
    """Realtime types: one that needs a role (its handler records who got through),
    one with a validator."""

    def __init__(self) -> None:
        self.handled: list[Any] = []
        self.arrived = threading.Event()

    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [
            MessageType("test.rt-admin", delivery=REALTIME, handler=self._handle, required_role="admin"),
            MessageType("test.rt-even", delivery=REALTIME, validate=_even, handler=self._handle),
        ]

    def _handle(self, peer: Any, msg: Any) -> None:
        self.handled.append(msg.data)
        self.arrived.set()


async def test_realtime_messages_need_the_role_too_and_each_rejection_is_reported(
    server_identity: Identity, alice: Identity, bob: Identity, authorized: AuthorizedKeys
) -> None:
    recorder = Recorder()
    types = RealtimeTypes()
    plugins = manager(types, recorder)
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
        user = await connect(server.port, plugins, tls=ClientTLS(bob))
        admin = await connect(server.port, plugins, tls=ClientTLS(alice))
        try:
            for mtype, data, reason in [
                ("test.rt-admin", "from bob", "requires the role 'admin'"),
                ("test.rt-even", 3, "3 is not even"),
            ]:
                recorder.changed.clear()
                assert user.send_realtime(data, mtype)
                await asyncio.wait_for(asyncio.to_thread(recorder.changed.wait, WAIT), WAIT)
                event = only(recorder.rejected)
                assert event["type"] == mtype and reason in event["reason"]
                assert event["session"].identity.name == "bob"
                recorder.rejected.clear()
            assert admin.send_realtime("from alice", "test.rt-admin")
            await asyncio.wait_for(asyncio.to_thread(types.arrived.wait, WAIT), WAIT)
            assert types.handled == ["from alice"], "a realtime message got past its role"
            assert sum(p.session.stats.realtime_malformed for p in server.hub.sessions.values()) == 2
        finally:
            await user.close()
            await admin.close()
    assert recorder.rejected == []


async def test_the_blocking_client_drops_and_reports_an_invalid_realtime_message() -> None:
    recorder = Recorder()

    async def handler(peer: Any) -> None:
        peer.send_realtime(3, "test.rt-even")  # odd: the client's validator refuses it
        peer.send_nowait("after")
        await echo(peer)

    async with Server("127.0.0.1", 0, handler=handler, plugins=manager(LaxRealtime())) as server:

        def blocking() -> Any:
            types = RealtimeTypes()
            with SyncClient(
                "127.0.0.1", server.port, plugins=manager(types, recorder), timeout=WAIT
            ) as client:
                assert client.recv(timeout=WAIT) == "after"
                assert recorder.changed.wait(WAIT)
                return client, types.handled

        client, handled = await asyncio.to_thread(blocking)
    assert handled == []
    event = only(recorder.rejected)
    assert event["session"] is client and event["type"] == "test.rt-even" and "not even" in event["reason"]


class LaxRealtime:
    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [MessageType("test.rt-even", delivery=REALTIME)]


# ------------------------------------------------------------------ isolation


class Raising:
    @hookimpl
    def korinet_session_refused(self, reason: str) -> None:
        raise RuntimeError(f"boom: {reason}")

    @hookimpl
    def korinet_message_rejected(self, message_type: str) -> None:
        raise RuntimeError(f"boom: {message_type}")


class RaisingLater:
    """Fails in the awaitable it returns, which the runtime awaits."""

    def __init__(self) -> None:
        self.failing = asyncio.Event()

    @hookimpl
    def korinet_session_refused(self) -> Any:
        async def later() -> None:
            await asyncio.sleep(0)
            self.failing.set()  # the runtime logs in this same step
            raise RuntimeError("late boom")

        return later()


async def test_a_plugin_raising_in_these_hooks_is_logged_by_name_and_the_rest_go_on(
    server_identity: Identity, alice: Identity, authorized: AuthorizedKeys, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    plugins = PluginManager.load(entry_points=False)
    plugins.register(Raising(), name="raiser")
    late = RaisingLater()
    plugins.register(late, name="late-raiser")
    plugins.register(Types(), name="types")
    plugins.register(recorder, name="recorder")  # after the ones that raise
    client_plugins = manager(LaxTypes())
    stranger = Identity.generate()
    tls = ServerTLS(server_identity, authorized=authorized)
    with caplog.at_level(logging.ERROR, logger="korinet.plugins"):
        async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
            with pytest.raises(AuthenticationError):
                await connect(server.port, client_plugins, tls=ClientTLS(stranger))
            client = await connect(server.port, client_plugins, tls=ClientTLS(alice))
            try:
                with pytest.raises(MessageRejected, match="unknown message type"):
                    await client.request(1, "test.nosuch", timeout=WAIT)
                await client.send("still serving")
                assert await client.recv(timeout=WAIT) == "still serving"
            finally:
                await client.close()
            await asyncio.wait_for(late.failing.wait(), WAIT)  # the awaitable runs in a task of its own
    assert only(recorder.refused)["fingerprint"] == stranger.fingerprint
    assert only(recorder.rejected)["type"] == "test.nosuch"
    assert "plugin 'raiser' failed in korinet_session_refused" in caplog.text
    assert "plugin 'raiser' failed in korinet_message_rejected" in caplog.text
    assert "plugin 'late-raiser' failed in korinet_session_refused" in caplog.text
    assert "late boom" in caplog.text
