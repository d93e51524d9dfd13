"""Helpers of the security tests: a recording TCP tap, a raw HELLO sender."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from korinet.session.handshake import decode_close, encode_control
from korinet.wire.buffer import FrameDecoder
from korinet.wire.frames import PREFACE, FrameType


async def echo(peer: Any) -> None:
    """Send every message back without waiting for its acknowledgement (so a client
    that sends many before reading does not block the echo)."""
    async for data in peer:
        peer.send_nowait(data)


class Tap:
    """Forwards one TCP connection at a time to a target and records every byte,
    as an eavesdropper on the LAN would see them."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.captured = bytearray()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> Tap:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await reader.read(65536):
                    self.captured += data
                    writer.write(data)
            writer.close()

        await asyncio.gather(pump(creader, swriter), pump(sreader, cwriter))


def hello(resume: dict[str, Any] | None = None) -> bytes:
    fields = {
        "versions": [3],
        "codecs": ["msgpack"],
        "heartbeat": 5.0,
        "window": 64,
        "window_bytes": 1 << 20,
        "max_frame": 1 << 20,
        "resume": resume,
        "agent": "attacker",
    }
    return PREFACE + encode_control(FrameType.HELLO, fields)


async def raw_hello(
    port: int, context: ssl.SSLContext, resume: dict[str, Any] | None
) -> list[tuple[int, bytes]]:
    """Send one HELLO over TLS by hand; return the frames the server answered with
    until it closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    writer.write(hello(resume))
    data = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    decoder = FrameDecoder(1 << 20)
    decoder.feed(data)
    return list(decoder.frames())


def close_code(frames: list[tuple[int, bytes]]) -> tuple[int, str]:
    assert frames, "the server answered nothing"
    ftype, body = frames[-1]
    assert ftype == FrameType.CLOSE, f"expected a CLOSE, got frame type {ftype}"
    code, reason, _ = decode_close(body)
    return code, reason
