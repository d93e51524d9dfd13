"""A loopback TCP relay for fault injection: it forwards bytes between a client and
a server and can cut every connection at once, after N more bytes (so mid-frame),
stop forwarding without closing (a black hole, as a half-open link: what it reads is
lost), stall (stop reading, so the bytes wait in the kernel's buffers and arrive in a
burst on resume, as on a frozen link that TCP then recovers), or delay
every chunk by a random time in a range, keeping each direction in order."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Coroutine
from typing import Any, Literal


class Relay:
    def __init__(
        self, target_host: str, target_port: int, *, delay: tuple[float, float] | None = None, seed: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self.delay = delay
        self._rng = random.Random(seed)
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.cuts = 0
        self.connections = 0
        self.black_hole = False
        self.refuse = False  # accept and reset at once: the server looks down
        self._budget: int | None = None
        self._flowing = asyncio.Event()  # cleared by stall(): the pumps stop reading
        self._flowing.set()
        self._server: asyncio.base_events.Server | None = None
        # Events for tests that cut on progress rather than on the clock.
        self._linked = asyncio.Event()  # at least one relayed connection is open
        self._cut = asyncio.Event()  # set by every counted cut

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        self.resume()  # a stalled pump would otherwise wait forever
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Reset every relayed connection now."""
        self._budget = None
        if self.pairs:
            self.cuts += 1
            self._cut.set()
        for a, b in list(self.pairs):
            for w in (a, b):
                w.transport.abort()
        self.pairs.clear()
        self._linked.clear()

    async def wait_linked(self) -> None:
        """Return once a relayed connection is open (so that ``cut()`` will count)."""
        await self._linked.wait()

    def wait_cut(self) -> Coroutine[Any, Any, Literal[True]]:
        """Await the next counted cut from this call on (e.g. when a ``cut_after``
        budget runs out). Cleared now, not when first awaited: a pump that runs before
        the waiting task could spend the budget and cut, and the cut would be missed."""
        self._cut.clear()
        return self._cut.wait()

    async def cut_within(self, nbytes: int, finished: asyncio.Event) -> None:
        """Cut after ``nbytes`` more bytes and wait for it; if ``finished`` is set first
        (the traffic ended inside the budget), cut cleanly instead, once linked. Either
        way exactly one counted cut (judged on the counter, not on which wait woke first:
        both can be ready in the same loop turn)."""
        before = self.cuts
        cut = asyncio.ensure_future(self.wait_cut())
        self.cut_after(nbytes)
        ended = asyncio.ensure_future(finished.wait())
        await asyncio.wait({cut, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        cut.cancel()
        if self.cuts == before:
            await self.wait_linked()
            if self.cuts == before:
                self.cut()

    def stall(self) -> None:
        """Stop reading from either side, connections left open (until :meth:`resume`)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut_after(self, nbytes: int) -> None:
        """Forward ``nbytes`` more bytes (either direction), then cut: usually mid-frame."""
        self._budget = nbytes

    def _drop(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self.pairs.discard(pair)
        if not self.pairs:
            self._linked.clear()
        for w in pair:
            w.transport.abort()

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        if self.refuse:
            cwriter.transport.abort()
            return
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.transport.abort()
            return
        self.connections += 1
        pair = (cwriter, swriter)
        self.pairs.add(pair)
        self._linked.set()
        with contextlib.suppress(asyncio.CancelledError):  # the test's loop is closing
            await asyncio.gather(self._pump(creader, swriter, pair), self._pump(sreader, cwriter, pair))
        if pair in self.pairs:
            self._drop(pair)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: tuple) -> None:
        if self.delay is not None:
            await self._delayed_pump(reader, writer, pair)
            return
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ConnectionError):
            while pair in self.pairs:
                await self._flowing.wait()
                data = await reader.read(65536)
                if not data:
                    break
                if self.black_hole:
                    continue  # swallowed: the peers see silence, not a close
                if pair not in self.pairs:
                    break  # read before a cut landed: this link is gone, its bytes with it
                if self._budget is not None:
                    if len(data) >= self._budget:
                        writer.write(data[: self._budget])
                        self.cut()
                        return
                    self._budget -= len(data)
                writer.write(data)
        if pair in self.pairs:
            self._drop(pair)

    async def _delayed_pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: tuple
    ) -> None:
        """Each chunk leaves at arrival + a random delay, never before the previous one;
        an EOF is passed on (half-close) once everything before it has left."""
        assert self.delay is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - loop.time()))
                if pair not in self.pairs:
                    return  # cut meanwhile
                writer.write(data)
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()

        sender = asyncio.create_task(deliver())
        last_due = 0.0
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ConnectionError):
                while pair in self.pairs:
                    data = await reader.read(65536)
                    if not data:
                        break
                    last_due = max(last_due, loop.time() + self._rng.uniform(*self.delay))
                    queue.put_nowait((last_due, data))
            queue.put_nowait(None)
            await sender
        finally:
            sender.cancel()
