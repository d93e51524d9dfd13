"""Coverage-guided fuzzing of everything that parses a peer's bytes (atheris).

Not part of CI: run it for as long as you like, e.g. ten minutes on the session::

    pip install atheris
    python3 fuzz/korinet_fuzz.py session -max_total_time=600 -rss_limit_mb=1024 fuzz/corpus/session

Targets (first argument):

* ``wire``      the frame decoder, fed in random splits;
* ``handshake`` the server's handshake parser (preface, HELLO, legacy detection);
* ``session``   an open session, client or server side, fed frames and garbage;
* ``legacy``    the v2 (KoriNet 0.0.1) decoder.

Each target states the promise it checks: any byte sequence yields frames, events or
a typed :class:`~korinet.exceptions.KoriNetError`, never another exception, and the
buffered bytes stay under one maximum frame plus the last read. A broken promise is an
uncaught exception, which atheris reports with the input that caused it (saved as
``crash-*``). Other libFuzzer options (``-jobs``, ``-dict``...) pass through.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports(include=["korinet"]):
    from korinet.codecs.json import JsonCodec
    from korinet.codecs.msgpack import MsgpackCodec
    from korinet.exceptions import KoriNetError
    from korinet.session import (
        CLIENT,
        SERVER,
        LinkFailed,
        MessageReceived,
        MessagesAcked,
        PeerClosed,
        PongReceived,
        RealtimeReceived,
        Session,
        SessionConfig,
    )
    from korinet.session.handshake import HandshakeOutcome, ServerHandshake
    from korinet.wire.buffer import FrameDecoder
    from korinet.wire.frames import HEADER_SIZE
    from korinet.wire.legacy import V2Decoder

MAX_FRAME = 4096
CONFIG = SessionConfig(max_frame_size=MAX_FRAME)
CODECS = {"msgpack": MsgpackCodec(), "json": JsonCodec()}
ALLOWED_EVENTS = (MessageReceived, MessagesAcked, RealtimeReceived, PongReceived, PeerClosed, LinkFailed)


def chunks(fdp: atheris.FuzzedDataProvider) -> list[bytes]:
    """Split the rest of the input into reads of fuzzer-chosen sizes."""
    pieces = []
    while fdp.remaining_bytes():
        size = fdp.ConsumeIntInRange(1, 512)
        pieces.append(fdp.ConsumeBytes(size))
    return pieces


def fuzz_wire(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    decoder = FrameDecoder(MAX_FRAME)
    for piece in chunks(fdp):
        decoder.feed(piece)
        try:
            for _ in decoder.frames():
                pass
        except KoriNetError:
            return
        assert decoder.buffered <= MAX_FRAME + HEADER_SIZE + len(piece), decoder.buffered


def fuzz_handshake(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    handshake = ServerHandshake(CONFIG, tuple(CODECS), legacy=fdp.ConsumeBool())
    for piece in chunks(fdp):
        outcome = handshake.receive_data(piece)
        if outcome is HandshakeOutcome.REJECTED:
            assert handshake.error is not None and handshake.data_to_send()
            return
        if outcome is not HandshakeOutcome.NEED_DATA:
            return


def open_pair() -> tuple[Session, Session]:
    """A client and a server session that completed their handshake in memory."""
    client = Session(CLIENT, CODECS, CONFIG)
    client.connection_made(0.0)
    handshake = ServerHandshake(CONFIG, tuple(CODECS))
    assert handshake.receive_data(client.data_to_send()) is HandshakeOutcome.HELLO
    assert handshake.hello is not None
    server = Session(SERVER, CODECS, CONFIG)
    server.accept(handshake.hello, 0.0, handshake.leftover)
    client.receive_data(server.data_to_send(), 0.0)
    client.events_received()
    server.events_received()
    client.send_message("in flight")  # so that an ACK 1 from the fuzzer is legal
    server.receive_data(client.data_to_send(), 0.0)
    server.events_received()
    return client, server


def fuzz_session(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    client, server = open_pair()
    target = client if fdp.ConsumeBool() else server
    for piece in chunks(fdp):
        target.receive_data(piece, 1.0)  # must never raise
        events = target.events_received()
        for event in events:
            assert isinstance(event, ALLOWED_EVENTS), event
            if isinstance(event, MessageReceived):
                target.message_delivered(event.seq)
        target.data_to_send()
        decoder = target._decoder  # the bound is the point: no public accessor
        if decoder is not None:
            assert decoder.buffered <= MAX_FRAME + HEADER_SIZE + len(piece), decoder.buffered
        if any(isinstance(e, (LinkFailed, PeerClosed)) for e in events):
            assert target.close_expected()
            return


def fuzz_legacy(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    decoder = V2Decoder(MAX_FRAME)
    for piece in chunks(fdp):
        decoder.feed(piece)
        try:
            while decoder.next_entry() is not None:
                pass
        except KoriNetError:
            return


TARGETS: dict[str, Callable[[bytes], None]] = {
    "wire": fuzz_wire,
    "handshake": fuzz_handshake,
    "session": fuzz_session,
    "legacy": fuzz_legacy,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}}} [libFuzzer options] [corpus dir]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
