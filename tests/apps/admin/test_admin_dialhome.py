"""Agents that dial home (docs/ADMIN.md "Agents that dial home"): a relay that parks
agents' connections and splices clients to them, end to end TLS through it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
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
            # the refusal is audited with the client the relay reported, via the relay
            refusal = next(e for e in agent.audit() if e["event"] == "refused")
            assert refusal["fingerprint"] == relay_key.fingerprint and refusal["via"] == "relay"
            assert refusal["peer"] == f"127.0.0.1:{relay.port}"
            assert (
                refusal["reported_peer"].startswith("127.0.0.1:")
                and refusal["reported_peer"] != refusal["peer"]
            )
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


def local_address(conn: AdminConnection) -> str:
    """``HOST:PORT`` of the client's end of its connection (what the relay saw)."""
    link = conn.client.conn
    assert link is not None and link.transport is not None
    host, port = link.transport.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


async def test_the_agent_audits_the_client_address_the_relay_reports_and_the_relay(
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
            relay_port = relay.port
            conn = await relayed(relay, "web1", server_identity, alice, tmp_path)
            try:
                client = local_address(conn)
                assert (await run(conn, ["true"]))[0] == 0
            finally:
                await conn.close()
            tls = dataclasses.replace(client_tls(alice, tmp_path), fingerprint=server_identity.fingerprint)
            direct = await AdminConnection.open(agent.target, tls=tls, open_timeout=WAIT)
            try:
                direct_client = local_address(direct)
                assert (await run(direct, ["true"]))[0] == 0
            finally:
                await direct.close()
        finally:
            await dial.close()
    relayed_exec, direct_exec = [e for e in agent.audit() if e["event"] == "exec"]
    # the relay is the peer (the only address the agent saw), the client's is its word
    assert relayed_exec["peer"] == f"127.0.0.1:{relay_port}"
    assert relayed_exec["via"] == "relay" and relayed_exec["reported_peer"] == client
    assert relayed_exec["who"] == "alice"
    # a direct connection is recorded as before: its own address, nothing reported
    assert direct_exec["peer"] == direct_client
    assert "via" not in direct_exec and "reported_peer" not in direct_exec


class Reported:
    """What the relay sends as the client's header, instead of the real address: the
    ``next`` ones in order, then ``always`` if set (a client's retries too)."""

    def __init__(self) -> None:
        self.next: list[bytes] = []
        self.always: bytes | None = None


@pytest.fixture
def reported(monkeypatch: pytest.MonkeyPatch) -> Reported:
    """Several users behind one relay; a relay sending garbage."""
    import korinet_admin.relay as relay_module

    headers = Reported()
    real = relay_module.client_header

    def header(host: str, port: int) -> bytes:
        if headers.next:
            return headers.next.pop(0)
        return headers.always if headers.always is not None else real(host, port)

    monkeypatch.setattr(relay_module, "client_header", header)
    return headers


async def test_the_agents_per_address_limit_counts_the_reported_client_not_the_relay(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys,
    relay_agents: AuthorizedKeys, reported: Reported,
) -> None:  # fmt: skip
    from korinet_admin.relay import client_header

    async with (
        running_relay(relay_agents) as relay,
        running_agent(tmp_path, server_identity, authorized) as agent,
    ):
        agent.server.hub.max_connections_per_address = 1
        dial = dial_home(agent.server, server_identity, relay, "web1")
        conns: list[AdminConnection] = []
        relay_port = relay.port
        try:
            await wait_for(lambda: "web1" in relay.connected())
            # two users behind the relay: one connection each is within the limit
            for address in ("203.0.113.5", "2001:db8::6"):
                reported.next.append(client_header(address, 4000))
                conns.append(await relayed(relay, "web1", server_identity, alice, tmp_path))
            # the first user's second connection is over it, and only that user's
            reported.always = client_header("203.0.113.5", 4001)  # and on each retry
            await wait_for(lambda: len(relay.connected()) == 1 and len(relay.parked["web1"]) >= 1)
            with pytest.raises(KoriNetError):
                tls = dataclasses.replace(
                    client_tls(alice, tmp_path), fingerprint=server_identity.fingerprint
                )
                await AdminConnection.open(Target("127.0.0.1", relay.port, "web1"), tls=tls, open_timeout=3)
            for conn in conns:
                assert (await run(conn, ["true"]))[0] == 0
        finally:
            for conn in conns:
                await conn.close()
            await dial.close()
    audit = agent.audit()
    assert [e["reported_peer"] for e in audit if e["event"] == "exec"] == [
        "203.0.113.5:4000",
        "2001:db8::6:4000",
    ]
    refusal = next(e for e in audit if e["event"] == "refused")  # then a summary of the retries
    assert refusal["reported_peer"] == "203.0.113.5:4001" and refusal["via"] == "relay"
    assert refusal["peer"] == f"127.0.0.1:{relay_port}"
    assert "too many connections from 203.0.113.5" in refusal["reason"]


@pytest.mark.parametrize(
    "header",
    [
        b"A" + bytes([65]) + b"1" * 65,
        b"A" + bytes([9]) + b"not-an-ip",
        b"A\x00",
        b"A" + bytes([7]) + b"1.2.3.4",
    ],
    ids=["too-long", "not-an-address", "empty", "no-port"],
)
async def test_a_bad_client_header_drops_that_link_and_the_agent_parks_again(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys,
    relay_agents: AuthorizedKeys, reported: Reported, header: bytes, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="korinet_admin.dialhome")
    async with (
        running_relay(relay_agents) as relay,
        running_agent(tmp_path, server_identity, authorized) as agent,
    ):
        dial = dial_home(agent.server, server_identity, relay, "web1", links=1)
        try:
            await wait_for(lambda: "web1" in relay.connected())
            registered = relay.stats["registered"]
            reported.always = header  # the client's retries too
            with pytest.raises(KoriNetError):
                await relayed(relay, "web1", server_identity, alice, tmp_path)
            assert "bad client header from the relay" in caplog.text  # logged, then dropped
            assert dial.spliced == 0  # nothing reached the Hub
            reported.always = None
            # the agent parks again and serves the next client, with its real address
            await wait_for(lambda: relay.stats["registered"] > registered and "web1" in relay.connected())
            conn = await relayed(relay, "web1", server_identity, alice, tmp_path)
            try:
                assert (await run(conn, ["true"]))[0] == 0
            finally:
                await conn.close()
        finally:
            await dial.close()
    (entry,) = [e for e in agent.audit() if e["event"] == "exec"]
    assert entry["reported_peer"].startswith("127.0.0.1:")


async def test_the_relay_answers_only_the_names_asked_and_survives_bad_queries(
    tmp_path: Path, server_identity: Identity, authorized: AuthorizedKeys, relay_agents: AuthorizedKeys
) -> None:
    from korinet_admin.relay import QUERY, query_relay

    async with (
        running_relay(relay_agents) as relay,
        running_agent(tmp_path, server_identity, authorized) as agent,
    ):
        dial = dial_home(agent.server, server_identity, relay, "web1")
        try:
            await wait_for(lambda: "web1" in relay.connected())
            answers = await query_relay("127.0.0.1", relay.port, ["nobody"], WAIT)
            assert list(answers) == ["nobody"]  # web1 is parked, but was not asked about
            assert answers["nobody"].parked == 0 and answers["nobody"].seen is None
            for garbage in (
                QUERY + b"\x00\x00\x00\x05{bad}",  # not JSON
                QUERY + b"\x00\x00\x00\x02[]",  # no names
                QUERY + b"\x7f\xff\xff\xff",  # too long
                QUERY + b'\x00\x00\x00\x0d{"names":[1]}',  # a name that is no string
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
                writer.write(garbage)
                assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed, no answer
                writer.close()
            answers = await query_relay("127.0.0.1", relay.port, ["web1"], WAIT)  # still serving
            assert answers["web1"].parked == 2 and answers["web1"].seen == 0
        finally:
            await dial.close()
        await wait_for(lambda: "web1" not in relay.connected())  # closed links are noticed
        answers = await query_relay("127.0.0.1", relay.port, ["web1"], WAIT)
        assert answers["web1"].parked == 0 and answers["web1"].seen is not None


async def test_hosts_asks_each_relay_which_dial_home_hosts_are_parked(
    tmp_path: Path, home: Path, server_identity: Identity, authorized: AuthorizedKeys,
    relay_agents: AuthorizedKeys,
) -> None:  # fmt: skip
    import re
    import subprocess

    from admin_helpers import CLI, cli_env

    home.mkdir(parents=True, exist_ok=True)
    db1 = Identity.generate()
    relay_agents.authorize(db1.fingerprint, "db1")
    with socket.socket() as s:  # nothing listens there once closed
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    async with running_relay(relay_agents) as relay:
        async with running_agent(tmp_path, db1, authorized) as stopped:
            dial = dial_home(stopped.server, db1, relay, "db1")
            try:
                await wait_for(lambda: "db1" in relay.connected())
            finally:
                await dial.close()  # db1's agent stops
        async with running_agent(tmp_path, server_identity, authorized) as agent:
            dial = dial_home(agent.server, server_identity, relay, "web1")
            try:
                await wait_for(lambda: relay.connected() == ["web1"])
                (home / "hosts.toml").write_text(
                    f"""
[hosts.web1]
address = "127.0.0.1:{relay.port}/web1"
key = "{server_identity.fingerprint}"
[hosts.db1]
address = "127.0.0.1:{relay.port}/db1"
key = "{db1.fingerprint}"
[hosts.cache1]
address = "127.0.0.1:{relay.port}/cache1"
[hosts.far1]
address = "127.0.0.1:{dead}/far1"
[hosts.direct1]
address = "127.0.0.1:{agent.port}"
"""
                )
                proc = await asyncio.create_subprocess_exec(
                    *CLI, "hosts", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    env=cli_env(home),
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), WAIT)
            finally:
                await dial.close()
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert re.match(r"NAME\s+ADDRESS\s+GROUPS\s+KEY\s+RELAY\s+LAST SEEN$", lines[0])
    rows = {line.split()[0]: line for line in lines[1:]}
    assert re.search(r"\s+parked\s+never$", rows["web1"])
    assert re.search(r"\s+not parked \(seen \d+[smhd] ago\)\s+never$", rows["db1"])
    assert "not parked (never seen)" in rows["cache1"]
    assert "relay unreachable (connection refused)" in rows["far1"]
    assert re.search(r"\s+-\s+never$", rows["direct1"])
    assert relay.stats["queries"] == 1  # one question per relay, about its hosts only


async def test_an_agent_that_does_not_ask_for_addresses_gets_a_bare_go_as_before(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys,
    relay_agents: AuthorizedKeys, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """An older agent (no ``"address"`` in its registration) is spliced with ``G`` and
    counts and audits the relay, as before the header existed."""
    import functools

    import korinet_admin.dialhome as dialhome_module
    from korinet_admin.relay import registration

    monkeypatch.setattr(dialhome_module, "registration", functools.partial(registration, address=False))
    async with (
        running_relay(relay_agents) as relay,
        running_agent(tmp_path, server_identity, authorized) as agent,
    ):
        dial = dial_home(agent.server, server_identity, relay, "web1")
        try:
            await wait_for(lambda: "web1" in relay.connected())
            relay_port = relay.port
            conn = await relayed(relay, "web1", server_identity, alice, tmp_path)
            try:
                assert (await run(conn, ["true"]))[0] == 0
            finally:
                await conn.close()
        finally:
            await dial.close()
    (entry,) = [e for e in agent.audit() if e["event"] == "exec"]
    assert entry["peer"] == f"127.0.0.1:{relay_port}" and "via" not in entry and "reported_peer" not in entry
