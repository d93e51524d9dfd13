"""Reconnect storms at a relay: 200 agents cut at once come back spread by their
jitter, and neither they nor stalled registrations keep a client from its agent."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import client_tls, running_agent
from korinet_admin.dialhome import DialHome
from korinet_admin.execclient import AdminConnection, Target
from korinet_admin.protocol import exit_status
from korinet_admin.relay import MAGIC, NONCE_SIZE, Relay
from test_admin_dialhome import Collector, dial_home, wait_for
from test_admin_fleet_scale import start_pool
from testutil import TIMEOUT_FACTOR

from korinet.security import AuthorizedKeys, Identity

pytestmark = pytest.mark.timeout(240 * TIMEOUT_FACTOR)
WAIT = 60 * TIMEOUT_FACTOR
POOLS = 4
PER_POOL = 50
JITTER = 1.0  # the agents' first jitter ceiling (s): their comeback spreads over it


async def exec_via(relay: Relay, name: str, key: str, alice: Identity, base: Path, argv: list[str]) -> bytes:
    tls = dataclasses.replace(client_tls(alice, base), fingerprint=key)
    conn = await AdminConnection.open(Target("127.0.0.1", relay.port, name), tls=tls, open_timeout=WAIT)
    try:
        sink = Collector()
        job = await conn.exec(argv, sink, stdin=False)
        assert exit_status(await job.wait(WAIT)) == 0
        return sink.out
    finally:
        await conn.close()


async def test_200_agents_come_back_spread_after_a_relay_restart_and_a_client_gets_through(
    tmp_path: Path, alice: Identity
) -> None:
    agent_home = tmp_path / "agent-home"
    Identity.generate().save(agent_home)  # the pool loads one; dial-home agents use their own
    AuthorizedKeys(agent_home / "authorized_keys").authorize(alice.fingerprint, "alice", ["admin"])
    keys, fingerprints = tmp_path / "keys", {}
    agents = AuthorizedKeys(tmp_path / "relay_agents")
    lines = []
    for p in range(POOLS):
        for i in range(PER_POOL):
            name = f"p{p}-{i:03d}"
            fingerprints[name] = Identity.generate().save(keys / name).fingerprint
            lines.append(f"{fingerprints[name]} {name}\n")
    agents.path.write_text("".join(lines))
    relay = await Relay("127.0.0.1", 0, agents).start()
    port = relay.port
    pools: list[Any] = []
    try:
        started = await asyncio.gather(
            *(
                start_pool(tmp_path, PER_POOL, f"p{p}-", agent_home, "--dial", str(port), "--keys", str(keys),
                           "--jitter", str(JITTER), "--cap", "4")
                for p in range(POOLS)
            )
        )  # fmt: skip
        pools = [proc for proc, _ in started]
        await wait_for(lambda: len(relay.connected()) == POOLS * PER_POOL, WAIT)

        await relay.close()  # every parked link drops at once
        relay = await Relay("127.0.0.1", port, agents).start()
        target = "p2-017"
        await wait_for(lambda: target in relay.connected(), WAIT)
        out = await exec_via(
            relay, target, fingerprints[target], alice, tmp_path, ["sh", "-c", "echo $HOST_NAME"]
        )
        assert out == f"{target}\n".encode()
        await wait_for(lambda: len(relay.connected()) == POOLS * PER_POOL, WAIT)
        assert relay.stats["refused"] == 0
        comeback = sorted(relay.last_seen.values())
        print(f"comeback of {len(comeback)} agents: {comeback[-1] - comeback[0]:.2f}s, {relay.stats}")
        # jittered: not one burst; the first dial after the cut waits uniform(0, JITTER)
        assert comeback[-1] - comeback[0] >= 0.3 * JITTER, comeback[-1] - comeback[0]
    finally:
        for proc in pools:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in pools:
            try:
                await asyncio.wait_for(proc.wait(), WAIT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await relay.close()


async def test_stalled_registrations_get_busy_agents_not_refused_clients(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    """The registration budget of an address is full (connections that sent MAGIC and
    then nothing): a new agent is told busy and retries, a client still reaches a
    parked agent, and the agent registers once the budget frees."""
    late_key = Identity.generate()
    agents = AuthorizedKeys(tmp_path / "relay_agents")
    agents.authorize(server_identity.fingerprint, "web1")
    agents.authorize(late_key.fingerprint, "late")
    relay = await Relay("127.0.0.1", 0, agents, max_registering_per_address=3, timeout=WAIT).start()
    stalled: list[socket.socket] = []
    dials: list[DialHome] = []
    try:
        async with running_agent(tmp_path, server_identity, authorized) as web1:
            dials.append(dial_home(web1.server, server_identity, relay, "web1", initial=0.2, backoff_cap=1.0))
            await wait_for(lambda: dials[0].parked[("127.0.0.1", relay.port)] == 2)
            loop = asyncio.get_running_loop()
            for _ in range(3):
                sock = socket.create_connection(("127.0.0.1", relay.port))
                sock.setblocking(False)
                stalled.append(sock)
                await loop.sock_sendall(sock, MAGIC)
                got = b""
                while len(got) < 1 + NONCE_SIZE:  # the relay counts it from here on
                    got += await loop.sock_recv(sock, 64)
            async with running_agent(tmp_path, late_key, authorized) as late:
                dials.append(dial_home(late.server, late_key, relay, "late", initial=0.2, backoff_cap=1.0))
                await wait_for(lambda: "busy" in dials[1].last_error.get(("127.0.0.1", relay.port), ""))
                assert relay.stats["busy"] >= 1
                assert "late" not in relay.connected()
                out = await exec_via(
                    relay, "web1", server_identity.fingerprint, alice, tmp_path, ["echo", "ok"]
                )
                assert out == b"ok\n"
                for sock in stalled:
                    sock.close()
                await wait_for(lambda: "late" in relay.connected())
                out = await exec_via(relay, "late", late_key.fingerprint, alice, tmp_path, ["echo", "late"])
                assert out == b"late\n"
    finally:
        for dial in dials:
            await dial.close()
        for sock in stalled:
            sock.close()
        await relay.close()
