"""korinet-admin under abuse and misuse: a flood of silent sockets at an agent with
few descriptors still lets a real client in; refusals reach the audit log once per
address and kind, then as a summary; every user-facing failure is one line and the
documented exit code (a closed stdout, an exposed or unreadable key, an agent that
speaks the other protocol), and the wrong protocol is reported at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import CLI, RunningAgent, cli_env, install_client_identity, running_agent
from korinet_admin.audit import AuditLog
from testutil import TIMEOUT_FACTOR

from korinet.security import AuthorizedKeys, Identity

pytestmark = pytest.mark.timeout(120 * TIMEOUT_FACTOR)

WAIT = 30 * TIMEOUT_FACTOR


@pytest.fixture
def client_home(home: Path, alice: Identity) -> Path:
    install_client_identity(home, alice)
    return home


async def cli(home: Path, *args: str, **kwargs: Any) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdin=subprocess.DEVNULL, stdout=kwargs.pop("stdout", subprocess.PIPE),
        stderr=subprocess.PIPE, env=kwargs.pop("env", None) or cli_env(home), **kwargs,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode is not None
    return proc.returncode, out or b"", err


def host(agent: RunningAgent) -> str:
    return f"127.0.0.1:{agent.port}"


async def closed_by_peer(sock: socket.socket) -> None:
    """Wait until the other end closes ``sock`` (EOF or reset)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            if not await loop.sock_recv(sock, 1024):
                return
        except ConnectionError:
            return


def refusals(entries: list[dict[str, Any]], stage: str = "connection") -> list[dict[str, Any]]:
    return [e for e in entries if e["event"] == "refused" and e["stage"] == stage]


def counted(entries: list[dict[str, Any]]) -> int:
    """Refusals a list of audit lines stands for: a first line is one, a summary many."""
    return sum(e.get("repeated", 1) for e in entries)


# ---------------------------------------------------------------------- a flood


@contextlib.asynccontextmanager
async def agent_process(
    base: Path, identity: Identity, alice: Identity, *, open_files: int, handshake: float
) -> AsyncIterator[tuple[int, Path, list[str]]]:
    """``korinet-admin agent`` in a process of its own, limited to ``open_files``
    descriptors (soft and hard, as a service manager would set them)."""
    agent_home = base / "agent-home"
    identity.save(agent_home, overwrite=True)
    AuthorizedKeys(agent_home / "authorized_keys").authorize(alice.fingerprint, "alice", ["admin"])
    state = base / "agent-state"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    proc = await asyncio.create_subprocess_exec(
        *CLI, "agent", "127.0.0.1:0", "--state-dir", str(state), "--handshake-timeout", str(handshake),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=cli_env(agent_home), preexec_fn=limit,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(WAIT):
            while not lines or not lines[-1].startswith("state:"):
                line = (await proc.stdout.readline()).decode()
                assert line, f"the agent ended: {lines} {(await proc.stderr.read()).decode()}"
                lines.append(line.strip())
        found = re.search(r"agent on 127\.0\.0\.1:(\d+)", lines[0])
        assert found, lines
        yield int(found.group(1)), state / "audit.log", lines
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), WAIT)
        assert b"Traceback" not in err, err.decode()


async def test_a_flood_of_silent_sockets_beyond_the_descriptor_limit_leaves_room_for_a_client(
    tmp_path: Path, client_home: Path, server_identity: Identity, alice: Identity
) -> None:
    # 300 silent sockets at an agent allowed 256 descriptors. Before: asyncio held each
    # one 60 s in its TLS handshake, counted nowhere; the agent hit EMFILE and the real
    # client got rc 255 with an empty "last error".
    handshake = 3.0 * TIMEOUT_FACTOR
    async with agent_process(tmp_path, server_identity, alice, open_files=256, handshake=handshake) as (
        port,
        audit_path,
        lines,
    ):
        assert any("open files: 256; at most 64 connections without a session" in x for x in lines), lines
        sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # the client comes from 127.0.0.1
        flood = []
        try:
            for source in sources:
                for _ in range(100):
                    sock = socket.create_connection(("127.0.0.1", port), WAIT, (source, 0))
                    sock.setblocking(False)
                    flood.append(sock)
            flooded = time.monotonic()
            code, out, err = await cli(client_home, "exec", f"127.0.0.1:{port}", "--", "echo", "ok")
            assert (code, out) == (0, b"ok\n"), err.decode()
            # every silent socket is closed by the agent, the last ones at the handshake timeout
            await asyncio.wait_for(asyncio.gather(*(closed_by_peer(s) for s in flood)), handshake + WAIT / 2)
            assert time.monotonic() - flooded < handshake + WAIT / 2
        finally:
            for sock in flood:
                sock.close()
    entries = AuditLog.read(audit_path)
    flood_lines = [e for e in refusals(entries) if e["peer"].split(":")[0] in sources]
    # each of the 300 is accounted for, in a few lines: one per address and kind, then a summary
    assert counted(flood_lines) == 300, flood_lines
    assert len(flood_lines) <= len(sources) * 2 * 2, flood_lines
    reasons = " ".join(e["reason"] for e in flood_lines)
    assert "max_handshaking" in reasons and "no TLS handshake within" in reasons
    assert [e["argv"] for e in entries if e["event"] == "exec"] == [["echo", "ok"]]


# ---------------------------------------------------------------------- audit


async def test_failed_tls_handshakes_are_audited_once_then_summed_up(
    tmp_path: Path, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", agent.port), WAIT)
            sock.setblocking(False)
            try:
                sock.send(b"\x16\x03\x01\x00\x05hello")  # a TLS record, not a ClientHello
                await asyncio.wait_for(closed_by_peer(sock), WAIT)
            finally:
                sock.close()
        (first,) = refusals(agent.audit())  # at once, not at the end of the interval
        assert first["reason"].startswith("TLS handshake failed") and first["code"] == 1002
        assert first["peer"].startswith("127.0.0.1:")
    summary = refusals(agent.audit())[1:]  # written when the agent stops
    assert len(summary) == 1 and summary[0]["repeated"] == 4 and summary[0]["peer"] == "127.0.0.1", summary
    assert "4 more like this from 127.0.0.1" in summary[0]["reason"]


# ---------------------------------------------------------------------- one line, right code


async def test_a_closed_stdout_ends_jobs_quietly(
    tmp_path: Path, client_home: Path, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        read_end, write_end = os.pipe()
        os.close(read_end)  # as `| head` once it has what it wants
        env = {**cli_env(client_home), "PYTHONUNBUFFERED": "1"}  # each line written at once
        try:
            code, _, err = await cli(client_home, "jobs", host(agent), stdout=write_end, env=env)
        finally:
            os.close(write_end)
    assert code == 141, err.decode()  # 128 + SIGPIPE, as the shell shows for other tools
    said = [x for x in err.decode().splitlines() if "is now pinned" not in x]  # first use: a notice
    assert said == [], said


async def test_an_exposed_key_is_one_line_naming_the_file_and_the_fix(client_home: Path) -> None:
    key = client_home / "key.pem"
    key.chmod(0o644)
    code, out, err = await cli(client_home, "jobs", "127.0.0.1:1")
    assert code == 255 and out == b""
    (line,) = err.decode().splitlines()
    assert str(key) in line and f"chmod 600 {key}" in line and "Traceback" not in line


async def test_an_unreadable_key_is_one_line_naming_the_file_and_the_fix(client_home: Path) -> None:
    key = client_home / "key.pem"
    key.unlink()
    key.mkdir()  # unreadable as a file, even for root
    code, _, err = await cli(client_home, "status", "127.0.0.1:1")
    assert code == 255
    (line,) = err.decode().splitlines()
    assert f"cannot read {key}" in line and f"chmod 600 {key}" in line


async def test_a_tls_client_at_a_plaintext_agent_is_told_at_once(tmp_path: Path, client_home: Path) -> None:
    async with running_agent(tmp_path, None, None) as agent:  # --insecure-plaintext
        address = host(agent)
        started = time.monotonic()
        code, _, err = await cli(client_home, "jobs", address, "--connect-timeout", str(WAIT * 2))
        elapsed = time.monotonic() - started
    assert code == 255
    expected = f"the server at {address} speaks plaintext, not TLS (started with --insecure-plaintext?)"
    assert expected in err.decode(), err.decode()
    assert elapsed < WAIT  # well under the connect timeout it used to wait out
    assert len(err.decode().splitlines()) == 1 and "Traceback" not in err.decode()


async def test_a_plaintext_client_at_a_tls_agent_is_told_at_once(
    tmp_path: Path, client_home: Path, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        started = time.monotonic()
        code, _, err = await cli(
            client_home, "jobs", host(agent), "--insecure-plaintext", "--connect-timeout", str(WAIT * 2)
        )
        elapsed = time.monotonic() - started
        entries = agent.audit()
    assert code == 255
    text = err.decode()
    assert "this server speaks TLS only: connect with TLS (not with --insecure-plaintext)" in text, text
    assert "1013" not in text and "Traceback" not in text
    assert elapsed < WAIT
    (refused,) = refusals(entries)
    assert "TLS only" in refused["reason"] and refused["code"] == 1002


def test_a_summary_of_relayed_refusals_names_the_reported_client_and_the_relay(tmp_path: Path) -> None:
    from korinet_admin.audit import AuditLog, Throttle

    throttle = Throttle(AuditLog(tmp_path / "audit.log"))
    for port in (4000, 4001, 4002):
        fields = {"peer": "198.51.100.7:1238", "via": "relay", "reported_peer": f"203.0.113.5:{port}"}
        throttle.record(
            ("203.0.113.5", 1009, None), "refused", **fields, reason="too many connections", code=1009
        )
    throttle.close()
    first, summary = AuditLog.read(tmp_path / "audit.log")
    assert first["reported_peer"] == "203.0.113.5:4000" and first["peer"] == "198.51.100.7:1238"
    assert summary["repeated"] == 2 and summary["via"] == "relay"
    assert summary["peer"] == "198.51.100.7:1238" and summary["reported_peer"] == "203.0.113.5"
    assert (
        "2 more like this from 203.0.113.5 (as reported by the relay 198.51.100.7:1238)" in summary["reason"]
    )
