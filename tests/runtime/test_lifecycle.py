"""Server restarts, silent peers, reconnection timing, plugin isolation."""

from __future__ import annotations

import asyncio
import time

import pytest
from testutil import TIMEOUT_FACTOR, eventually
from testutil.relay import Relay

from korinet import Client, Server, SessionConfig, SessionExpired, hookimpl
from korinet.plugins import PluginManager
from korinet.reconnect import backoff


@pytest.fixture
def plugins() -> PluginManager:
    return PluginManager.load(entry_points=False)


async def _echo_handler(peer) -> None:
    async for msg in peer:
        await peer.send(msg)


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_server_restart_tells_client_and_it_carries_on(plugins: PluginManager) -> None:
    server = await Server("127.0.0.1", 0, handler=_echo_handler, plugins=plugins).start()
    port = server.port
    client = await Client.connect("127.0.0.1", port, plugins=plugins)
    await client.send("before")
    assert await client.recv() == "before"
    old_session = client.session_id
    await server.close()  # sessions gone, as after a crash
    server = await Server("127.0.0.1", port, handler=_echo_handler, plugins=plugins).start()
    try:
        # The client is told through a typed exception ...
        with pytest.raises(SessionExpired) as info:
            await asyncio.wait_for(client.recv(), 10)
        assert info.value.session_id == old_session
        # ... and carries on in a new session.
        await client.send("after")
        assert await asyncio.wait_for(client.recv(), 5) == "after"
        assert client.session_id != old_session
    finally:
        await client.close()
        await server.close()


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_unconfirmed_sends_fail_with_session_expired(plugins: PluginManager) -> None:
    hold = asyncio.Event()

    async def slow(peer) -> None:
        await hold.wait()  # never takes the message: it stays unacknowledged

    server = await Server("127.0.0.1", 0, handler=slow, plugins=plugins).start()
    port = server.port
    client = await Client.connect("127.0.0.1", port, plugins=plugins)
    pending = client.send_nowait("maybe delivered, maybe not")
    await asyncio.sleep(0.2)
    await server.close()
    server = await Server("127.0.0.1", port, handler=_echo_handler, plugins=plugins).start()
    try:
        with pytest.raises(SessionExpired) as info:
            await asyncio.wait_for(pending, 10)
        assert info.value.unconfirmed == 1
    finally:
        await client.close()
        await server.close()


class _LinkEvents:
    def __init__(self) -> None:
        self.lost: list[tuple[float, object]] = []
        self.resumed: list[float] = []

    @hookimpl
    def korinet_session_lost(self, session, error) -> None:
        self.lost.append((time.monotonic(), session))

    @hookimpl
    def korinet_session_resumed(self, session, replayed) -> None:
        self.resumed.append(time.monotonic())


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_silent_peer_detected_within_three_heartbeats(plugins: PluginManager) -> None:
    events = _LinkEvents()
    plugins.register(events)
    interval = 0.2
    config = SessionConfig(heartbeat_interval=interval)
    async with Server("127.0.0.1", 0, handler=_echo_handler, plugins=plugins, config=config) as server:
        relay = await Relay("127.0.0.1", server.port).start()
        client = await Client.connect("127.0.0.1", relay.port, plugins=plugins, config=config)
        await client.send("x")
        assert await client.recv() == "x"
        relay.black_hole = True  # half-open: nothing arrives, nothing closes
        silent_since = time.monotonic()
        while len(events.lost) < 2 and time.monotonic() - silent_since < 3:
            await asyncio.sleep(0.01)
        detected = [t - silent_since for t, _ in events.lost]
        assert len(detected) == 2, "both sides must notice the silence"
        assert max(detected) <= 3 * interval + 0.3 * TIMEOUT_FACTOR, detected
        relay.black_hole = False
        await client.send("back")  # resumes through the relay again
        assert await asyncio.wait_for(client.recv(), 5) == "back"
        await client.close()
        await relay.close()


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_first_retry_is_immediate_after_a_cut(
    plugins: PluginManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Record every reconnection delay the client draws: after each cut of a working
    # link the first retry must not wait (checked on the delays, not on the clock).
    import korinet.reconnect as reconnect_module

    drawn: list[float] = []

    def recording_backoff(**kwargs: float):  # type: ignore[no-untyped-def]
        for delay in backoff(**kwargs):
            drawn.append(delay)
            yield delay

    monkeypatch.setattr(reconnect_module, "backoff", recording_backoff)
    async with Server("127.0.0.1", 0, handler=_echo_handler, plugins=plugins) as server:
        relay = await Relay("127.0.0.1", server.port).start()
        client = await Client.connect("127.0.0.1", relay.port, plugins=plugins)
        for _ in range(5):
            relay.cut()
            await client.send("ping")
            assert await client.recv() == "ping"
        assert relay.cuts == 5
        assert drawn == [0.0] * 5, drawn  # one immediate retry per cut, each one succeeded
        await client.close()
        await relay.close()


def test_backoff_immediate_then_exponential_with_jitter_and_cap() -> None:
    import random

    delays = backoff(initial=0.1, factor=2, cap=1.0, rng=random.Random(1))
    got = [next(delays) for _ in range(8)]
    assert got[0] == 0.0
    assert 0.05 <= got[1] <= 0.1 and 0.1 <= got[2] <= 0.2
    assert all(d <= 1.0 for d in got) and got[-1] >= 0.5
    assert len(set(got[1:])) == len(got) - 1  # jittered


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_failing_plugin_is_logged_and_session_lives(plugins: PluginManager, caplog) -> None:
    class Broken:
        @hookimpl
        def korinet_session_opened(self, session) -> None:
            raise RuntimeError("boom")

    plugins.register(Broken(), name="broken-plugin")
    async with Server("127.0.0.1", 0, handler=_echo_handler, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        await client.send("still works")
        assert await client.recv() == "still works"
        await client.close()
    assert "broken-plugin" in caplog.text and "boom" in caplog.text


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_outage_limit_ends_the_session(plugins: PluginManager) -> None:
    server = await Server("127.0.0.1", 0, handler=_echo_handler, plugins=plugins).start()
    client = await Client.connect("127.0.0.1", server.port, plugins=plugins, outage_limit=0.5)
    await server.close()
    from korinet import KoriNetTimeout

    with pytest.raises(KoriNetTimeout):
        await asyncio.wait_for(client.send("nobody there"), 10)
    await client.close()


@pytest.mark.timeout(30 * TIMEOUT_FACTOR)
async def test_a_replys_lazy_ack_still_leaves_when_nothing_else_does(plugins: PluginManager) -> None:
    async with Server("127.0.0.1", 0, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        assert await client.request("hi", "korinet.echo", timeout=5) == "hi"
        peer = next(iter(server.hub.sessions.values()))
        # The reply waits in the server's replay buffer until the client acks it; the
        # client sends nothing more, so its lazy ACK must leave on its own timer.
        await eventually(lambda: peer.session.unacked == 0, what="the reply was never acknowledged")
        await client.close()


def test_reconnect_policy_gives_up_after_the_outage_limit_and_restarts_after_a_handshake() -> None:
    from korinet.exceptions import KoriNetTimeout
    from korinet.reconnect import Reconnect

    policy = Reconnect("h:1", cap=1.0, outage_limit=10.0)
    policy.last_error = ConnectionRefusedError("refused")
    assert policy.next_delay(True, 100.0) == 0.0  # a cut link: the first retry is immediate
    assert 0.0 < policy.next_delay(False, 105.0) <= 1.0  # (type: float) then backoff
    gave_up = policy.next_delay(False, 110.5)  # 10.5 s without a link
    assert isinstance(gave_up, KoriNetTimeout)
    assert "h:1" in str(gave_up) and "refused" in str(gave_up)
    policy.opened()  # a handshake: a new outage starts from an immediate retry, clock reset
    assert policy.next_delay(False, 500.0) == 0.0
    assert not isinstance(policy.next_delay(False, 509.0), KoriNetTimeout)


def test_reconnect_policy_names_the_errors_no_retry_can_fix() -> None:
    import ssl

    from korinet.exceptions import AuthenticationError, ConnectionClosedError
    from korinet.reconnect import fatal_error
    from korinet.session import CloseCode

    assert fatal_error(ConnectionRefusedError(), "h:1") is None
    assert fatal_error(TimeoutError(), "h:1") is None
    auth = AuthenticationError("key changed")
    assert fatal_error(auth, "h:1") is auth
    cert = ssl.SSLCertVerificationError("bad cert")
    fatal = fatal_error(cert, "h:1")
    assert isinstance(fatal, ConnectionClosedError) and fatal.code == CloseCode.AUTH_FAILED
    assert fatal.__cause__ is cert


async def test_close_goes_on_when_the_link_was_reset_unseen(plugins: PluginManager) -> None:
    # The peer reset the connection and the loop has not seen it yet: shutting the
    # socket's write side fails (ENOTCONN). close() still ends the session cleanly.
    async def consume(peer):
        async for _ in peer:
            pass

    async with Server("127.0.0.1", 0, handler=consume, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        await client.send("hello", timeout=10 * TIMEOUT_FACTOR)
        assert client.conn is not None and client.conn.transport is not None
        transport = client.conn.transport

        def reset() -> None:
            raise OSError(107, "Transport endpoint is not connected")

        transport.write_eof = reset  # type: ignore[method-assign]
        await asyncio.wait_for(client.close(), 10 * TIMEOUT_FACTOR)
        assert client.is_closed
