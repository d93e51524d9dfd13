"""A pre-shared passphrase (docs/PROTOCOL.md §3.4): proven by challenge-response,
never sent in clear, a wrong one refused on both sides, with the failed-authentication
delay; sessions resume with it; the blocking API takes it too."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR
from tls_helpers import Tap, echo

from korinet import AuthenticationError, Client, Server, client, server
from korinet.codecs.msgpack import MsgpackCodec
from korinet.plugins import PluginManager
from korinet.runtime import server as server_module
from korinet.security.passphrase import KdfParams, PassphraseProver, PassphraseVerifier
from korinet.session import CLIENT, CLOSED, OPEN, SERVER, LinkFailed, LinkOpened, Session, SessionConfig
from korinet.session.handshake import HandshakeOutcome, ServerHandshake
from korinet.wire.frames import FrameType

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)

SECRET = "correct horse battery staple"
CODECS = {"msgpack": MsgpackCodec()}
FAST = KdfParams(n=1 << 10)  # the sans-I/O tests need no real cost


# ------------------------------------------------------------------ sans-I/O


def handshake(
    client_pass: str | None, server_pass: str | None
) -> tuple[Session, ServerHandshake, Session | None]:
    """Run a client Session against a ServerHandshake in memory, as far as it goes."""
    config = SessionConfig()
    sess = Session(CLIENT, CODECS, config, passphrase=client_pass)
    verifier = PassphraseVerifier(server_pass, FAST) if server_pass is not None else None
    hs = ServerHandshake(config, ("msgpack",), passphrase=verifier)
    sess.connection_made(0.0)
    outcome = hs.receive_data(sess.data_to_send())
    if outcome is HandshakeOutcome.NEED_DATA:  # a CHALLENGE went out
        challenge = hs.data_to_send()
        assert challenge[4] == FrameType.CHALLENGE
        sess.receive_data(challenge, 0.0)
        outcome = hs.receive_data(sess.data_to_send())
    if outcome is HandshakeOutcome.REJECTED:
        sess.receive_data(hs.data_to_send(), 0.0)
        return sess, hs, None
    assert outcome is HandshakeOutcome.HELLO and hs.hello is not None
    srv = Session(SERVER, CODECS, config)
    srv.accept(hs.hello, 0.0, hs.leftover)
    sess.receive_data(srv.data_to_send(), 0.0)
    return sess, hs, srv


def test_the_right_passphrase_opens_the_session() -> None:
    sess, _, srv = handshake(SECRET, SECRET)
    assert srv is not None and sess.state is OPEN
    assert any(isinstance(e, LinkOpened) for e in sess.events_received())


def test_a_wrong_passphrase_is_refused_by_the_server() -> None:
    sess, hs, srv = handshake("wrong", SECRET)
    assert srv is None
    assert isinstance(hs.error, AuthenticationError) and "wrong passphrase" in str(hs.error)
    assert sess.state is CLOSED and isinstance(sess.failure, AuthenticationError)


def test_a_client_without_a_passphrase_is_told_it_needs_one() -> None:
    sess, hs, srv = handshake(None, SECRET)
    assert srv is None and isinstance(hs.error, AuthenticationError)
    assert "requires a passphrase" in str(sess.failure)


def test_a_server_that_cannot_prove_the_passphrase_is_refused_by_the_client() -> None:
    # A hub without the passphrase (an impostor, or a misconfigured one) does not get
    # our messages: the client refuses its WELCOME.
    sess, _, _ = handshake(SECRET, None)
    events = sess.events_received()
    assert sess.state is CLOSED and isinstance(sess.failure, AuthenticationError)
    assert "did not prove" in str(sess.failure)
    assert [type(e) for e in events] == [LinkFailed]
    assert sess.data_to_send()[4] == FrameType.CLOSE


def test_proofs_bind_both_nonces() -> None:
    verifier = PassphraseVerifier(SECRET, FAST)
    prover = PassphraseProver(SECRET)
    client_nonce = prover.new_nonce()
    server_nonce, fields = verifier.challenge()
    proof = prover.answer(server_nonce, verifier.salt, FAST)
    assert verifier.check(client_nonce, server_nonce, proof) is not None
    # a replayed proof fails against a fresh server nonce
    other_nonce, _ = verifier.challenge()
    assert verifier.check(client_nonce, other_nonce, proof) is None
    assert SECRET.encode() not in repr(fields).encode() and SECRET not in repr(prover)


@pytest.mark.parametrize(
    "params", [KdfParams(n=1 << 20), KdfParams(n=1000), KdfParams(r=64), KdfParams(p=99)]
)
def test_a_hostile_challenge_cannot_make_the_client_burn_memory(params: KdfParams) -> None:
    prover = PassphraseProver(SECRET)
    prover.new_nonce()
    with pytest.raises(ValueError, match="unusable"):
        prover.answer(b"n" * 16, b"s" * 16, params)


# ------------------------------------------------------------------ runtime


@pytest.fixture
def plugins() -> PluginManager:
    return PluginManager.load(entry_points=False)


async def open_client(port: int, plugins: PluginManager, passphrase: str | None, **kw: Any) -> Client:
    return await Client.connect(
        "127.0.0.1", port, plugins=plugins, passphrase=passphrase, open_timeout=10 * TIMEOUT_FACTOR, **kw
    )


async def test_the_passphrase_never_crosses_the_wire(plugins: PluginManager) -> None:
    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins, passphrase=SECRET) as srv:
        tap = await Tap(srv.port).start()
        c = await open_client(tap.port, plugins, SECRET)
        await c.send("through the tap")
        assert await c.recv() == "through the tap"
        await c.close()
        await tap.close()
    captured = bytes(tap.captured)
    assert b"through the tap" in captured  # plaintext link: the tap sees the session...
    for piece in (SECRET, SECRET[:8], SECRET[-8:]):
        assert piece.encode() not in captured  # ... but never the passphrase


async def test_a_wrong_passphrase_is_refused_with_a_growing_delay(plugins: PluginManager) -> None:
    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins, passphrase=SECRET) as srv:
        with pytest.raises(AuthenticationError, match="wrong passphrase"):
            await open_client(srv.port, plugins, "guess 1")
        started = time.monotonic()
        with pytest.raises(AuthenticationError, match="wrong passphrase"):
            await open_client(srv.port, plugins, "guess 2")
        assert time.monotonic() - started >= server_module.AUTH_DELAY_FIRST * 0.9
        with pytest.raises(AuthenticationError, match="requires a passphrase"):
            await open_client(srv.port, plugins, None)
        assert not srv.hub.sessions
        c = await open_client(srv.port, plugins, SECRET)  # the right one still gets in
        await c.send(1)
        assert await c.recv() == 1
        await c.close()


async def test_a_client_with_a_passphrase_refuses_a_server_without(plugins: PluginManager) -> None:
    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins) as srv:
        with pytest.raises(AuthenticationError, match="did not prove"):
            await open_client(srv.port, plugins, SECRET)
        assert not srv.hub.sessions or all(p.session.state is not OPEN for p in srv.hub.sessions.values())


async def test_a_session_resumes_through_cuts_with_the_passphrase(plugins: PluginManager) -> None:
    from testutil.relay import Relay

    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins, passphrase=SECRET) as srv:
        relay = await Relay("127.0.0.1", srv.port).start()
        c = await open_client(relay.port, plugins, SECRET, backoff_cap=0.2)
        sid = c.session_id
        got: list[int] = []
        for round in range(4):  # each round re-proves the passphrase on a new link
            for i in range(50):
                c.send_nowait(round * 50 + i)
            relay.cut_after(300)  # mid-round, usually mid-frame
            while len(got) < (round + 1) * 50:
                got.append(await c.recv(timeout=10 * TIMEOUT_FACTOR))
            await c.wait_connected(10 * TIMEOUT_FACTOR)
        assert got == list(range(200)) and c.session_id == sid
        assert relay.cuts >= 3 and c.session.stats.resumes >= 3
        await c.close()
        await relay.close()


async def test_legacy_peers_are_refused_when_a_passphrase_is_set(plugins: PluginManager) -> None:
    async with Server("127.0.0.1", 0, handler=echo, plugins=plugins, passphrase=SECRET) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"\x00\x00\x00\x05hello")  # a v2 frame: no preface
        answer = await asyncio.wait_for(reader.read(), 10 * TIMEOUT_FACTOR)  # until the server closes
        assert answer[4] == FrameType.CLOSE and b"not a KoriNet peer" in answer
        writer.close()
        assert not srv.hub.sessions


def test_the_blocking_api_takes_a_passphrase() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    got: list[Any] = []

    def serve() -> None:
        conn, _ = listener.accept()
        peer = server(conn, passphrase=SECRET)
        got.append(peer.recv())
        peer.send("ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    c = client("127.0.0.1", port, timeout=10 * TIMEOUT_FACTOR, passphrase=SECRET)
    c.send({"hello": 1})
    assert c.recv() == "ok"
    thread.join(10 * TIMEOUT_FACTOR)
    assert got == [{"hello": 1}]
    c.close()
    listener.close()
