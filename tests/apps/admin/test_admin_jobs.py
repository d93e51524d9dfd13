"""Jobs that survive the agent, clients that say when the agent is gone, output kept
for re-attaching, and attach telling the truth about what is gone.

Agents that get killed run as subprocesses (``korinet-admin agent --insecure-plaintext``
on a loopback port the kernel chooses); every wait is for an event (a process that
ended, a file that appeared, bytes that arrived), with a generous deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from admin_helpers import CLI, Collector, cli_env, running_agent
from korinet_admin.execclient import AdminConnection, Target
from korinet_admin.protocol import exit_status
from testutil import TIMEOUT_FACTOR

pytestmark = pytest.mark.timeout(120 * TIMEOUT_FACTOR)

WAIT = 30 * TIMEOUT_FACTOR
JOB = "0123456789abcdef0123456789abcdef"


def two_part_writer(marker: Path, first: int, second: int, code: int = 7) -> tuple[list[str], bytes]:
    """A command writing ``first`` seeded random bytes, then (once ``marker`` exists)
    ``second`` more, a line on stderr after each part, and exiting with ``code``;
    and the stdout it writes."""
    script = (
        "import os, random, sys, time\n"
        "r = random.Random(11)\n"
        f"sys.stdout.buffer.write(r.randbytes({first})); sys.stdout.buffer.flush()\n"
        "print('first part', file=sys.stderr, flush=True)\n"
        "end = time.monotonic() + 120\n"
        f"while not os.path.exists({str(marker)!r}) and time.monotonic() < end: time.sleep(0.01)\n"
        f"sys.stdout.buffer.write(r.randbytes({second})); sys.stdout.buffer.flush()\n"
        "print('second part', file=sys.stderr, flush=True)\n"
        f"sys.exit({code})\n"
    )
    r = random.Random(11)
    expected = r.randbytes(first) + r.randbytes(second)
    return [sys.executable, "-c", script], expected


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait for ``condition`` (checked every few ms), failing with ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class AgentProcess:
    """``korinet-admin agent`` as a subprocess over ``state``."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path, banner: bytes) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.banner = banner

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def kill(self, sig: int = signal.SIGKILL) -> bytes:
        """Signal the agent and wait until it is dead; returns what it printed since."""
        self.proc.send_signal(sig)
        assert self.proc.stdout is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), WAIT)
        await asyncio.wait_for(self.proc.wait(), WAIT)
        return rest


async def start_agent(state: Path, home: Path, port: int = 0) -> AgentProcess:
    log = state.parent / f"{state.name}-agent.log"
    with open(log, "ab") as err:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "-v", "agent", f"127.0.0.1:{port}", "--insecure-plaintext", "--state-dir", str(state),
            stdout=subprocess.PIPE, stderr=err, env=cli_env(home),
        )  # fmt: skip
    assert proc.stdout is not None
    banner = b""
    while b"audit log" not in banner:
        line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
        assert line, f"the agent exited early: {log.read_text()}"
        banner += line
    match = re.search(rb"agent on 127\.0\.0\.1:(\d+)", banner)
    assert match, banner
    return AgentProcess(proc, int(match.group(1)), log, banner)


@contextlib.asynccontextmanager
async def agent_dir(tmp_path: Path) -> AsyncIterator[Path]:
    """A state directory whose jobs are all killed at the end (they outlive agents)."""
    state = tmp_path / "state"
    try:
        yield state
    finally:
        for info in state.glob("jobs/*/supervisor.json"):
            child = json.loads(info.read_text()).get("child")
            if child:
                with contextlib.suppress(OSError):
                    os.killpg(child, signal.SIGKILL)


async def cli(home: Path, command: str, *args: str) -> tuple[int, bytes, bytes]:
    """``korinet-admin COMMAND --insecure-plaintext ARGS``: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, command, "--insecure-plaintext", *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(home),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode is not None
    # the warning every --insecure-plaintext client prints is not what these tests read
    lines = err.splitlines(keepends=True)
    return proc.returncode, out, b"".join(line for line in lines if b"WARNING: --insecure" not in line)


async def plain_connection(port: int, **kwargs: object) -> AdminConnection:
    return await AdminConnection.open(Target("127.0.0.1", port), tls=None, open_timeout=10, **kwargs)  # type: ignore[arg-type]


def status_file(state: Path, job: str) -> Path:
    return state / "jobs" / job / "status.json"


# ---------------------------------------------------------------------- surviving the agent


async def test_agent_killed_mid_job_then_restarted_loses_nothing(tmp_path: Path, home: Path) -> None:
    """kill -9 of the agent mid-output: the job runs on and finishes alone; an agent
    started again over the same state directory adopts it, and a client re-attaching
    from its offsets gets the rest byte-identical, with the right exit code."""
    marker = tmp_path / "go"
    argv, expected = two_part_writer(marker, 3_000_000, 2_000_000)
    async with agent_dir(tmp_path) as state:
        agent = await start_agent(state, home)
        conn = await plain_connection(agent.port)
        sink = Collector()
        try:
            run = await conn.exec(argv, sink, job_id=JOB, stdin=False)
            await until(lambda: len(sink.out) == 3_000_000 and sink.err == b"first part\n", "the first part")
            await agent.kill(signal.SIGKILL)
            pid = run.reply["pid"]
            os.kill(pid, 0)  # the command outlived its agent
        finally:
            await conn.client.abort()
            await conn.close()
        marker.touch()  # the command finishes while no agent runs
        await until(status_file(state, JOB).exists, "the job's exit status")
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

        agent = await start_agent(state, home)
        try:
            have = f"{len(sink.out)},{len(sink.err)}"
            code, out, err = await cli(home, "attach", agent.host, JOB, "--from", have)
            assert code == 7, err
            assert sink.out + out == expected
            assert err.endswith(b"second part\n") and b"no longer kept" not in err
            # from the start: every byte, the agent never needed the first client
            code, out, err = await cli(home, "attach", agent.host, JOB, "--from", "0,0")
            assert (code, out) == (7, expected)
            assert err.endswith(b"first part\nsecond part\n")
        finally:
            await agent.kill(signal.SIGTERM)
        assert b"Traceback" not in agent.log.read_bytes()


async def test_a_job_keeps_running_across_an_agent_upgrade(tmp_path: Path, home: Path) -> None:
    """The agent is stopped (as for an upgrade) and started again on the same port while
    a client follows a job: the job never notices, and the client carries on in a new
    session from the bytes it has."""
    marker = tmp_path / "go"
    argv, expected = two_part_writer(marker, 1_500_000, 2_500_000, code=3)
    async with agent_dir(tmp_path) as state:
        agent = await start_agent(state, home)
        conn = await plain_connection(agent.port, backoff_cap=0.2)
        sink = Collector()
        try:
            run = await conn.exec(argv, sink, job_id=JOB, stdin=False)
            await until(lambda: len(sink.out) == 1_500_000, "the first part")
            said = await agent.kill(signal.SIGTERM)
            assert b"1 running job(s) keep running" in said
            agent = await start_agent(state, home, agent.port)
            assert b"jobs: 1 kept from an earlier agent, 1 of them running" in agent.banner
            marker.touch()
            notice = await run.wait(WAIT)
        finally:
            await conn.close()
            await agent.kill(signal.SIGTERM)
        assert exit_status(notice) == 3 and run.exit_notices == 1
        assert sink.out == expected and sink.err == b"first part\nsecond part\n"
        audit = [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]
        assert [e["running"] for e in audit if e["event"] == "adopted"] == [1]
        assert [e["code"] for e in audit if e["event"] == "exit"] == [3]


async def test_stdin_survives_an_agent_killed_between_two_chunks(tmp_path: Path, home: Path) -> None:
    """Stdin the agent answered for is in the command's pipe, which outlives the agent;
    what the client sends while the agent is dead goes to the next agent, once."""
    async with agent_dir(tmp_path) as state:
        agent = await start_agent(state, home)
        conn = await plain_connection(agent.port, backoff_cap=0.2)
        sink = Collector()
        try:
            run = await conn.exec(["sh", "-c", "read a; echo got $a; cat"], sink, job_id=JOB)
            await run.send_stdin(b"one\ntwo\n")
            await until(lambda: sink.out == b"got one\ntwo\n", "the first chunk echoed")
            await agent.kill(signal.SIGKILL)
            sending = asyncio.ensure_future(run.send_stdin(b"three\n", eof=True))
            agent = await start_agent(state, home, agent.port)
            await asyncio.wait_for(sending, WAIT)
            notice = await run.wait(WAIT)
        finally:
            await conn.close()
            await agent.kill(signal.SIGTERM)
        assert exit_status(notice) == 0
        assert sink.out == b"got one\ntwo\nthree\n"


async def test_the_client_gives_up_after_its_outage_limit_and_says_how_to_resume(
    tmp_path: Path, home: Path
) -> None:
    async with agent_dir(tmp_path) as state:
        agent = await start_agent(state, home)
        client = await asyncio.create_subprocess_exec(
            *CLI, "exec", agent.host, "--insecure-plaintext", "--outage-limit", "1", "--job", JOB,
            "--", "sh", "-c", "echo started; exec sleep 300",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(home),
        )  # fmt: skip
        assert client.stdout is not None
        assert await asyncio.wait_for(client.stdout.readline(), WAIT) == b"started\n"
        await agent.kill(signal.SIGKILL)  # dead: nothing answers on its port now
        _, err = await asyncio.wait_for(client.communicate(), WAIT)
        assert client.returncode == 255, err
        text = err.decode()
        assert "reconnecting for up to 1 s, the command keeps running" in text
        assert (
            f"agent unreachable for 1 s; job {JOB} keeps running on the host; "
            f"`korinet-admin attach {agent.host} {JOB}` to resume"
        ) in text
        assert "Traceback" not in text
        pid = json.loads((state / "jobs" / JOB / "supervisor.json").read_text())["child"]
        os.kill(pid, 0)  # and it does keep running
        # an agent started again adopts it, and a signal still reaches it (through its supervisor)
        agent = await start_agent(state, home)
        conn = await plain_connection(agent.port)
        try:
            sink = Collector()
            run = await conn.attach(JOB, sink, [0, 0])
            assert await run.signal(signal.SIGTERM)
            assert exit_status(await run.wait(WAIT)) == 128 + signal.SIGTERM
            assert sink.out == b"started\n"
        finally:
            await conn.close()
            await agent.kill(signal.SIGTERM)


# ---------------------------------------------------------------------- retention and honest attach


async def test_a_client_killed_mid_output_resumes_from_its_file(tmp_path: Path, home: Path) -> None:
    """kill -9 of the client while output arrives: `attach --from <bytes in its output
    file>` gives the rest, byte-identical."""
    marker = tmp_path / "go"
    argv, expected = two_part_writer(marker, 4_000_000, 1_000_000, code=0)
    output = tmp_path / "out.bin"
    async with agent_dir(tmp_path) as state:
        agent = await start_agent(state, home)
        try:
            with open(output, "wb") as out_file:
                client = await asyncio.create_subprocess_exec(
                    *CLI, "exec", agent.host, "--insecure-plaintext", "--job", JOB, "--", *argv,
                    stdin=subprocess.DEVNULL, stdout=out_file, stderr=subprocess.DEVNULL, env=cli_env(home),
                )  # fmt: skip
                await until(lambda: output.stat().st_size > 0, "some output in the client's file")
                client.kill()
                await asyncio.wait_for(client.wait(), WAIT)
            have = output.stat().st_size
            marker.touch()
            await until(status_file(state, JOB).exists, "the job's end")
            code, out, err = await cli(home, "attach", agent.host, JOB, "--from", f"{have},0")
            assert code == 0, err
            assert output.read_bytes() + out == expected
            assert b"no longer kept" not in err
        finally:
            await agent.kill(signal.SIGTERM)


async def test_attach_says_how_many_bytes_are_gone_and_from_where_it_shows(
    tmp_path: Path, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After collection, attach --from 0,0 shows what is kept; bytes beyond the per-job
    cap are gone and the notice says how many; a job past its retention period is
    gone with a one-line log on the agent, no traceback."""
    async with running_agent(tmp_path, None, None, job_cap=1000) as agent:
        host = f"127.0.0.1:{agent.port}"
        code, out, err = await cli(home, "exec", host, "--job", JOB, "--", "head", "-c", "5000", "/dev/zero")
        assert (code, len(out)) == (0, 5000), err
        job = agent.agent.jobs.jobs[JOB]
        await until(lambda: job.exit_delivered and job.held <= 1000, "collection and the cap")
        code, out, err = await cli(home, "attach", host, JOB, "--from", "0,0")
        assert (code, out) == (0, b"\0" * 1000)
        assert err.decode() == (
            f"korinet-admin: {host}: 4,000 bytes of stdout are no longer kept on the host "
            "(over the 1,000 bytes kept per job); showing from byte 4,000\n"
        )
        # what is kept, from an offset within it: no notice
        code, out, err = await cli(home, "attach", host, JOB, "--from", "4500,0")
        assert (code, out, err) == (0, b"\0" * 500, b"")
    async with running_agent(tmp_path, None, None, retention=0.1) as agent:
        host = f"127.0.0.1:{agent.port}"
        code, _, err = await cli(home, "exec", host, "--job", JOB, "--", "true")
        assert code == 0, err
        await until(lambda: JOB not in agent.agent.jobs.jobs, "the end of the retention period")
        assert not (agent.agent.state_dir / "jobs" / JOB).exists()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code, out, err = await cli(home, "attach", host, JOB)
        assert code == 255 and out == b""
        assert b"is no longer kept on the host" in err and b"its output is gone" in err
        refusals = [r for r in caplog.records if "refused" in r.getMessage() and JOB in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].exc_info is None
        assert not [r for r in caplog.records if r.exc_info], "a traceback for an ordinary lookup"


async def test_a_job_id_reused_with_another_command_is_an_error_naming_both(
    tmp_path: Path, home: Path
) -> None:
    async with running_agent(tmp_path, None, None) as agent:
        host = f"127.0.0.1:{agent.port}"
        code, out, _ = await cli(home, "exec", host, "--job", JOB, "--", "echo", "one")
        assert (code, out) == (0, b"one\n")
        code, out, err = await cli(home, "exec", host, "--job", JOB, "--", "echo", "two")
        assert code == 255 and out == b""
        assert b"runs `echo one`, not `echo two`" in err, err
        # the same command again is a retry: it attaches (and shows the kept output)
        code, out, _ = await cli(home, "exec", host, "--job", JOB, "--", "echo", "one")
        assert (code, out) == (0, b"one\n")
        execs = [e for e in agent.audit() if e["event"] == "exec"]
        assert [e["decision"] for e in execs] == ["allowed", "attached"]


async def test_the_total_cap_discards_the_oldest_acknowledged_output_first(
    tmp_path: Path, home: Path
) -> None:
    async with running_agent(tmp_path, None, None, total_cap=3000) as agent:
        host = f"127.0.0.1:{agent.port}"
        ids = ["a" * 32, "b" * 32]
        for job_id in ids:
            code, out, err = await cli(
                home, "exec", host, "--job", job_id, "--", "head", "-c", "2000", "/dev/zero"
            )
            assert (code, len(out)) == (0, 2000), err
        table = agent.agent.jobs
        await until(lambda: all(table.jobs[i].exit_delivered for i in ids), "collection")
        table.enforce_caps()  # what the agent's periodic sweep does
        old, new = (table.jobs[i] for i in ids)
        assert (old.out.start, new.out.start) == (1000, 0)
        code, out, err = await cli(home, "attach", host, ids[0], "--from", "0,0")
        assert (code, len(out)) == (0, 1000)
        assert err.decode().endswith(
            "1,000 bytes of stdout are no longer kept on the host (over the 3,000 bytes kept for all jobs); "
            "showing from byte 1,000\n"
        )


def test_the_cli_shows_the_defaults_the_agent_and_client_use() -> None:
    """cli.py repeats a few defaults so that --help needs no heavy import: they agree."""
    from korinet_admin import cli, jobs, protocol, runner

    assert cli.OUTAGE_LIMIT == runner.OUTAGE_LIMIT
    assert cli.DEFAULT_RELAY_PORT == protocol.DEFAULT_RELAY_PORT
    assert (cli.RETENTION, cli.JOB_CAP, cli.TOTAL_CAP) == (jobs.RETENTION, jobs.JOB_CAP, jobs.TOTAL_CAP)
    assert [cli._size_arg(t) for t in ("500M", "2G", "1024", "1.5k")] == [500 << 20, 2 << 30, 1024, 1536]
    with pytest.raises(Exception, match="not a size"):
        cli._size_arg("lots")


async def test_job_files_are_private(tmp_path: Path, home: Path) -> None:
    old = os.umask(0o022)  # the modes must not depend on a careful umask
    try:
        async with running_agent(tmp_path, None, None) as agent:
            host = f"127.0.0.1:{agent.port}"
            code, _, err = await cli(home, "exec", host, "--job", JOB, "--", "sh", "-c", "echo o; echo e >&2")
            assert code == 0, err
            state = agent.agent.state_dir
            job_dir = state / "jobs" / JOB
            await until(lambda: agent.agent.jobs.jobs[JOB].exit_delivered, "collection")
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in job_dir.iterdir()}
            assert {"stdout", "stderr", "spec.json", "status.json", "state.json", "control"} <= set(modes)
            assert all(mode == 0o600 for mode in modes.values()), modes
            assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700
            assert stat.S_IMODE((state / "jobs").stat().st_mode) == 0o700
            assert stat.S_IMODE((state / "job-ids").stat().st_mode) == 0o600
    finally:
        os.umask(old)


async def test_a_full_table_makes_room_by_the_job_collected_longest_ago(tmp_path: Path) -> None:
    from korinet_admin.jobs import JobSpec, JobTable

    table = JobTable(tmp_path / "state", max_jobs=2)
    try:
        first, _ = await table.submit(JobSpec("1" * 32, ["true"], "me", "me", stdin=False))
        second, _ = await table.submit(JobSpec("2" * 32, ["true"], "me", "me", stdin=False))
        await asyncio.wait_for(asyncio.gather(first.done, second.done), WAIT)
        with pytest.raises(RuntimeError, match="try again later"):  # nothing collected yet
            await table.submit(JobSpec("3" * 32, ["true"], "me", "me", stdin=False))
        table.collected(second)
        third, created = await table.submit(JobSpec("4" * 32, ["true"], "me", "me", stdin=False))
        assert created and set(table.jobs) == {first.id, third.id}
        assert not second.dir.exists()
    finally:
        table.close()


async def test_a_job_whose_supervisor_is_killed_ends_with_an_unknown_status(tmp_path: Path) -> None:
    async with running_agent(tmp_path, None, None) as agent:
        conn = await plain_connection(agent.port)
        sink = Collector()
        try:
            run = await conn.exec(["sh", "-c", "echo hi; exec sleep 300"], sink, job_id=JOB, stdin=False)
            await until(lambda: sink.out == b"hi\n", "the first line")
            job = agent.agent.jobs.jobs[JOB]
            assert job.supervisor_pid is not None and job.pid is not None
            os.kill(job.supervisor_pid, signal.SIGKILL)
            notice = await run.wait(WAIT)
        finally:
            await conn.close()
            if job.pid is not None:
                with contextlib.suppress(OSError):
                    os.killpg(job.pid, signal.SIGKILL)
        assert exit_status(notice) == 255
        assert notice["error"].startswith("the job's exit status is unknown: its supervisor ended")


async def test_a_job_caught_starting_by_an_agent_restart_is_followed_once_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent stopped between writing a job and its supervisor's start: the next agent
    waits for the supervisor (up to the start timeout), then follows the job; a job whose
    supervisor never comes ends as lost."""
    import time

    from korinet_admin import supervisor as sv
    from korinet_admin.jobs import JobTable

    monkeypatch.setattr("korinet_admin.jobs.START_TIMEOUT", 5.0 * TIMEOUT_FACTOR)
    state = tmp_path / "state"
    for job_id, argv in (("c" * 32, ["sh", "-c", "echo late start; exit 4"]), ("d" * 32, ["true"])):
        job_dir = state / "jobs" / job_id
        job_dir.mkdir(parents=True)
        spec = {"job_id": job_id, "argv": argv, "owner": "me", "owner_name": "me", "stdin": False}
        sv.write_json(job_dir / sv.SPEC, {**spec, "started": time.time()})
        for fifo in (sv.CONTROL, sv.EVENTS):
            os.mkfifo(job_dir / fifo, 0o600)
    table = JobTable(state)
    try:
        table.adopt()
        late, never = table.jobs["c" * 32], table.jobs["d" * 32]
        assert not late.done.done() and not never.done.done()
        # its supervisor starts now (as the dead agent's launcher would still do)
        supervisor = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "korinet_admin.supervisor", str(late.dir), env=cli_env(tmp_path)
        )
        await asyncio.wait_for(asyncio.shield(late.done), WAIT)
        await asyncio.wait_for(supervisor.wait(), WAIT)
        assert late.returncode == 4 and late.out.read(0, 100) == b"late start\n"
        await asyncio.wait_for(asyncio.shield(never.done), WAIT)
        assert never.error is not None and "did not start the command in time" in never.error
    finally:
        table.close()


async def test_a_dead_launcher_is_started_again_for_the_next_job(tmp_path: Path) -> None:
    from korinet_admin.jobs import JobSpec, JobTable

    table = JobTable(tmp_path / "state")
    try:
        table.adopt()  # starts the launcher
        proc = table.launcher._proc
        assert proc is not None
        proc.kill()
        proc.wait()
        job, _ = await table.submit(JobSpec("5" * 32, ["sh", "-c", "exit 3"], "me", "me", stdin=False))
        await asyncio.wait_for(asyncio.shield(job.done), WAIT)
        assert job.returncode == 3 and table.launcher._proc is not proc
    finally:
        table.close()
