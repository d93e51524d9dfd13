"""A client and a server Session over an in-memory link, where either side can be
"crashed" (thrown away) and brought back from a snapshot. No sockets, no clock.

Named ``durable_pair`` (not ``helpers``): the test directories have no
``__init__.py``, so module names must be unique across the suite.
"""

from __future__ import annotations

from typing import Any

from korinet.codecs import JsonCodec, MsgpackCodec
from korinet.codecs.base import Codec
from korinet.session import (
    CLIENT,
    SERVER,
    Event,
    HandshakeOutcome,
    MessageReceived,
    ServerHandshake,
    Session,
    SessionConfig,
)
from korinet.session.snapshot import SessionSnapshot


def codecs() -> dict[str, Codec]:
    return {"msgpack": MsgpackCodec(), "json": JsonCodec()}


class Side:
    """One side: its Session, every event it produced, and the messages its
    application has not yet taken (``pending``) or took (``taken``)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.events: list[Event] = []
        self.pending: list[MessageReceived] = []
        self.taken: list[Any] = []

    def collect(self) -> None:
        for ev in self.session.events_received():
            self.events.append(ev)
            if isinstance(ev, MessageReceived):
                self.pending.append(ev)

    def deliver(self, count: int | None = None) -> None:
        """The application takes the oldest ``count`` pending messages (all: None)."""
        count = len(self.pending) if count is None else count
        for ev in self.pending[:count]:
            self.taken.append(ev.obj)
            self.session.message_delivered(ev.seq, self.session.epoch)
        del self.pending[:count]


class DurablePair:
    def __init__(self, config: SessionConfig | None = None) -> None:
        self.config = config or SessionConfig()
        self.client = Side(Session(CLIENT, codecs(), self.config))
        self.server: Side | None = None
        self.handshake: ServerHandshake | None = None
        self.connected = False
        self.to_server = bytearray()
        self.to_client = bytearray()

    # ------------------------------------------------------------------ link

    def connect(self) -> None:
        self.client.session.connection_made(0.0)
        self.handshake = ServerHandshake(self.config, ("msgpack", "json"))
        self.connected = True

    def open(self) -> DurablePair:
        self.connect()
        self.pump()
        assert self.client.session.state.name == "OPEN", self.client.events
        return self

    def cut(self) -> None:
        """The link dies with whatever was in flight."""
        self.to_server.clear()
        self.to_client.clear()
        self.client.session.connection_lost(0.0)
        if self.server is not None:
            self.server.session.connection_lost(0.0)
        self.connected = False
        self.handshake = None

    def _feed_server(self, data: bytes) -> None:
        if self.handshake is not None:
            hs = self.handshake
            if hs.receive_data(data) is HandshakeOutcome.NEED_DATA:
                return
            self.handshake = None
            assert hs.hello is not None, hs.error
            resume = hs.hello.resume
            server = self.server
            if (
                server is not None
                and resume is not None
                and resume["id"] == server.session.session_id
                and resume["token"] == server.session.token
            ):
                server.session.resume(hs.hello, 0.0, hs.leftover)
            else:
                self.server = Side(Session(SERVER, codecs(), self.config))
                self.server.session.accept(
                    hs.hello, 0.0, hs.leftover, expired=resume["id"] if resume else None
                )
        elif self.server is not None:
            self.server.session.receive_data(data, 0.0)

    def _collect(self) -> None:
        out = self.client.session.data_to_send()
        if self.connected:
            self.to_server += out
        self.client.collect()
        if self.server is not None:
            out = self.server.session.data_to_send()
            if self.connected:
                self.to_client += out
            self.server.collect()

    def pump(self) -> None:
        """Exchange bytes until nothing is in flight."""
        for _ in range(1000):
            self._collect()
            if not self.connected or (not self.to_server and not self.to_client):
                return
            if self.to_server:
                data, self.to_server = bytes(self.to_server), bytearray()
                self._feed_server(data)
            if self.to_client:
                data, self.to_client = bytes(self.to_client), bytearray()
                self.client.session.receive_data(data, 0.0)
        raise AssertionError("the pair never went quiet")

    # ------------------------------------------------------------------ crashes

    def crash_server(self, snapshot: SessionSnapshot) -> Side:
        """The server process dies (link and memory) and comes back from ``snapshot``."""
        assert self.server is not None
        self.cut()
        restored = Session(SERVER, codecs(), self.config)
        restored.restore(snapshot)
        self.server = Side(restored)
        return self.server

    def crash_client(self, snapshot: SessionSnapshot) -> Side:
        """The client process dies and comes back from ``snapshot``."""
        self.cut()
        restored = Session(CLIENT, codecs(), self.config)
        restored.restore(snapshot)
        self.client = Side(restored)
        return self.client
