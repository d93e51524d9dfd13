"""Serving a peer that speaks the original KoriNet v2 wire (docs/PROTOCOL.md §9).

The original is stop-and-wait: after each data frame the sender reads exactly one
frame and requires it to be ``{"statusP": True}``. So we acknowledge a frame only
when the application takes it (our promise), and a frame that arrives while one of
our sends waits is that send's acknowledgement. There is no session to resume: a v2
client that reconnects is a new peer, exactly as the original server saw it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from ..exceptions import (
    ConnectionClosedError,
    ConnectionClosedOK,
    KoriNetError,
    KoriNetTimeout,
    RemoteProtocolError,
)
from ..messages import Message
from ..session import CloseCode
from ..wire.legacy import LEGACY_IDLE_TIMEOUT, V2Decoder, encode_v2, encode_v2_ack
from .connection import Connection

__all__ = ["LegacyPeer"]

logger = logging.getLogger(__name__)


class LegacyPeer:
    """The Peer API (send/recv/close) over a v2 connection."""

    session_id = None
    identity = None

    def __init__(self, conn: Connection, accept_plain: bool = True) -> None:
        self.loop = asyncio.get_running_loop()
        self.conn = conn
        self.peername = conn.peername
        self.accept_plain = accept_plain
        self._decoder = V2Decoder()
        self._inbox: deque[Message] = deque()
        self._acks: deque[asyncio.Future[None]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[KoriNetError] = self.loop.create_future()
        conn.on_data = self.receive_data
        conn.lost.add_done_callback(self._lost)
        self._touch()

    def __repr__(self) -> str:
        return f"<LegacyPeer {self.peername}>"

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    @property
    def is_connected(self) -> bool:
        return not self.is_closed

    def _touch(self) -> None:
        self.conn.schedule(self.loop.time() + LEGACY_IDLE_TIMEOUT, self._idle)

    def _idle(self) -> None:
        logger.info("%r: silent for %.0fs, closing", self, LEGACY_IDLE_TIMEOUT)
        self.conn.abort()

    def receive_data(self, data: bytes) -> None:
        self._touch()
        self._decoder.feed(data)
        try:
            while (entry := self._decoder.next_entry()) is not None:
                obj, msg_id = entry
                if self._acks:
                    # stop-and-wait: the next frame answers our oldest send
                    fut = self._acks.popleft()
                    if not fut.done():
                        if isinstance(obj, dict) and obj.get("statusP") is True:
                            fut.set_result(None)
                        else:
                            fut.set_exception(
                                RemoteProtocolError(f"expected a v2 acknowledgement, got {obj!r}")
                            )
                    continue
                self._inbox.append(Message("", obj, 0, 0, self, id=str(msg_id)))
                if self._waiter is not None and not self._waiter.done():
                    self._waiter.set_result(None)
        except RemoteProtocolError as exc:
            logger.warning("%r: %s", self, exc)
            self._finish(exc)
            self.conn.abort()

    def _lost(self, fut: asyncio.Future[BaseException | None]) -> None:
        self._finish(ConnectionClosedError(CloseCode.LINK_LOST, "connection lost"))

    def _finish(self, error: KoriNetError) -> None:
        if self.closed.done():
            return
        self.closed.set_result(error)
        for fut in self._acks:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv_message(self, timeout: float | None = None) -> Message:
        """Take the next message and acknowledge it (statusP), as v2 expects."""
        while not self._inbox:
            if self.closed.done():
                raise self.closed.result()
            self._waiter = self.loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                raise KoriNetTimeout("timed out waiting for a message") from None
        msg = self._inbox.popleft()
        self.conn.write(encode_v2_ack())
        return msg

    async def recv(self, timeout: float | None = None) -> Any:
        return (await self.recv_message(timeout)).data

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosedError:
                return

    async def send(self, obj: Any, type: str = "", *, timeout: float | None = None) -> None:
        if type:
            raise KoriNetError("a legacy v2 peer cannot receive typed messages")
        if self.closed.done():
            raise self.closed.result()
        fut: asyncio.Future[None] = self.loop.create_future()
        self._acks.append(fut)
        self.conn.write(encode_v2(obj))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(fut)
        except TimeoutError:
            raise KoriNetTimeout("timed out waiting for the v2 acknowledgement") from None

    async def close(self, reason: str = "", *, timeout: float = 5.0) -> None:
        self.conn.close()
        self._finish(ConnectionClosedOK(CloseCode.NORMAL, reason or "closed"))
