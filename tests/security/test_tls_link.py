"""TLS run by the runtime's own Connection (runtime/tlslink.py): records split anyhow,
cut mid-record, refused versions and garbage answered with an alert, memory per
idle session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from testutil import TIMEOUT_FACTOR, eventually
from testutil.relay import Relay
from tls_helpers import echo

from korinet import Client, Server, hookimpl
from korinet.plugins import PluginManager
from korinet.runtime.connection import READ_SIZE, Connection
from korinet.runtime.tlslink import TLS
from korinet.security import AuthorizedKeys, ClientTLS, Identity, ServerTLS, client_context, server_context

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)


class Wire(asyncio.Transport):
    """The socket transport under a Connection, in memory: what is written is kept
    for the test to hand over, in pieces of its choosing."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.closed = False
        self.protocol: Connection | None = None

    def write(self, data: Any) -> None:
        assert not self.closed, "written after close"
        self.sent += data

    def take(self) -> bytes:
        data = bytes(self.sent)
        self.sent.clear()
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            assert self.protocol is not None
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def feed(conn: Connection, data: bytes, step: int) -> None:
    """Hand ``data`` to ``conn`` as the event loop would, ``step`` bytes per read."""
    for start in range(0, len(data), step):
        chunk = data[start : start + step]
        buffer = conn.get_buffer(-1)
        buffer[: len(chunk)] = chunk
        conn.buffer_updated(len(chunk))


def linked_pair(
    server_identity: Identity, alice: Identity
) -> tuple[Connection, Wire, list[bytes], Connection, Wire, list[bytes]]:
    """A server and a client Connection running mutual TLS over in-memory wires."""
    server_ctx = server_context(server_identity, require_client_cert=True)
    client_ctx = client_context(alice)
    conns = []
    for tls in (TLS(server_ctx, server_side=True), TLS(client_ctx, server_side=False)):
        received: list[bytes] = []
        conn = Connection(tls=tls)
        conn.on_data = received.append
        wire = Wire()
        wire.protocol = conn
        conn.connection_made(wire)
        conns += [conn, wire, received]
    return tuple(conns)  # type: ignore[return-value]


async def test_records_split_into_single_bytes(server_identity: Identity, alice: Identity) -> None:
    server, server_wire, at_server, client, client_wire, at_client = linked_pair(server_identity, alice)
    assert server.secured is not None and client.secured is not None
    # The handshake, one byte per read each way, until neither side has more to say.
    while client_wire.sent or server_wire.sent:
        feed(server, client_wire.take(), 1)
        feed(client, server_wire.take(), 1)
    assert server.secured.done() and server.secured.exception() is None
    assert client.secured.done() and client.secured.exception() is None
    assert server.transport is not None and client.transport is not None
    # The server reads the client's certificate as from asyncio's TLS transport.
    peer = server.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    assert peer == alice.certificate.public_bytes(Encoding.DER)
    assert server.transport.get_extra_info("ssl_object").version() == "TLSv1.3"

    message = os.urandom(40_000)  # three records: every boundary crossed a byte at a time
    client.write(message)
    feed(server, client_wire.take(), 1)
    assert b"".join(at_server) == message
    server.write(message[::-1])
    feed(client, server_wire.take(), 1)
    assert b"".join(at_client) == message[::-1]


async def test_plaintext_larger_than_the_shared_buffer(server_identity: Identity, alice: Identity) -> None:
    """A read whose records decrypt to more than the shared plaintext buffer holds
    (a partial record before it): delivered whole, in order."""
    server, server_wire, at_server, client, client_wire, _ = linked_pair(server_identity, alice)
    while client_wire.sent or server_wire.sent:
        feed(server, client_wire.take(), READ_SIZE)
        feed(client, server_wire.take(), READ_SIZE)
    message = os.urandom(300_000)
    client.write(message)
    wire = client_wire.take()
    feed(server, wire[:16_000], READ_SIZE)  # most of the first record
    feed(server, wire[16_000 : 16_000 + READ_SIZE], READ_SIZE)  # 16 more records and a bit
    feed(server, wire[16_000 + READ_SIZE :], READ_SIZE)
    assert b"".join(at_server) == message
    assert max(len(chunk) for chunk in at_server) <= READ_SIZE


async def test_a_cut_mid_record_resumes_and_delivers_once(
    plugins: PluginManager, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
        relay = await Relay("127.0.0.1", server.port).start()
        client = await Client.connect("127.0.0.1", relay.port, tls=ClientTLS(alice), plugins=plugins)
        try:
            await client.send(b"warm-up")
            assert await client.recv() == b"warm-up"
            big = [os.urandom(100_000) for _ in range(3)]
            relay.cut_after(40_000 + 7)  # inside the third TLS record of the first message
            for data in big:
                client.send_nowait(data)
            got = [await asyncio.wait_for(client.recv(), 20 * TIMEOUT_FACTOR) for _ in big]
            assert got == big, "lost, duplicated or reordered across a cut inside a record"
            assert relay.cuts == 1 and client.links_opened == 2
        finally:
            await client.close()
            await relay.close()


async def test_a_tls12_only_client_is_told_why(
    plugins: PluginManager, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    """Refused with TLS's protocol_version alert (not a bare reset), and reported."""
    refused: list[str] = []

    class Recorder:
        @hookimpl
        def korinet_session_refused(
            self, server: Any, peername: str, fingerprint: str | None, reason: str, code: int
        ) -> None:
            refused.append(reason)

    plugins.register(Recorder())
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError) as info:
            await asyncio.open_connection("127.0.0.1", server.port, ssl=old)
        assert info.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"
        await eventually(lambda: refused, 10, "the refusal reported")
        assert "TLS handshake failed" in refused[0] and "PROTOCOL" in refused[0].upper()
        await eventually(lambda: server.hub._open == 0, 10, "the connection no longer counted")
        assert not server.hub.sessions


class Injector:
    """A TCP relay that can slip bytes into the client-to-server direction."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.to_server: asyncio.StreamWriter | None = None
        self._server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Injector:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.to_server = swriter
        self.writers += [cwriter, swriter]

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
            writer.transport.abort()

        await asyncio.gather(pump(creader, swriter), pump(sreader, cwriter))


async def test_a_garbage_record_ends_the_link_with_an_alert_and_the_session_resumes(
    plugins: PluginManager, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, handler=echo, plugins=plugins) as server:
        injector = await Injector(server.port).start()
        client = await Client.connect("127.0.0.1", injector.port, tls=ClientTLS(alice), plugins=plugins)
        try:
            await client.send(1)
            assert await client.recv() == 1  # the link is idle: the next byte starts a record
            session = client.session_id
            assert injector.to_server is not None
            # An application-data record whose contents no key produced.
            injector.to_server.write(b"\x17\x03\x03\x00\x40" + os.urandom(64))
            await eventually(lambda: client.links_opened == 2, 20, "the client back on a new link")
            # The server's TLS layer refused it and said so (bad_record_mac) before closing.
            assert isinstance(client.last_error, ssl.SSLError), client.last_error
            assert client.last_error.reason == "SSLV3_ALERT_BAD_RECORD_MAC"
            await client.send(2)
            assert await client.recv() == 2
            assert client.session_id == session and len(server.hub.sessions) == 1
        finally:
            await client.close()
            await injector.close()


SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from korinet import Server
    from korinet.security import AuthorizedKeys, Identity, ServerTLS

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    async def main(directory):
        tls = ServerTLS(Identity.load(directory / "server"), authorized=AuthorizedKeys(directory / "keys"))
        limits = dict(max_handshaking=1000, max_connections_per_address=1000)
        async with Server("127.0.0.1", 0, tls=tls, **limits) as s:
            print(s.port, flush=True)
            loop = asyncio.get_running_loop()
            while (line := await loop.run_in_executor(None, sys.stdin.readline)).strip() == "rss":
                print(rss(), len(s.hub.sessions), flush=True)

    asyncio.run(main(Path(sys.argv[1])))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
async def test_an_idle_tls_session_costs_the_server_little_memory(
    tmp_path: Path, server_identity: Identity, alice: Identity
) -> None:
    """300 idle mutual-TLS sessions: the server's RSS grows by less than 80 KiB each
    (asyncio's TLS protocol alone held 256 KiB per connection)."""
    count = 300
    server_identity.save(tmp_path / "server")
    AuthorizedKeys(tmp_path / "keys").authorize(alice.fingerprint, "alice")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    loop = asyncio.get_running_loop()
    assert proc.stdin is not None and proc.stdout is not None

    async def ask() -> tuple[int, int]:
        proc.stdin.write("rss\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 30)  # type: ignore[union-attr]
        rss, sessions = line.split()
        return int(rss), int(sessions)

    clients: list[Client] = []
    try:
        port = int(await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 30))
        tls = ClientTLS(alice, fingerprint=server_identity.fingerprint)
        # A few first, so that what every process allocates once is not counted.
        clients += await asyncio.gather(*(Client.connect("127.0.0.1", port, tls=tls) for _ in range(20)))
        before, _ = await ask()
        while len(clients) < count + 20:
            clients += await asyncio.gather(*(Client.connect("127.0.0.1", port, tls=tls) for _ in range(50)))
        after, sessions = await ask()
        assert sessions == count + 20
        per_session = (after - before) / count
        assert per_session < 80, f"{per_session:.1f} KiB per idle TLS session"
    finally:
        await asyncio.gather(*(c.abort() for c in clients))
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
