"""Agents that dial home (docs/ADMIN.md "Agents that dial home"): a relay that parks
agents' connections and splices clients to them, end to end TLS through it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import Collector, client_tls, running_agent
from korinet_admin.dialhome import DialHome
from korinet_admin.execclient import AdminConnection, Target, parse_targets
from korinet_admin.protocol import exit_status
from korinet_admin.relay import Relay, parse_sni
from testutil import TIMEOUT_FACTOR

from korinet import KoriNetError, Server
from korinet.security import AuthorizedKeys, Identity

WAIT = 30 * TIMEOUT_FACTOR


async def wait_for(condition: object, timeout: float = WAIT) -> None:
    """Poll a cheap in-process condition (no I/O of ours to await)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_relay(agents: AuthorizedKeys, port: int = 0, **kwargs: object) -> AsyncIterator[Relay]:
    relay = await Relay("127.0.0.1", port, agents, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield relay
    finally:
        await relay.close()


@pytest.fixture
def relay_agents(tmp_path: Path, server_identity: Identity) -> AuthorizedKeys:
    keys = AuthorizedKeys(tmp_path / "relay_agents")
    keys.authorize(server_identity.fingerprint, "web1")
    return keys


def dial_home(server: Server, identity: Identity, relay: Relay, name: str, **kwargs: Any) -> DialHome:
    dial = DialHome(server.hub, server.ssl, identity, [("127.0.0.1", relay.port)], name, **kwargs)
    dial.start()
    return dial


async def relayed(
    relay: Relay, name: str, identity: Identity, alice: Identity, base: Path
) -> AdminConnection:
    tls = dataclasses.replace(client_tls(alice, base), fingerprint=identity.fingerprint)
    return await AdminConnection.open(Target("127.0.0.1", relay.port, name), tls=tls, open_timeout=WAIT)


async def run(conn: AdminConnection, argv: list[str]) -> tuple[int, Collector]:
    sink = Collector()
    job = await conn.exec(argv, sink, stdin=False)
    return exit_status(await job.wait(WAIT)), sink


def test_relay_addresses_parse() -> None:
    assert parse_targets("relay.example/web1,10.0.0.1:99/db-2") == [
        Target("relay.example", 1238, "web1"),
        Target("10.0.0.1", 99, "db-2"),
    ]
    assert Target("relay.example", 1238, "web1").label == "relay.example/web1"
    with pytest.raises(ValueError):
        parse_targets("relay.example/bad name")


async def test_exec_through_the_relay_end_to_end(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys,
    relay_agents: AuthorizedKeys,
) -> None:  # fmt: skip
    async with (
        running_relay(relay_agents) as relay,
        running_agent(tmp_path, server_identity, authorized) as agent,
    ):
        dial = dial_home(agent.server, server_identity, relay, "web1")
        try:
            await wait_for(lambda: "web1" in relay.connected())
            conn = await relayed(relay, "web1", server_identity, alice, tmp_path)
            try:
                blob = bytes(range(256)) * 4096  # 1 MiB, binary
                script = "import sys; sys.stdout.buffer.write(bytes(range(256))*4096); sys.stderr.write('e')"
                status, sink = await run(conn, [sys.executable, "-c", script])
                assert status == 0 and sink.out == blob and sink.err == b"e"
                status, _ = await run(conn, ["sh", "-c", "exit 7"])
                assert status == 7
            finally:
                await conn.close()
            # the agent's own audit names alice: authorization happened at the agent
            assert any(e.get("who") == "alice" and e["event"] == "exec" for e in agent.audit())
            assert relay.stats["spliced"] >= 1
        finally:
            await dial.close()


async def test_a_name_not_parked_is_unreachable_at_once(
    tmp_path: Path, server_identity: Identity, alice: Identity, relay_agents: AuthorizedKeys
) -> None:
    async with running_relay(relay_agents) as relay:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(KoriNetError, match="web1 is not connected to the relay"):
            await relayed(relay, "web1", server_identity, alice, tmp_path)
        assert loop.time() - started < WAIT / 2  # told, not timed out
        assert relay.stats["unknown"] >= 1


async def test_relay_key_runs_nothing_and_a_pin_is_required(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys,
    relay_agents: AuthorizedKeys,
) -> None:  # fmt: skip
    """The relay (or anyone) holding a key the agent does not authorize gets no session:
    a spliced connection is authenticated by the agent, not by the relay."""
    relay_key = Identity.generate()
    async with (
        running_relay(relay_agents) as relay,
        running_agent(tmp_path, server_identity, authorized) as agent,
    ):
        dial = dial_home(agent.server, server_identity, relay, "web1")
        try:
            await wait_for(lambda: "web1" in relay.connected())
            with pytest.raises(KoriNetError, match="not authorized"):
                await relayed(relay, "web1", server_identity, relay_key, tmp_path)
            assert not [e for e in agent.audit() if e["event"] == "exec"]
            # without a pinned agent key the client refuses to go through a relay at all
            with pytest.raises(KoriNetError, match="needs its key pinned"):
                target = Target("127.0.0.1", relay.port, "web1")
                await AdminConnection.open(target, tls=client_tls(alice, tmp_path), open_timeout=WAIT)
            # a relay that hands the client to another agent is caught by the pin
            imposter = Identity.generate()
            with pytest.raises(KoriNetError, match="not the expected"):
                await relayed(relay, "web1", imposter, alice, tmp_path)
        finally:
            await dial.close()


async def test_a_stranger_cannot_claim_a_name(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys,
    relay_agents: AuthorizedKeys,
) -> None:  # fmt: skip
    stranger = Identity.generate()
    listed = Identity.generate()
    relay_agents.authorize(listed.fingerprint, "db1")
    async with running_relay(relay_agents) as relay:
        for identity, name, reason in (
            (stranger, "web1", "is not an authorized agent"),
            (listed, "web1", "may register as 'db1', not 'web1'"),
        ):
            dial = DialHome(None, None, identity, [("127.0.0.1", relay.port)], name, links=1, initial=30)
            dial.start()
            try:
                await wait_for(lambda: reason in dial.last_error.get(("127.0.0.1", relay.port), ""))  # noqa: B023
            finally:
                await dial.close()
        assert relay.connected() == [] and relay.stats["refused"] == 2 and relay.stats["registered"] == 0


def test_sni_parser_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_sni(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")  # a ServerHello
    with pytest.raises(ValueError):
        parse_sni(b"\x16\x03\x01\x00\x04\x01\x00\x00\x00")  # truncated ClientHello body


def client_hello(name: str) -> bytes:
    """The first flight of a real TLS client (this Python's OpenSSL) naming ``name``."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sni_parser_reads_a_real_hello_whole_cut_anywhere_and_split_in_records() -> None:
    from korinet_admin.relay import _NeedMore

    hello = client_hello("web-7.example")
    assert parse_sni(hello) == "web-7.example"
    for cut in range(len(hello)):  # the relay reads more until the hello is whole
        with pytest.raises(_NeedMore):
            parse_sni(hello[:cut])
    # the same handshake message in two records (TLS allows any fragmentation)
    body = hello[5:]
    half = len(body) // 2
    record = lambda part: hello[:3] + len(part).to_bytes(2, "big") + part  # noqa: E731
    assert parse_sni(record(body[:half]) + record(body[half:])) == "web-7.example"
