"""korinet-admin run as a user runs it: a subprocess with real stdin, stdout, stderr,
signals and exit codes, against agents running in the test's event loop."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import CLI, RunningAgent, cli_env, install_client_identity, running_agent
from korinet_admin.execclient import JobRun
from testutil import TIMEOUT_FACTOR, eventually

from korinet.security import AuthorizedKeys, Identity

pytestmark = pytest.mark.timeout(90 * TIMEOUT_FACTOR)

WAIT = 30 * TIMEOUT_FACTOR


async def cli(
    home: Path, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env or cli_env(home),
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), WAIT)
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.fixture
def client_home(home: Path, alice: Identity) -> Path:
    install_client_identity(home, alice)
    return home


def host(agent: RunningAgent) -> str:
    return f"127.0.0.1:{agent.port}"


async def test_stdin_stdout_stderr_and_exit_codes(
    tmp_path: Path, client_home: Path, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        code, out, err = await cli(client_home, "exec", host(agent), "--", "cat", stdin=b"hi\n")
        assert (code, out) == (0, b"hi\n")
        assert b"is now pinned" in err  # the first connection says which key it pinned
        for expected in (0, 1, 42):
            code, out, err = await cli(
                client_home, "exec", host(agent), "--", "sh", "-c", f"echo out; echo err >&2; exit {expected}"
            )
            assert (code, out, err) == (expected, b"out\n", b"err\n")
        code, out, err = await cli(client_home, "exec", host(agent), "--", "sh", "-c", "kill -9 $$")
        assert code == 128 + 9 and err == b""


async def test_timeout_kills_the_remote_command_and_says_so(
    tmp_path: Path, client_home: Path, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        code, _, err = await cli(client_home, "exec", host(agent), "--timeout", "0.5", "--", "sleep", "100")
        assert code == 124
        assert b"timed out after 0.5s: the command was killed" in err
        assert all(job.done.done() for job in agent.agent.jobs.jobs.values())


async def test_ctrl_c_stops_a_remote_sleep(
    tmp_path: Path, client_home: Path, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    # Event-driven: the remote `sleep 100` must end by the SIGINT the client forwards (its
    # exit notice says so), not by a clock; a 1 s bound failed under load (client, agent and
    # supervisor are three processes on a shared machine).
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "exec", host(agent), "--", "sleep", "100",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=cli_env(client_home),
        )  # fmt: skip
        try:
            jobs = agent.agent.jobs.jobs
            started = lambda: bool(jobs) and bool(next(iter(jobs.values())).pid)  # noqa: E731
            await eventually(started, 30, "the remote sleep started")
            job = next(iter(jobs.values()))
            os.kill(job.pid, 0)  # the remote sleep runs
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(asyncio.shield(job.done), WAIT)
            assert job.exit_notice()["signal"] == signal.SIGINT
            with pytest.raises(ProcessLookupError):
                os.kill(job.pid, 0)
            _, err = await asyncio.wait_for(proc.communicate(), WAIT)
            assert proc.returncode == 128 + signal.SIGINT
            assert b"sending SIGINT to the remote command" in err
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_ctrl_c_before_the_client_knows_the_job_started_still_stops_it(
    tmp_path: Path, client_home: Path, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    """The agent has started the job but its reply is still on the way when Ctrl-C comes:
    the client had no job to signal yet and the SIGINT was lost, the remote command ran
    on (seen in a full run). The agent here holds its reply until the client has said it
    is sending SIGINT; the job must still end by that SIGINT."""
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        jobs = agent.agent.jobs
        submit = jobs.submit
        release = asyncio.Event()

        async def held_submit(spec: Any) -> Any:
            result = await submit(spec)
            await release.wait()  # the job runs; the reply waits
            return result

        jobs.submit = held_submit  # type: ignore[method-assign]
        proc = await asyncio.create_subprocess_exec(
            *CLI, "exec", host(agent), "--", "sleep", "100",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=cli_env(client_home),
        )  # fmt: skip
        try:
            started = lambda: bool(jobs.jobs) and bool(next(iter(jobs.jobs.values())).pid)  # noqa: E731
            await eventually(started, 30, "the remote sleep started")
            job = next(iter(jobs.jobs.values()))
            proc.send_signal(signal.SIGINT)
            assert proc.stderr is not None
            said = b""
            while b"sending SIGINT" not in said:
                line = await asyncio.wait_for(proc.stderr.readline(), WAIT)
                assert line, f"the client ended without forwarding SIGINT: {said!r}"
                said += line
            release.set()
            await asyncio.wait_for(asyncio.shield(job.done), WAIT)
            assert job.exit_notice()["signal"] == signal.SIGINT
            await asyncio.wait_for(proc.wait(), WAIT)
            assert proc.returncode == 128 + signal.SIGINT
        finally:
            release.set()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_a_closed_stdout_stops_the_remote_writer_as_a_local_pipe_would(
    tmp_path: Path, client_home: Path, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        line = shlex.join([*CLI, "exec", host(agent), "--", "seq", "100000000"])
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", f'{line} | head -2; echo "status ${{PIPESTATUS[0]}}"',
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(client_home),
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), WAIT)
        assert out == b"1\n2\nstatus 141\n", err
        assert b"Traceback" not in err and b"BrokenPipe" not in err
        job = next(iter(agent.agent.jobs.jobs.values()))
        await asyncio.wait_for(asyncio.shield(job.done), WAIT)
        assert job.exit_notice()["signal"] == signal.SIGPIPE


async def test_ctrl_c_escalates_to_sigterm_then_sigkill(
    tmp_path: Path, client_home: Path, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "exec", host(agent), "--", "sh", "-c", "trap '' INT TERM; echo ready; sleep 100",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=cli_env(client_home),
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        assert await asyncio.wait_for(proc.stdout.readline(), WAIT) == b"ready\n"
        for name in ("SIGINT", "SIGTERM", "SIGKILL"):
            proc.send_signal(signal.SIGINT)
            while True:  # the client says what it sent before we press again
                line = await asyncio.wait_for(proc.stderr.readline(), WAIT)
                assert line, f"no word about {name}"
                if f"sending {name}".encode() in line:
                    break
        await asyncio.wait_for(proc.wait(), WAIT)
        assert proc.returncode == 128 + signal.SIGKILL
        signals = [e["signal"] for e in agent.audit() if e["event"] == "signal"]
        assert signals == [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]


async def test_fan_out_to_20_agents_with_one_failing(
    tmp_path: Path, client_home: Path, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    async with contextlib_agents(tmp_path, server_identity, authorized, 19) as agents:
        with socket.socket() as s:  # a port where nothing listens: the failing host
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"
        hosts = [host(a) for a in agents[:10]] + [dead] + [host(a) for a in agents[10:]]
        log = tmp_path / "concurrency"
        script = f"echo start >> {log}; echo one; echo two >&2; sleep 0.2; echo end >> {log}"
        code, out, err = await cli(
            client_home, "exec", ",".join(hosts), "--fanout", "5", "--", "sh", "-c", script
        )
    running = peak = 0
    for event in log.read_text().split():
        running += 1 if event == "start" else -1
        peak = max(peak, running)
    assert 2 <= peak <= 5, f"--fanout 5 ran {peak} at once"
    assert code == 255
    out_lines = out.decode().splitlines()
    assert sorted(out_lines) == sorted(f"{h}: one" for h in hosts if h != dead)
    summary = err.decode()
    for h in hosts:
        state = r"unreachable\s+no session" if h == dead else r"done\s+0"
        assert re.search(rf"^{re.escape(h)}\s+{state}\b", summary, re.M), summary
    assert "refused" in summary
    assert "20 host(s): " in summary and "19 done" in summary and "1 unreachable" in summary
    assert sum(1 for line in summary.splitlines() if line.endswith(": two")) == 19


class contextlib_agents:  # noqa: N801 (used as a context manager, like contextlib's)
    """Start ``count`` agents at once."""

    def __init__(self, base: Path, identity: Identity, authorized: AuthorizedKeys, count: int) -> None:
        self.managers = [running_agent(base, identity, authorized) for _ in range(count)]

    async def __aenter__(self) -> list[RunningAgent]:
        return [await m.__aenter__() for m in self.managers]

    async def __aexit__(self, *exc: object) -> None:
        for m in self.managers:
            await m.__aexit__(None, None, None)


async def test_put_and_get_are_checksummed_and_resume(
    tmp_path: Path, client_home: Path, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    remote = tmp_path / "remote"
    remote.mkdir()
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        # an upload cut after 1 MiB left a partial file: put resumes from it
        (remote / f".copy.bin.korinet-part-{sha[:16]}").write_bytes(data[: 1024 * 1024])
        code, out, err = await cli(client_home, "put", host(agent), str(source), str(remote / "copy.bin"))
        assert code == 0, err
        assert (remote / "copy.bin").read_bytes() == data and b"verified" in out
        assert not list(remote.glob(".*korinet-part*"))
        # a partial download with wrong bytes is caught by the checksum, then redone whole
        local = tmp_path / "back.bin"
        (tmp_path / f".back.bin.korinet-part-{sha[:16]}").write_bytes(b"\0" * 1000)
        code, out, err = await cli(client_home, "get", host(agent), str(remote / "copy.bin"), str(local))
        assert code == 255 and b"checksum mismatch" in err and not local.exists()
        code, out, err = await cli(client_home, "get", host(agent), str(remote / "copy.bin"), str(local))
        assert code == 0, err
        assert local.read_bytes() == data
        events = [e["event"] for e in agent.audit()]
        assert "put" in events and "put-done" in events and "get" in events


async def test_status_jobs_and_attach(
    tmp_path: Path, client_home: Path, server_identity: Identity, authorized: AuthorizedKeys, alice: Identity
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        code, out, _ = await cli(client_home, "status", host(agent))
        assert code == 0 and b"load" in out and b"memory" in out and b"disk    /" in out
        # a job started by one client and abandoned; another terminal attaches to it
        code, _, _ = await cli(client_home, "exec", host(agent), "--", "sh", "-c", "echo started")
        code, out, _ = await cli(client_home, "jobs", host(agent))
        assert code == 0 and b"exited" in out and b"sh -c 'echo started'" in out
        from admin_helpers import Collector, connect

        conn = await connect(agent.target, alice, tmp_path)
        seen = Collector()
        run: JobRun = await conn.exec(
            ["sh", "-c", "echo early; sleep 1; echo late; exit 5"], seen, stdin=False
        )
        for _ in range(int(200 * TIMEOUT_FACTOR)):
            if seen.out:
                break
            await asyncio.sleep(0.01)
        assert seen.out == b"early\n"
        await conn.client.abort()  # the laptop closes: no goodbye
        await conn.close()
        # another terminal attaches: all the output (the agent keeps it), then the exit;
        # --from continues after what that first client had
        code, out, err = await cli(client_home, "attach", host(agent), run.id)
        assert (code, out, err) == (5, b"early\nlate\n", b"")
        code, out, err = await cli(client_home, "attach", host(agent), run.id, "--from", "6,0")
        assert (code, out, err) == (5, b"late\n", b"")


async def test_usage_errors_and_unreachable_hosts_are_reported_without_tracebacks(
    tmp_path: Path, client_home: Path
) -> None:
    code, out, _ = await cli(client_home, "--help")
    assert code == 0 and b"exec" in out and b"agent" in out
    code, _, err = await cli(client_home, "exec", "127.0.0.1")
    assert code == 2 and b"needs a command" in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = await cli(client_home, "exec", f"127.0.0.1:{port}", "--", "true")
    assert code == 255 and b"refused (is the agent running?)" in err and b"Traceback" not in err
    code, _, err = await cli(client_home, "exec", "no-such-host.invalid", "--", "true")
    assert code == 255 and b"cannot resolve no-such-host.invalid" in err and b"Traceback" not in err
    code, _, err = await cli(client_home, "exec", "a,,b", "--", "true")
    assert code == 2 and b"an empty item" in err and b"Traceback" not in err


async def test_the_agent_command_serves_stops_cleanly_and_keeps_plaintext_on_loopback(
    tmp_path: Path, client_home: Path, alice: Identity
) -> None:
    agent_home = tmp_path / "agent-home"
    AuthorizedKeys(agent_home / "authorized_keys").authorize(alice.fingerprint, "alice", ["admin"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = tmp_path / "agent-state"
    agent = await asyncio.create_subprocess_exec(
        *CLI, "agent", f"127.0.0.1:{port}", "--state-dir", str(state),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(agent_home),
    )  # fmt: skip
    try:
        assert agent.stdout is not None
        banner = b""
        while b"audit log" not in banner:
            line = await asyncio.wait_for(agent.stdout.readline(), WAIT)
            assert line, "the agent exited early"
            banner += line
        assert b"TLS 1.3" in banner and b"1 authorized key(s)" in banner
        code, out, err = await cli(client_home, "exec", f"127.0.0.1:{port}", "--", "echo", "served")
        assert (code, out) == (0, b"served\n"), err
    finally:
        agent.send_signal(signal.SIGTERM)
        await asyncio.wait_for(agent.wait(), WAIT)
    assert agent.returncode == 0
    events = [json.loads(line)["event"] for line in (state / "audit.log").read_text().splitlines()]
    assert events[0] == "agent-started" and events[-1] == "agent-stopped" and "exec" in events
    code, _, err = await cli(
        agent_home, "agent", "0.0.0.0:0", "--insecure-plaintext", "--state-dir", str(state)
    )
    assert code == 2 and b"loopback only" in err


def test_every_command_s_help_says_what_it_does() -> None:
    """`korinet-admin COMMAND --help` answers more than its usage line: a description."""
    from korinet_admin.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) >= set("exec hosts attach jobs status put get agent relay".split())
    for name, sub in commands.choices.items():
        assert sub.description and len(sub.description) > 40, f"`korinet-admin {name} --help`: no description"
    hosts_help = " ".join(commands.choices["hosts"].format_help().split())
    assert "hosts.toml" in hosts_help and "RELAY" in hosts_help and "LAST SEEN" in hosts_help
