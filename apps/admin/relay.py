"""The relay: where agents that cannot be dialled (NAT, no inbound rule) park
connections, and where clients reach them (docs/ADMIN.md, "Agents that dial home").

The relay splices bytes and is never a party to a session. A client connects to the
relay and opens its usual TLS 1.3 session, naming the agent in the TLS server name
(SNI); the relay reads that name from the ClientHello, which is in clear anyway, and
splices the connection to one of the agent's parked connections. The TLS session,
the client's key, the agent's key, authorized_keys, roles, policy and audit are all
end to end between client and agent: the relay sees ciphertext only, and having no
key an agent authorizes, it can run nothing there.

What the relay does check is who may park under a name: an agent opens with
``MAGIC``, receives ``+`` and a nonce (or ``-`` and a reason, as ``busy``), and
answers with its name, its certificate and an ECDSA signature of the nonce and name
by its key. The key must be listed under that name in
the relay's agents file (authorized_keys format, ``FINGERPRINT NAME``), so a stranger
cannot claim a name and receive the clients meant for it.

Relay to a parked agent, one byte each: ``k`` keepalive, ``G`` a client is spliced
from the next byte on. An agent whose registration asks for it (``"address": true``)
is told the client's address instead: ``A``, one byte N (1 to ``MAX_ADDRESS``), N
ASCII bytes ``HOST:PORT`` (``[V6]:PORT``), and the client's bytes only after that,
so nothing the client sends can pass for the header. The agent cannot check it
(the relay is not authenticated to it) and audits it as reported by the relay. The
agent never sends on a parked connection, so the relay reads only to notice that it
closed.

A user's ``korinet-admin hosts`` asks which agents are parked: ``QUERY``, then a
length-prefixed JSON ``{"names": [...]}``; the answer is ``+`` and a length-prefixed
``{"agents": {NAME: {"parked": N, "seen": SECONDS_AGO or null}}}`` for the names
asked only. The relay has no users to authenticate (a client's key is end to end
with the agent), so it never lists names; whether a name is parked is what a
ClientHello naming it learns anyway.

Limits, so that a storm of agents coming back cannot shut clients out: agent
registrations and client hellos have separate budgets (per address and in total), a
registration over budget is told ``busy`` and retries after a jittered backoff, and
each name keeps at most ``parked_per_agent`` connections (the oldest go first: only
the rightful key can add new ones).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import os
import struct
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from korinet.security import AuthorizedKeys
from korinet.security.identity import key_fingerprint

from . import protocol as p

__all__ = [
    "ADDRESS",
    "DEFAULT_RELAY_PORT",
    "GO",
    "KEEPALIVE",
    "MAGIC",
    "MAX_ADDRESS",
    "NONCE_SIZE",
    "QUERY",
    "Relay",
    "RelayAnswer",
    "client_header",
    "parse_client_header",
    "parse_sni",
    "query_relay",
    "registration",
    "registration_message",
]

logger = logging.getLogger(__name__)

DEFAULT_RELAY_PORT: Final = p.DEFAULT_RELAY_PORT
MAGIC: Final = b"KORINET-RELAY/1\n"
#: A user's question (``korinet-admin hosts``): which of these names are parked?
QUERY: Final = b"KORINET-QUERY/1\n"
#: Longest question accepted (bytes of JSON), and names in it.
MAX_QUERY: Final = 256 * 1024
MAX_QUERY_NAMES: Final = 10000
NONCE_SIZE: Final = 32
GO: Final = b"G"
#: A client is spliced; its address (a header) comes first, then its bytes.
ADDRESS: Final = b"A"
#: Longest address header (``[v6]:port`` is at most 47 bytes).
MAX_ADDRESS: Final = 64
KEEPALIVE: Final = b"k"
#: What an agent signs: this, the nonce, its name (no other protocol signs this text).
_CONTEXT: Final = b"korinet-admin relay registration\x00"
#: Longest registration and longest ClientHello accepted (bytes).
MAX_REGISTRATION: Final = 8192
MAX_HELLO: Final = 65536
#: TLS fatal alert "unrecognized_name" (112): the agent is not parked here.
_UNRECOGNIZED_NAME: Final = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112])
_SPLICE_CHUNK: Final = 256 * 1024


def registration_message(nonce: bytes, name: str) -> bytes:
    return _CONTEXT + nonce + name.encode()


def registration(identity: object, nonce: bytes, name: str, *, address: bool = True) -> bytes:
    """The agent's answer to ``nonce``: a length-prefixed JSON object. ``address``:
    ask to be told each client's address (``ADDRESS``) rather than just ``GO``."""
    from cryptography.hazmat.primitives import serialization

    key: ec.EllipticCurvePrivateKey = identity.key  # type: ignore[attr-defined]
    cert: x509.Certificate = identity.certificate  # type: ignore[attr-defined]
    signature = key.sign(registration_message(nonce, name), ec.ECDSA(hashes.SHA256()))
    body = json.dumps(
        {
            "name": name,
            "cert": base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode(),
            "sig": base64.b64encode(signature).decode(),
            "address": address,
        }
    ).encode()
    return struct.pack("!I", len(body)) + body


def client_header(host: str, port: int) -> bytes:
    """What the relay sends a parked agent before the bytes of client ``host:port``."""
    text = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode("ascii")
    return ADDRESS + bytes([len(text)]) + text


def parse_client_header(text: bytes) -> tuple[str, int]:
    """The ``(host, port)`` of the N bytes after ``ADDRESS`` and N.

    Raises:
        ValueError: not ``IP:PORT`` / ``[IPV6]:PORT`` (the agent drops the link).
    """
    host, sep, port = text.decode("ascii").rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"not [V6]:PORT: {text!r}")
        address = ipaddress.ip_address(host[1:-1])
        if address.version != 6:
            raise ValueError(f"not [V6]:PORT: {text!r}")
    else:
        address = ipaddress.ip_address(host)
        if address.version != 4:
            raise ValueError(f"an IPv6 address without brackets: {text!r}")
    return str(address), int(port)


class _NeedMore(Exception):
    pass


def parse_sni(data: bytes) -> str | None:
    """The server name in the TLS ClientHello that ``data`` starts with (records
    concatenated); None if it names none.

    Raises:
        _NeedMore: ``data`` stops before the end of the ClientHello.
        ValueError: not a TLS ClientHello.
    """
    handshake = bytearray()
    pos = 0
    while True:  # gather the handshake message from as many records as it spans
        if len(data) < pos + 5:
            raise _NeedMore
        if data[pos] != 0x16:
            raise ValueError("not a TLS handshake record")
        (length,) = struct.unpack_from("!H", data, pos + 3)
        if len(data) < pos + 5 + length:
            raise _NeedMore
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 1:
                raise ValueError("not a ClientHello")
            need = 4 + int.from_bytes(handshake[1:4], "big")
            if need > MAX_HELLO:
                raise ValueError("ClientHello too long")
            if len(handshake) >= need:
                break
    hello = memoryview(handshake)[4:need]
    try:
        at = 2 + 32  # version, random
        at += 1 + hello[at]  # session id
        at += 2 + int.from_bytes(hello[at : at + 2], "big")  # cipher suites
        at += 1 + hello[at]  # compression methods
        if at >= len(hello):
            return None
        end = at + 2 + int.from_bytes(hello[at : at + 2], "big")
        at += 2
        while at + 4 <= end:
            kind = int.from_bytes(hello[at : at + 2], "big")
            size = int.from_bytes(hello[at + 2 : at + 4], "big")
            at += 4
            if kind == 0:  # server_name: list length, then (type, length, name)...
                entry = at + 2
                if hello[entry] == 0:
                    n = int.from_bytes(hello[entry + 1 : entry + 3], "big")
                    return bytes(hello[entry + 3 : entry + 3 + n]).decode("ascii")
                return None
            at += size
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed ClientHello: {exc}") from None
    return None


@dataclass(eq=False)
class _Parked:
    name: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    since: float = field(default_factory=time.monotonic)
    watch: asyncio.Task[None] | None = None
    #: the agent asked to be told each client's address
    address: bool = False


class Relay:
    """Listen on ``host:port``; park the agents listed in ``agents``; splice clients.

    Args:
        agents: which key may park under which name (``FINGERPRINT NAME`` lines).
        max_registering, max_registering_per_address: agent registrations in
            progress at once; over it an agent is told ``busy`` and retries later.
        max_hellos, max_hellos_per_address: client connections whose ClientHello is
            not read yet, and queries being answered (a separate budget: an agent
            storm does not use it up).
        parked_per_agent: parked connections kept per name (the oldest go first).
        timeout: seconds to finish a registration or send a ClientHello.
        keepalive: seconds between keepalive bytes to parked agents (NAT state).
    """

    def __init__(
        self,
        host: str,
        port: int,
        agents: AuthorizedKeys,
        *,
        max_registering: int = 256,
        max_registering_per_address: int = 64,
        max_hellos: int = 512,
        max_hellos_per_address: int = 64,
        parked_per_agent: int = 4,
        timeout: float = 10.0,
        keepalive: float = 25.0,
    ) -> None:
        self.host, self.requested_port = host, port
        self.authorized = agents
        self.max_registering = max_registering
        self.max_registering_per_address = max_registering_per_address
        self.max_hellos = max_hellos
        self.max_hellos_per_address = max_hellos_per_address
        self.parked_per_agent = parked_per_agent
        self.timeout = timeout
        self.keepalive = keepalive
        #: name -> parked connections, oldest first
        self.parked: dict[str, deque[_Parked]] = {}
        #: name -> monotonic time it was last known parked (registered, or a link of
        #: it closed or taken by a client)
        self.last_seen: dict[str, float] = {}
        #: registered, refused, busy, busy-client, spliced, unknown, bad-hello, queries
        self.stats: Counter[str] = Counter()
        self._registering: Counter[str] = Counter()
        self._hellos: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._keepalive_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def connected(self) -> list[str]:
        """The names with at least one parked connection."""
        return sorted(name for name, links in self.parked.items() if links)

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.requested_port, reuse_address=True, backlog=1024
        )
        self._keepalive_task = asyncio.get_running_loop().create_task(self._keepalives())
        logger.info("relay on %s:%d", self.host, self.port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        for links in self.parked.values():
            for link in links:
                self._drop(link)
        self.parked.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # ------------------------------------------------------------------ accept

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        port = int(peer[1]) if peer else 0
        keep = False
        try:
            async with asyncio.timeout(self.timeout):
                first = await reader.readexactly(1)
            if first == MAGIC[:1]:
                # MAGIC is read whole first even when busy: closing with unread bytes
                # would send a reset, which can destroy the answer before it is read.
                async with asyncio.timeout(self.timeout):
                    magic = first + await reader.readexactly(len(MAGIC) - 1)
                if magic == MAGIC:
                    keep = await self._register(address, reader, writer)
                elif magic == QUERY:
                    await self._query(address, reader, writer)
                else:
                    raise ValueError("not a relay registration or query")
            elif first == b"\x16":
                await self._client(address, port, first, reader, writer)
            else:
                self.stats["bad-hello"] += 1
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            logger.debug("relay: %s: %s", address, exc)
        finally:
            self._tasks.discard(task)
            if not keep:
                writer.close()

    async def _register(
        self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if (
            sum(self._registering.values()) >= self.max_registering
            or self._registering[address] >= self.max_registering_per_address
        ):
            self.stats["busy"] += 1
            await _answer(writer, "busy")
            return False
        self._registering[address] += 1
        try:
            async with asyncio.timeout(self.timeout):
                nonce = os.urandom(NONCE_SIZE)
                writer.write(b"+" + nonce)
                (size,) = struct.unpack("!I", await reader.readexactly(4))
                if size > MAX_REGISTRATION:
                    raise ValueError("registration too long")
                name, reason, wants_address = self._check(nonce, await reader.readexactly(size))
                if reason is not None:
                    self.stats["refused"] += 1
                    logger.warning("relay: %s: registration refused: %s", address, reason)
                    await _answer(writer, reason)
                    return False
                writer.write(b"+")
                await writer.drain()
        finally:
            self._registering[address] -= 1
            if not self._registering[address]:
                del self._registering[address]
        self.stats["registered"] += 1
        self.last_seen[name] = time.monotonic()
        link = _Parked(name, reader, writer, address=wants_address)
        links = self.parked.setdefault(name, deque())
        links.append(link)
        while len(links) > self.parked_per_agent:
            self._drop(links.popleft())
        link.watch = asyncio.get_running_loop().create_task(self._watch(link))
        return True

    def _check(self, nonce: bytes, body: bytes) -> tuple[str, str | None, bool]:
        """(name, None, whether it asks for clients' addresses) for a good
        registration, else (name, why it is refused, False)."""
        try:
            data = json.loads(body)
            name = str(data["name"])
            wants_address = data.get("address") is True
            cert = x509.load_der_x509_certificate(base64.b64decode(data["cert"]))
            signature = base64.b64decode(data["sig"])
            public = cert.public_key()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return "?", f"malformed registration ({exc})", False
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return name, "not an elliptic-curve key", False
        fingerprint = key_fingerprint(public)
        try:
            public.verify(signature, registration_message(nonce, name), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return name, f"bad signature by {fingerprint}", False
        try:
            entry = self.authorized.lookup(fingerprint)
        except ValueError as exc:  # the file does not parse: nobody parks (fail closed)
            return name, f"agents file unusable: {exc}", False
        if entry is None:
            return name, f"key {fingerprint} is not an authorized agent of this relay", False
        if entry.name != name:
            return name, f"key {fingerprint} may register as {entry.name!r}, not {name!r}", False
        return name, None, wants_address

    async def _watch(self, link: _Parked) -> None:
        """Notice a parked connection that closed (an agent never sends on it)."""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await link.reader.read(1)
        self.last_seen[link.name] = time.monotonic()
        links = self.parked.get(link.name)
        if links is not None and link in links:
            links.remove(link)
        link.writer.close()

    def _drop(self, link: _Parked) -> None:
        if link.watch is not None:
            link.watch.cancel()
        link.writer.close()

    async def _keepalives(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive)
            for links in list(self.parked.values()):
                for link in list(links):
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        link.writer.write(KEEPALIVE)

    # ------------------------------------------------------------------ queries

    async def _query(self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer which of the names asked are parked, and when each was last seen.

        No authentication: the relay has no users (a client's key is end to end with
        the agent). So only the names asked are answered, never a list; whether a
        name is parked is what a ClientHello naming it learns anyway.
        """
        if (
            self._hellos[address] >= self.max_hellos_per_address
            or sum(self._hellos.values()) >= self.max_hellos
        ):
            self.stats["busy-client"] += 1
            await _answer(writer, "busy")
            return
        self._hellos[address] += 1
        try:
            async with asyncio.timeout(self.timeout):
                (size,) = struct.unpack("!I", await reader.readexactly(4))
                if size > MAX_QUERY:
                    raise ValueError("query too long")
                names = json.loads(await reader.readexactly(size))["names"]
                if not isinstance(names, list) or len(names) > MAX_QUERY_NAMES:
                    raise ValueError("not a list of names, or too many")
                now = time.monotonic()
                agents = {}
                for name in names:
                    if not isinstance(name, str):
                        raise ValueError("a name that is not a string")
                    links = [link for link in self.parked.get(name, ()) if not link.writer.is_closing()]
                    last = self.last_seen.get(name)
                    ago = 0.0 if links else None if last is None else now - last
                    agents[name] = {"parked": len(links), "seen": ago}
                body = json.dumps({"agents": agents}).encode()
                writer.write(b"+" + struct.pack("!I", len(body)) + body)
                await writer.drain()
                self.stats["queries"] += 1
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed query: {exc}") from None
        finally:
            self._hellos[address] -= 1
            if not self._hellos[address]:
                del self._hellos[address]

    # ------------------------------------------------------------------ clients

    async def _client(
        self,
        address: str,
        port: int,
        first: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        busy = self._hellos[address] >= self.max_hellos_per_address
        if busy or sum(self._hellos.values()) >= self.max_hellos:
            self.stats["busy-client"] += 1
            return
        self._hellos[address] += 1
        try:
            hello = bytearray(first)
            async with asyncio.timeout(self.timeout):
                while True:
                    try:
                        name = parse_sni(bytes(hello))
                        break
                    except _NeedMore:
                        chunk = await reader.read(4096)
                        if not chunk or len(hello) > MAX_HELLO:
                            raise ValueError("connection closed in the ClientHello") from None
                        hello += chunk
        finally:
            self._hellos[address] -= 1
            if not self._hellos[address]:
                del self._hellos[address]
        link = self._take(name) if name else None
        if link is None:
            self.stats["unknown"] += 1
            logger.info("relay: %s asked for %r: not connected here", address, name)
            writer.write(_UNRECOGNIZED_NAME)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            return
        self.stats["spliced"] += 1
        try:
            # The header goes first, in the same write: the client's bytes follow it.
            head = client_header(address, port) if link.address else GO
            link.writer.write(head + bytes(hello))
            await asyncio.gather(_pump(reader, link.writer), _pump(link.reader, writer))
        finally:
            link.writer.close()

    def _take(self, name: str) -> _Parked | None:
        """The newest parked connection of ``name`` (the likeliest to be alive)."""
        links = self.parked.get(name)
        if links:
            self.last_seen[name] = time.monotonic()
        while links:
            link = links.pop()
            if link.watch is not None:
                link.watch.cancel()
            if not link.writer.is_closing():
                return link
        return None


@dataclass(frozen=True)
class RelayAnswer:
    """What a relay says of one agent name: its parked connections, and how many
    seconds ago it was last parked there (0 if now, None if not since the relay started)."""

    parked: int
    seen: float | None


async def query_relay(host: str, port: int, names: list[str], timeout: float) -> dict[str, RelayAnswer]:
    """Ask the relay at ``host:port`` about ``names`` (``korinet-admin hosts``).

    Raises:
        OSError, TimeoutError: the relay cannot be reached or does not answer in time.
        ValueError: it answered something else than a relay's answer (or ``busy``).
    """
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            body = json.dumps({"names": names}).encode()
            writer.write(QUERY + struct.pack("!I", len(body)) + body)
            await writer.drain()
            try:
                if await reader.readexactly(1) != b"+":
                    (size,) = struct.unpack("!H", await reader.readexactly(2))
                    raise ValueError((await reader.readexactly(size)).decode(errors="replace"))
                (size,) = struct.unpack("!I", await reader.readexactly(4))
                agents = json.loads(await reader.readexactly(size))["agents"]
            except asyncio.IncompleteReadError:
                raise ValueError(
                    "the relay closed the connection without an answer (an older relay?)"
                ) from None
            except (KeyError, TypeError) as exc:
                raise ValueError(f"not a relay's answer: {exc}") from None
        finally:
            writer.close()
    answers: dict[str, RelayAnswer] = {}
    for name in names:
        entry = agents.get(name) if isinstance(agents, dict) else None
        if not isinstance(entry, dict):
            raise ValueError(f"the relay did not answer for {name!r}")
        seen = entry.get("seen")
        answers[name] = RelayAnswer(int(entry.get("parked", 0)), None if seen is None else float(seen))
    return answers


async def _answer(writer: asyncio.StreamWriter, reason: str) -> None:
    data = reason.encode()[:1000]
    writer.write(b"-" + struct.pack("!H", len(data)) + data)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close; a reset ends both directions."""
    try:
        while data := await reader.read(_SPLICE_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):  # reset, or the other side already gone
        writer.close()
