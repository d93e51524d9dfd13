"""The agent's side of dial-home (``korinet-admin agent --connect RELAY``): keep a
few connections parked at a relay (relay.py) and hand each one a client is spliced
to to the agent's own Hub, which runs the usual TLS handshake and authentication on
it as on an accepted connection.

After a loss (a relay restart, say) each link waits a random time before it dials
again, drawn from [0, ceiling) with the ceiling doubling up to ``backoff_cap`` (full
jitter): a thousand agents cut at once come back spread over the ceiling, not at
the same instant. A link that registered restarts its ceiling.

The relay tells each link the address of the client it splices to it (relay.py,
``ADDRESS``) before the client's first byte: the Hub counts the connection under
that address (``Hub.adopt(address=)``) and the agent's audit records it as reported
by the relay, beside the relay's own address. A header that does not parse drops
the link (the client with it), which parks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
from typing import Any, Final

from .plugin import agent_of
from .relay import ADDRESS, GO, KEEPALIVE, MAGIC, MAX_ADDRESS, NONCE_SIZE, parse_client_header, registration

__all__ = ["DialHome", "RegistrationRefused"]

logger = logging.getLogger(__name__)

#: Links parked at once per relay: one takes a client while the next is parking.
LINKS: Final = 2


class RegistrationRefused(Exception):
    """The relay refused our registration (with its reason)."""


class DialHome:
    """Links from an agent (its ``hub``, TLS context ``ssl``, ``identity``) to relays.

    Args:
        relays: ``(host, port)`` of each relay.
        name: the name clients use to reach this agent (listed with our key in each
            relay's agents file).
        initial, backoff_cap: the first and the largest jitter ceiling (seconds).
        keepalive_timeout: a parked link with no byte from the relay for this long is
            taken for dead and dialled again (the relay sends one every 25 s).
    """

    def __init__(
        self,
        hub: Any,
        ssl: Any,
        identity: Any,
        relays: list[tuple[str, int]],
        name: str,
        *,
        links: int = LINKS,
        initial: float = 1.0,
        backoff_cap: float = 30.0,
        keepalive_timeout: float = 80.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.hub, self.ssl, self.identity = hub, ssl, identity
        self.relays = relays
        self.name = name
        self.links = links
        self.initial = initial
        self.backoff_cap = backoff_cap
        self.keepalive_timeout = keepalive_timeout
        self.connect_timeout = connect_timeout
        #: links parked right now, per relay
        self.parked: dict[tuple[str, int], int] = dict.fromkeys(relays, 0)
        #: clients handed to the hub
        self.spliced = 0
        #: set while at least one link is parked
        self.registered = asyncio.Event()
        self.last_error: dict[tuple[str, int], str] = {}
        #: ``HOST:PORT`` a relay reported -> the relay's address, for the relayed
        #: connections in their handshake: the agent's (``Agent.relayed``), whose audit
        #: of a refusal reads it (the runtime's hook names only the reported address)
        self.reported: dict[str, str] = getattr(agent_of(hub), "relayed", {})
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rng = random.Random()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for relay in self.relays:
            for _ in range(self.links):
                self._spawn(loop.create_task(self._link(relay)))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _link(self, relay: tuple[str, int]) -> None:
        ceiling = self.initial
        first = True
        while True:
            if not first:  # the very first dial is at once; every retry is jittered
                await asyncio.sleep(self._rng.uniform(0, ceiling))
                ceiling = min(self.backoff_cap, ceiling * 2)
            first = False
            try:
                sock = await self._park(relay)
            except RegistrationRefused as exc:
                self._error(relay, f"registration refused: {exc}", busy=str(exc) == "busy")
                continue
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self._error(relay, f"cannot reach the relay: {exc or type(exc).__name__}")
                continue
            ceiling = self.initial
            self.last_error.pop(relay, None)
            try:
                spliced, client = await self._wait_for_client(relay, sock)
            except BaseException:  # close(): the relay must see the link go now
                sock.close()
                raise
            if spliced:
                self._spawn(asyncio.get_running_loop().create_task(self._adopt(sock, client)))
                first = True  # park the next one at once
            else:
                sock.close()

    def _error(self, relay: tuple[str, int], text: str, *, busy: bool = False) -> None:
        if self.last_error.get(relay) != text:  # once per change, not once per retry
            (logger.info if busy else logger.warning)("%s:%d: %s", *relay, text)
        self.last_error[relay] = text

    async def _park(self, relay: tuple[str, int]) -> socket.socket:
        """Dial ``relay`` and register; the registered socket."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(*relay, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.sock_connect(sock, address)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                await loop.sock_sendall(sock, MAGIC)
                await _accepted(sock)
                nonce = await _recv_exactly(sock, NONCE_SIZE)
                await loop.sock_sendall(sock, registration(self.identity, nonce, self.name))
                await _accepted(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _wait_for_client(
        self, relay: tuple[str, int], sock: socket.socket
    ) -> tuple[bool, tuple[str, int] | None]:
        """Park until the relay splices a client: (True, its address as the relay
        reports it, or None after a bare GO); (False, None) if the link dies or the
        header is bad. Read exactly: what follows is the client's, for the Hub."""
        loop = asyncio.get_running_loop()
        self.parked[relay] += 1
        self.registered.set()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.keepalive_timeout):
                        byte = await loop.sock_recv(sock, 1)
                except (OSError, TimeoutError) as exc:
                    self._error(relay, f"parked link lost: {exc or type(exc).__name__}")
                    return False, None
                if byte == GO:
                    self.spliced += 1
                    return True, None
                if byte == ADDRESS:
                    try:
                        client = await self._client_header(sock)
                    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                        self._error(relay, f"bad client header from the relay: {exc or type(exc).__name__}")
                        return False, None
                    self.spliced += 1
                    return True, client
                if byte != KEEPALIVE:
                    self._error(relay, "the relay closed the link" if not byte else "garbage from the relay")
                    return False, None
        finally:
            self.parked[relay] -= 1
            if not any(self.parked.values()):
                self.registered.clear()

    async def _client_header(self, sock: socket.socket) -> tuple[str, int]:
        """The rest of an ``ADDRESS`` header: one byte N, then N bytes ``HOST:PORT``
        (sent with ``ADDRESS`` in one write, so it has no reason to be slow)."""
        async with asyncio.timeout(self.connect_timeout):
            (size,) = await _recv_exactly(sock, 1)
            if not 0 < size <= MAX_ADDRESS:
                raise ValueError(f"an address of {size} bytes")
            return parse_client_header(await _recv_exactly(sock, size))

    async def _adopt(self, sock: socket.socket, client: tuple[str, int] | None) -> None:
        started = time.monotonic()
        reported = _peername(client) if client is not None else None
        if reported is not None:
            try:
                self.reported[reported] = _peername(sock.getpeername())
            except OSError:  # reset already: the handshake fails below
                reported = None
        try:
            await self.hub.adopt(sock, self.ssl, address=client)
        except Exception as exc:  # a client that failed its handshake: the Hub logged it
            logger.debug("relayed client dropped after %.1fs: %s", time.monotonic() - started, exc)
            with contextlib.suppress(OSError):
                sock.close()
        finally:
            if reported is not None:
                self.reported.pop(reported, None)


async def _accepted(sock: socket.socket) -> None:
    """Read the relay's ``+``, or raise the reason that follows its ``-``."""
    if await _recv_exactly(sock, 1) != b"+":
        (size,) = struct.unpack("!H", await _recv_exactly(sock, 2))
        raise RegistrationRefused((await _recv_exactly(sock, size)).decode(errors="replace"))


def _peername(address: tuple[str, int]) -> str:
    """As the runtime writes a peer (``Connection.peername``)."""
    return f"{address[0]}:{address[1]}"


async def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise asyncio.IncompleteReadError(data, size)
        data += chunk
    return data
