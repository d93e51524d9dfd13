"""Fan-out (korinet.runtime.fanout): one encode per codec, each peer served as Peer.post
would serve it, one peer's trouble reported and not raised."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from session.session_helpers import SessionPair  # tests/ is on the path (pyproject)
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import (
    REALTIME,
    Client,
    ConnectionClosed,
    InvalidState,
    KoriNetTimeout,
    LocalProtocolError,
    MessageType,
    Peer,
    SendBufferFull,
    Server,
    SessionConfig,
    hookimpl,
    post_many,
    send_realtime_many,
)
from korinet.codecs.base import Codec
from korinet.plugins import PluginManager
from korinet.session import OPEN, PreparedMessage

pytestmark = pytest.mark.timeout(30 * TIMEOUT_FACTOR)

NEWS = "fan.news"
TICK = "fan.tick"
WAIT = 5 * TIMEOUT_FACTOR


class FanPlugin:
    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [MessageType(NEWS), MessageType(TICK, delivery=REALTIME)]


class CountingCodec:
    """A codec wrapper that counts encodes (shared by every session of its codec)."""

    def __init__(self, inner: Codec) -> None:
        self.inner = inner
        self.name = inner.name
        self.encodes = 0

    def encode(self, obj: Any) -> bytes:
        self.encodes += 1
        return self.inner.encode(obj)

    def decode(self, data: bytes) -> Any:
        return self.inner.decode(data)


class Star:
    """A server and its clients; ``peers[i]`` is the server's side of ``clients[i]``."""

    def __init__(self, server: Server, clients: list[Client], peers: list[Peer], relay: Relay | None) -> None:
        self.server = server
        self.relay = relay
        self.clients = clients
        self.peers = peers

    def count_encodes(self) -> dict[str, CountingCodec]:
        """Wrap each server session's codec in one shared counter per codec name."""
        counters: dict[str, CountingCodec] = {}
        for peer in self.peers:
            codec = peer.session.codec
            assert codec is not None
            counter = counters.setdefault(codec.name, CountingCodec(codec))
            peer.session.codec = counter
        return counters


@contextlib.asynccontextmanager
async def star(
    configs: list[SessionConfig | None], *, relayed: bool = False, store: Path | None = None
) -> AsyncIterator[Star]:
    """Clients with these configs; with ``relayed``, the last one through ``Star.relay``."""
    plugins = PluginManager.load(entry_points=False, extra=[FanPlugin()])
    opened: asyncio.Queue[Peer] = asyncio.Queue()

    async def handler(peer: Peer) -> None:
        await opened.put(peer)
        await asyncio.Event().wait()  # the test drives the server side

    async with Server("127.0.0.1", 0, handler=handler, plugins=plugins, store=store) as server:
        clients: list[Client] = []
        peers: list[Peer] = []
        relay = await Relay("127.0.0.1", server.port).start() if relayed else None
        try:
            for i, config in enumerate(configs):
                port = relay.port if relay is not None and i == len(configs) - 1 else server.port
                clients.append(await Client.connect("127.0.0.1", port, plugins=plugins, config=config))
                peers.append(await asyncio.wait_for(opened.get(), WAIT))
            yield Star(server, clients, peers, relay)
        finally:
            for client in clients:
                await client.close()
            if relay is not None:
                await relay.close()


async def recv_all(client: Client, count: int) -> list[Any]:
    got = [await client.recv(timeout=WAIT) for _ in range(count)]
    with pytest.raises(KoriNetTimeout):
        await client.recv(timeout=0.1)  # and nothing more
    return got


JSON_ONLY = SessionConfig(codecs=("json",))


async def test_every_peer_gets_every_message_once_in_order_across_codecs() -> None:
    async with star([None, None, JSON_ONLY, None]) as s:
        names = [p.session.codec.name for p in s.peers if p.session.codec]
        assert names == ["msgpack", "msgpack", "json", "msgpack"]
        results = [post_many(s.peers, {"n": i, "text": f"news {i}"}, NEWS) for i in range(30)]
        for result in results:
            assert not result.failed
            assert set(result.queued) == set(s.peers)
            assert result.encodes == 2  # msgpack and json
        for peer in s.peers:
            seqs = [r.queued[peer] for r in results]
            assert seqs == list(range(seqs[0], seqs[0] + 30))  # consecutive: one copy each
        for client in s.clients:
            got = await recv_all(client, 30)
            assert got == [{"n": i, "text": f"news {i}"} for i in range(30)]


async def test_a_peer_listed_twice_gets_one_copy() -> None:
    async with star([None, None]) as s:
        result = post_many([s.peers[0], s.peers[1], s.peers[0]], "once", NEWS)
        assert list(result.queued) == s.peers
        assert await recv_all(s.clients[0], 1) == ["once"]
        assert await recv_all(s.clients[1], 1) == ["once"]


async def test_one_encode_per_codec_where_post_encodes_per_peer() -> None:
    async with star([None, None, JSON_ONLY, None, JSON_ONLY]) as s:
        counters = s.count_encodes()
        assert set(counters) == {"msgpack", "json"}
        post_many(s.peers, {"n": 1}, NEWS)
        assert {n: c.encodes for n, c in counters.items()} == {"msgpack": 1, "json": 1}
        assert send_realtime_many(s.peers, {"t": 1}, TICK) == 5
        assert {n: c.encodes for n, c in counters.items()} == {"msgpack": 2, "json": 2}
        # the same through Peer.post: one encode per peer (so the counters can tell)
        for peer in s.peers:
            peer.post({"n": 2}, NEWS)
        assert {n: c.encodes for n, c in counters.items()} == {"msgpack": 5, "json": 4}
        for client in s.clients:
            assert await recv_all(client, 2) == [{"n": 1}, {"n": 2}]
            tick = client.recv_realtime_nowait()
            assert tick is not None and tick.data == {"t": 1}


async def test_a_full_send_buffer_is_reported_for_that_peer_only() -> None:
    async with star([None, SessionConfig(window=2), None]) as s:
        slow = s.peers[1]
        results = [post_many(s.peers, i, NEWS) for i in range(4)]
        # the slow client acknowledges nothing until it reads: its window of 2 is full
        for i, result in enumerate(results):
            assert set(result.queued) | set(result.failed) == set(s.peers)
            if i < 2:
                assert not result.failed
            else:
                assert list(result.failed) == [slow]
                assert isinstance(result.failed[slow], SendBufferFull)
        assert await recv_all(s.clients[0], 4) == [0, 1, 2, 3]
        assert await recv_all(s.clients[2], 4) == [0, 1, 2, 3]
        assert await recv_all(s.clients[1], 2) == [0, 1]  # what fitted, once each


async def test_a_closed_peer_is_reported_not_raised() -> None:
    async with star([None, None, None]) as s:
        gone = s.peers[1]
        await s.clients[1].close()
        await asyncio.wait_for(asyncio.shield(gone.closed), WAIT)
        result = post_many(s.peers, "after", NEWS)
        assert set(result.queued) == {s.peers[0], s.peers[2]}
        assert isinstance(result.failed[gone], ConnectionClosed)
        assert result.failed[gone] is gone.closed.result()  # what gone.post() raises
        assert await recv_all(s.clients[0], 1) == ["after"]
        assert await recv_all(s.clients[2], 1) == ["after"]
        assert send_realtime_many(s.peers, "rt", TICK) == 2


async def test_realtime_reaches_the_open_peers_and_drops_the_others() -> None:
    async with star([None, JSON_ONLY, None], relayed=True) as s:
        assert s.relay is not None
        down = s.peers[2]
        dropped_before = down.session.stats.realtime_dropped
        s.relay.refuse = True  # the third client's link dies and cannot come back yet
        s.relay.cut()
        for _ in range(int(200 * TIMEOUT_FACTOR)):
            if down.conn is None:
                break
            await asyncio.sleep(0.01)
        assert down.conn is None and not down.is_closed
        sent = [send_realtime_many(s.peers, {"frame": i}, TICK) for i in range(5)]
        assert sent == [2] * 5
        assert down.session.stats.realtime_dropped == dropped_before + 5
        # a reliable marker behind them: once it arrived, so had the frames before it
        post_many(s.peers[:2], "marker", NEWS)
        for client in s.clients[:2]:
            assert await client.recv(timeout=WAIT) == "marker"
            frames = []
            while (msg := client.recv_realtime_nowait()) is not None:
                frames.append(msg.data["frame"])
            assert frames == [0, 1, 2, 3, 4]
        s.relay.refuse = False
        await s.clients[2].wait_connected(WAIT)  # the dropped frames are never replayed
        assert await recv_all(s.clients[2], 0) == []
        assert s.clients[2].recv_realtime_nowait() is None


async def test_with_a_store_each_copy_is_committed_as_post_would_store_it(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    async with star([None, JSON_ONLY], store=db) as s:
        reader = sqlite3.connect(db)  # another connection sees only what is committed
        try:
            post_many(s.peers, {"n": 1}, NEWS)
            post_many(s.peers, {"n": 2}, NEWS)
            for peer in s.peers:
                rows = reader.execute(
                    "SELECT seq, frame, size FROM korinet_messages WHERE key = ? ORDER BY seq",
                    (peer.session_id,),
                ).fetchall()
                assert [tuple(row) for row in rows] == list(peer.session.unacked_after(0))
                assert len(rows) == 2
        finally:
            reader.close()
        for client in s.clients:
            assert await recv_all(client, 2) == [{"n": 1}, {"n": 2}]


async def test_a_codec_that_cannot_encode_fails_its_peers_only() -> None:
    async with star([None, JSON_ONLY]) as s:
        result = post_many(s.peers, b"\x00raw bytes", NEWS)  # msgpack can, json cannot
        assert list(result.queued) == [s.peers[0]]
        assert type(result.failed[s.peers[1]]).__name__ == "CodecError"
        assert send_realtime_many(s.peers, b"\x01", TICK) == 1
        assert await recv_all(s.clients[0], 1) == [b"\x00raw bytes"]


async def test_too_long_a_type_name_raises_before_anything_is_queued() -> None:
    async with star([None, None]) as s:
        with pytest.raises(LocalProtocolError):
            post_many(s.peers, 1, "x" * 300)
        with pytest.raises(LocalProtocolError):
            send_realtime_many(s.peers, 1, "x" * 300)
        assert [p.last_seq for p in s.peers] == [0, 0]


def test_encoded_and_prepared_sends_buffer_the_frame_send_message_builds() -> None:
    """The durable store and the replay read the buffered frames: they must not differ."""
    pairs = [SessionPair().open() for _ in range(3)]
    servers = [pair.server for pair in pairs]
    for server in servers:
        assert server is not None and server.state is OPEN and server.codec is not None
    by_message, by_payload, by_prepared = servers
    assert by_message and by_payload and by_prepared and by_prepared.codec
    codec = by_prepared.codec
    for obj, mtype, flags, corr in [({"a": 1}, "", 0, 0), ([1, 2], NEWS, 0, 0), ("r", NEWS, 1, 7)]:
        seqs = [
            by_message.send_message(obj, mtype, flags=flags, corr=corr),
            by_payload.send_encoded(codec.encode(obj), mtype, flags=flags, corr=corr),
            by_prepared.send_prepared(
                PreparedMessage(codec.name, codec.encode(obj), mtype, flags=flags, corr=corr)
            ),
        ]
        assert len(set(seqs)) == 1
        assert len({server.data_to_send() for server in servers}) == 1
    assert by_message.unacked_after(0) == by_payload.unacked_after(0) == by_prepared.unacked_after(0)
    assert by_message.unacked_bytes == by_payload.unacked_bytes == by_prepared.unacked_bytes
    assert by_message.stats == by_payload.stats == by_prepared.stats
    # realtime: the same frame too
    assert by_message.send_realtime({"t": 1}, TICK)
    assert by_prepared.send_realtime_prepared(
        PreparedMessage(codec.name, codec.encode({"t": 1}), TICK, realtime=True)
    )
    assert by_message.data_to_send() == by_prepared.data_to_send()


def test_a_prepared_message_of_another_codec_or_lane_is_refused() -> None:
    pair = SessionPair().open()
    server = pair.server
    assert server is not None and server.codec is not None and server.codec.name == "msgpack"
    with pytest.raises(InvalidState):
        server.send_prepared(PreparedMessage("json", b"1"))
    with pytest.raises(InvalidState):
        server.send_prepared(PreparedMessage("msgpack", b"\x01", realtime=True))
    with pytest.raises(InvalidState):
        server.send_realtime_prepared(PreparedMessage("msgpack", b"\x01"))
    assert server.last_seq == 0 and server.data_to_send() == b""
