"""A client Session and a server Session joined by an in-memory link (as h11's
ConnectionPair): no sockets, no sleeping, an explicit fake clock.

The pair plays the part of both runtimes: the client side calls
``connection_made``; the server side reads the first bytes with a
``ServerHandshake`` and then calls ``Session.accept`` (new session, optionally
``expired=``) or ``Session.resume`` (known id and token). Bytes in flight can be
cut at any offset, which drops the link on both sides like a lost TCP connection.

Named ``session_helpers`` rather than ``helpers`` because the test directories
have no ``__init__.py``: two ``helpers`` modules in sibling directories would
shadow each other in ``sys.modules``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from korinet.codecs import JsonCodec, MsgpackCodec
from korinet.codecs.base import Codec
from korinet.session import (
    CLIENT,
    SERVER,
    Event,
    HandshakeOutcome,
    Hello,
    LinkFailed,
    MessageReceived,
    PeerClosed,
    ServerHandshake,
    Session,
    SessionConfig,
)
from korinet.session.handshake import decode_close
from korinet.wire.buffer import FrameDecoder
from korinet.wire.frames import PREFACE, Frame, FrameType

__all__ = [
    "CODECS",
    "App",
    "SessionPair",
    "close_code",
    "frames_in",
    "of_type",
    "split_frames",
]


def codecs() -> dict[str, Codec]:
    return {"msgpack": MsgpackCodec(), "json": JsonCodec()}


CODECS: Mapping[str, Codec] = codecs()


def split_frames(data: bytes, max_size: int = 1 << 30) -> list[Frame]:
    """Parse a byte string that must be whole frames (an optional preface first)."""
    if data.startswith(PREFACE):
        data = data[len(PREFACE) :]
    decoder = FrameDecoder(max_size)
    decoder.feed(data)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    assert decoder.buffered == 0, f"{decoder.buffered} trailing bytes are not a whole frame"
    return frames


def frames_in(data: bytes) -> list[FrameType]:
    return [f.type for f in split_frames(data)]


def close_code(data: bytes) -> int:
    """The code of the CLOSE frame that ``data`` ends with."""
    frames = split_frames(data)
    assert frames, "no frame at all"
    assert frames[-1].type is FrameType.CLOSE, f"last frame is {frames[-1].type.name}, not CLOSE"
    return decode_close(frames[-1].body)[0]


def of_type(events: list[Event], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


class App:
    """One side's application: it takes MessageReceived events and reports
    deliveries back when the test decides."""

    def __init__(self) -> None:
        self.inbox: list[Any] = []  # objects in the order the session gave them
        self.seqs: list[int] = []
        self.pending: list[tuple[int, int]] = []  # (seq, epoch) not yet delivered

    def take(self, events: list[Event], epoch: int) -> None:
        for e in events:
            if isinstance(e, MessageReceived):
                self.inbox.append(e.obj)
                self.seqs.append(e.seq)
                self.pending.append((e.seq, epoch))


class SessionPair:
    """A client and a server Session over an in-memory link.

    ``client_events`` and ``server_events`` accumulate every event, in order
    (``server_events`` spans every server Session the pair created).
    """

    def __init__(
        self,
        client_config: SessionConfig | None = None,
        server_config: SessionConfig | None = None,
        *,
        client_codecs: Mapping[str, Codec] | None = None,
        server_codecs: Mapping[str, Codec] | None = None,
    ) -> None:
        self.now = 0.0
        self.client = Session(CLIENT, client_codecs if client_codecs is not None else codecs(), client_config)
        self.server_config = server_config or SessionConfig()
        self.server_codecs: Mapping[str, Codec] = server_codecs if server_codecs is not None else codecs()
        self.server: Session | None = None
        self.servers: list[Session] = []
        self.handshake: ServerHandshake | None = None
        self.rejected: ServerHandshake | None = None
        self.connected = False
        #: make the server forget its session before the next HELLO (restart / TTL)
        self.forget_server = False
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        self.client_app = App()
        self.server_app = App()
        #: every byte each side wrote, per link (for replaying captured frames)
        self.wire_log: list[tuple[str, bytes]] = []
        #: what pump() carried so far (frames_moved counts writes; one frame each with frames=True)
        self.bytes_moved = 0
        self.frames_moved = 0

    # ------------------------------------------------------------------ link

    def connect(self) -> None:
        assert not self.connected
        self.client.connection_made(self.now)
        self.handshake = ServerHandshake(self.server_config, tuple(self.server_codecs))
        self.rejected = None
        self.connected = True
        self.collect()

    def cut(self) -> None:
        """The TCP connection dies: bytes in flight are lost, both sides learn it."""
        self.to_server.clear()
        self.to_client.clear()
        self.client.connection_lost(self.now)
        if self.server is not None:
            self.server.connection_lost(self.now)
        self.handshake = None
        self.connected = False
        self.collect()

    def open(self) -> SessionPair:
        """Connect and finish the handshake; returns self for chaining."""
        self.connect()
        self.pump()
        assert self.server is not None and self.client.state.name == "OPEN", self.client_events
        return self

    def _server_takes(self, hello: Hello, leftover: bytes) -> None:
        resume = hello.resume
        server = self.server
        if (
            server is not None
            and not self.forget_server
            and resume is not None
            and resume["id"] == server.session_id
            and resume["token"] == server.token
        ):
            server.resume(hello, self.now, leftover)
            return
        self.forget_server = False
        new = Session(SERVER, self.server_codecs, self.server_config)
        self.server = new
        self.servers.append(new)
        new.accept(hello, self.now, leftover, expired=resume["id"] if resume else None)

    def _feed_server(self, chunk: bytes) -> None:
        if self.handshake is not None:
            hs = self.handshake
            outcome = hs.receive_data(chunk)
            if outcome is HandshakeOutcome.NEED_DATA:
                return
            self.handshake = None
            if outcome is HandshakeOutcome.HELLO:
                assert hs.hello is not None
                self._server_takes(hs.hello, hs.leftover)
            elif outcome is HandshakeOutcome.REJECTED:
                self.rejected = hs
                self.to_client += hs.data_to_send()
            else:
                raise AssertionError(f"unexpected handshake outcome {outcome}")
        elif self.rejected is None and self.server is not None:
            self.server.receive_data(chunk, self.now)

    def collect(self) -> None:
        """Move what both sides want to write onto the link, and their events to the logs."""
        out = self.client.data_to_send()
        if self.connected:
            self.to_server += out
            if out:
                self.wire_log.append(("c2s", out))
        events = self.client.events_received()
        self.client_events += events
        self.client_app.take(events, self.client.epoch)
        if self.server is not None:
            out = self.server.data_to_send()
            if self.connected:
                self.to_client += out
                if out:
                    self.wire_log.append(("s2c", out))
            events = self.server.events_received()
            self.server_events += events
            self.server_app.take(events, self.server.epoch)

    def _link_should_drop(self) -> bool:
        server_done = self.server is not None and self.handshake is None and self.server.close_expected()
        return self.client.close_expected() or server_done or self.rejected is not None

    def pump(self, budget: int | None = None, chunk: int | None = None, *, frames: bool = False) -> bool:
        """Exchange bytes until nothing is in flight.

        ``chunk`` limits each write to that many bytes; ``frames=True`` makes each
        write one whole frame (or the preface) instead. ``budget`` limits what this
        call carries, both ways together, in bytes (or in frames with ``frames``):
        when it runs out the link is cut, possibly mid-frame. A side that expects
        the link closed gets it closed once its bytes are out.
        Returns True if the link was cut.
        """
        self.collect()
        while self.connected:
            if not self.to_server and not self.to_client:
                if self._link_should_drop():
                    self.cut()
                    return True
                return False
            for buf, feed in (
                (self.to_server, self._feed_server),
                (self.to_client, lambda data: self.client.receive_data(data, self.now)),
            ):
                if not buf:
                    continue
                if frames:
                    n = len(PREFACE) if buf.startswith(PREFACE) else 4 + int.from_bytes(buf[:4], "big")
                else:
                    n = len(buf) if chunk is None else min(chunk, len(buf))
                if budget is not None:
                    if budget <= 0:
                        self.cut()
                        return True
                    if not frames:
                        n = min(n, budget)
                    budget -= 1 if frames else n
                data = bytes(buf[:n])
                del buf[:n]
                self.bytes_moved += len(data)
                self.frames_moved += 1
                feed(data)
                self.collect()
                if not self.connected:
                    return True
        return False

    # ------------------------------------------------------------------ app

    def deliver_all(self) -> None:
        """Both applications report every message they hold as delivered."""
        for app, session in ((self.client_app, self.client), (self.server_app, self.server)):
            assert session is not None
            for seq, epoch in app.pending:
                session.message_delivered(seq, epoch)
            app.pending.clear()
        self.collect()

    def settle(self) -> None:
        """Reconnect if needed and run to quiescence with everything delivered."""
        for _ in range(10):
            if not self.connected:
                self.connect()
            self.pump()
            self.deliver_all()
            self.pump()
            if self.connected and not self.to_client and not self.to_server:
                return
        raise AssertionError("the pair did not settle")

    def failures(self) -> list[Event]:
        return of_type(self.client_events + self.server_events, (LinkFailed, PeerClosed))
