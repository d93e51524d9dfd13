"""exec through the client API against real agents on loopback, over TLS: exit codes,
streams, stdin, signals, timeouts, job ids, refusals and the audit log."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest
from admin_helpers import Collector, connect, running_agent
from korinet_admin.policy import Policy
from korinet_admin.protocol import exit_status
from testutil import TIMEOUT_FACTOR

from korinet import AuthenticationError, MessageRejected
from korinet.security import AuthorizedKeys, Identity

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)

WAIT = 10 * TIMEOUT_FACTOR


async def run(conn, argv: list[str], **kwargs) -> tuple[int, Collector, dict]:  # type: ignore[no-untyped-def]
    sink = Collector()
    job = await conn.exec(argv, sink, stdin=kwargs.pop("stdin", False), **kwargs)
    notice = await job.wait(WAIT)
    return exit_status(notice), sink, notice


async def test_exit_codes_and_separate_streams(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        conn = await connect(agent.target, alice, tmp_path)
        try:
            for code in (0, 1, 42):
                status, sink, _ = await run(conn, ["sh", "-c", f"echo out; echo err >&2; exit {code}"])
                assert status == code
                assert sink.out == b"out\n" and sink.err == b"err\n"
            status, _, notice = await run(conn, ["sh", "-c", "kill -KILL $$"])
            assert status == 128 + signal.SIGKILL and notice["signal"] == signal.SIGKILL
            status, _, notice = await run(conn, ["sh", "-c", "kill -TERM $$"])
            assert status == 128 + signal.SIGTERM
            status, sink, notice = await run(conn, ["/no/such/command"])
            assert status == 127 and "No such file" in notice["error"] and b"cannot run" in sink.err
            # binary output, unchanged
            blob = bytes(range(256)) * 64
            script = f"import sys; sys.stdout.buffer.write({blob!r})"
            status, sink, _ = await run(conn, [sys.executable, "-c", script])
            assert status == 0 and sink.out == blob and sink.err == b""
        finally:
            await conn.close()


async def test_stdin_is_forwarded_with_its_eof(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        conn = await connect(agent.target, alice, tmp_path)
        try:
            sink = Collector()
            job = await conn.exec(["sh", "-c", "wc -c; echo done"], sink, stdin=True)
            payload = bytes(range(256)) * 2000  # 512 KB: several requests
            for i in range(0, len(payload), 100_000):
                await job.send_stdin(payload[i : i + 100_000])
            await job.send_stdin(b"", eof=True)
            notice = await job.wait(WAIT)
            assert exit_status(notice) == 0
            assert sink.out.split() == [str(len(payload)).encode(), b"done"]
            # a repeated chunk (as after a new session) is not written twice
            sink = Collector()
            job = await conn.exec(["cat"], sink, stdin=True)
            await job.send_stdin(b"hello ")
            job.stdin_offset = 0  # pretend we never heard back: send it again, then more
            await job.send_stdin(b"hello world", eof=True)
            await job.wait(WAIT)
            assert sink.out == b"hello world"
        finally:
            await conn.close()


async def test_a_command_that_leaves_its_stdin_open_at_the_client_still_finishes(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    """The client never sends EOF; the command reads one line and exits: the agent's
    end of the stdin pipe closes under it, and the job still ends."""
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        conn = await connect(agent.target, alice, tmp_path)
        try:
            for _ in range(3):
                sink = Collector()
                job = await conn.exec(["sh", "-c", "read x; echo got $x"], sink)
                await job.send_stdin(b"a\n")
                assert exit_status(await job.wait(WAIT)) == 0
                assert sink.out == b"got a\n"
        finally:
            await conn.close()


async def test_signals_reach_the_process_group(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        conn = await connect(agent.target, alice, tmp_path)
        try:
            sink = Collector()
            # The shell waits for its child: both must get the signal (a process group).
            # "ready" comes from the child itself once it runs its own code, so the
            # signal cannot land in the instant between the shell's fork and the
            # child's exec (where a terminal's Ctrl-C can be lost too).
            child = f"{sys.executable} -c 'import time; print(\"ready\", flush=True); time.sleep(100)'"
            job = await conn.exec(["sh", "-c", f"{child}; echo not reached"], sink, stdin=False)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT
            while not sink.out and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert await job.signal(signal.SIGINT)
            notice = await job.wait(WAIT)  # well before the child's 100 s sleep ends
            assert exit_status(notice) == 128 + signal.SIGINT
            assert sink.out == b"ready\n"
        finally:
            await conn.close()


async def test_timeout_kills_and_says_so(
    tmp_path: Path,
    server_identity: Identity,
    alice: Identity,
    authorized: AuthorizedKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("korinet_admin.jobs.KILL_GRACE", 0.3)  # SIGTERM to SIGKILL
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        conn = await connect(agent.target, alice, tmp_path)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            status, _, notice = await run(conn, ["sleep", "100"], timeout=0.3)
            assert notice["timed_out"] and status == 124
            assert loop.time() - started < 3 * TIMEOUT_FACTOR
            # a command that ignores SIGTERM is killed after the grace period
            status, _, notice = await run(conn, ["sh", "-c", "trap '' TERM; sleep 100"], timeout=0.2)
            assert notice["timed_out"] and notice["signal"] == signal.SIGKILL
            exits = [e for e in agent.audit() if e["event"] == "exit"]
            assert exits[-1]["timed_out"] is True
        finally:
            await conn.close()


async def test_a_resubmitted_job_id_runs_once(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    marker = tmp_path / "ran"
    argv = ["sh", "-c", f"echo x >> {marker}; echo output"]
    job_id = "f" * 32
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        first = await connect(agent.target, alice, tmp_path)
        second = await connect(agent.target, alice, tmp_path)
        try:
            sink1, sink2 = Collector(), Collector()
            job1 = await first.exec(argv, sink1, job_id=job_id, stdin=False)
            assert job1.reply["created"] is True
            assert exit_status(await job1.wait(WAIT)) == 0
            # the same id again, from another session (a retry after a lost reply): attached
            job2 = await second.exec(argv, sink2, job_id=job_id, stdin=False)
            assert job2.reply["created"] is False
            assert exit_status(await job2.wait(WAIT)) == 0
            # concurrently twice on one session as well
            sink3 = Collector()
            racing = "e" * 32
            jobs = await asyncio.gather(
                first.exec(argv, sink3, job_id=racing, stdin=False),
                second.exec(argv, Collector(), job_id=racing, stdin=False),
            )
            await asyncio.gather(*(j.wait(WAIT) for j in jobs))
            assert sorted(j.reply["created"] for j in jobs) == [False, True]
        finally:
            await first.close()
            await second.close()
        assert marker.read_text() == "x\n" * 2, "a job id ran more than once"
        # the output is kept after the first session acknowledged it: the second gets it all
        assert sink1.out == b"output\n" and sink2.out == b"output\n" and job2.skipped == [0, 0]
        assert [e.get("resubmitted") for e in agent.audit() if e["event"] == "exec"].count(True) == 2
    # an agent restarted over the same state directory adopts the finished job, and once
    # it is removed (as the retention period does) refuses to run its id again
    state = agent.agent.state_dir
    from korinet_admin.jobs import JobSpec, JobTable, UnknownJob

    table = JobTable(state)
    table.adopt()
    assert table.jobs[job_id].done.done() and table.jobs[job_id].returncode == 0
    assert table.jobs[job_id].out._fd is None, "a finished job holds no descriptor"
    assert table.jobs[job_id].out.read(0, 100) == b"output\n"
    table.remove(job_id)
    assert not (state / "jobs" / job_id).exists()
    with pytest.raises(UnknownJob, match="already ran"):
        await table.submit(JobSpec(job_id, argv, "x", "x"))
    table.close()


async def test_another_identitys_job_cannot_be_touched(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    carol = Identity.generate()
    authorized.authorize(carol.fingerprint, "carol", ["admin"])
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        mine = await connect(agent.target, alice, tmp_path)
        theirs = await connect(agent.target, carol, tmp_path)
        try:
            job = await mine.exec(["sleep", "100"], Collector(), stdin=False)
            with pytest.raises(MessageRejected, match="another identity"):
                await theirs.attach(job.id, Collector(), [0, 0])
            with pytest.raises(MessageRejected, match="another identity"):
                await theirs.exec(["true"], Collector(), job_id=job.id, stdin=False)
            assert await theirs.request({}, "admin.jobs") == []
            assert [j["job"] for j in await mine.request({}, "admin.jobs")] == [job.id]
            await job.signal(signal.SIGKILL)
            await job.wait(WAIT)
        finally:
            await mine.close()
            await theirs.close()


async def test_unauthenticated_and_role_less_clients_run_nothing_and_are_audited(
    tmp_path: Path, server_identity: Identity, bob: Identity, authorized: AuthorizedKeys
) -> None:
    marker = tmp_path / "ran"
    argv = ["touch", str(marker)]
    # A second agent in the same process: the runtime's hooks reach each agent with
    # its own hub's events only, so its audit log must stay free of the first one's.
    async with (
        running_agent(tmp_path, server_identity, authorized) as agent,
        running_agent(tmp_path, server_identity, authorized) as other,
    ):
        stranger = Identity.generate()
        with pytest.raises(AuthenticationError, match="not authorized"):
            await connect(agent.target, stranger, tmp_path)
        with pytest.raises(AuthenticationError, match="presented none"):
            await connect(agent.target, None, tmp_path)
        conn = await connect(agent.target, bob, tmp_path)  # authorized, without the admin role
        try:
            with pytest.raises(MessageRejected, match="requires the role 'admin'"):
                await conn.exec(argv, Collector(), stdin=False)
            with pytest.raises(MessageRejected, match="requires the role 'admin'"):
                await conn.request({}, "admin.status")
        finally:
            await conn.close()
        entries = agent.audit()
        others = other.audit()
    assert not marker.exists()
    assert not any(e["event"] == "exec" for e in entries)
    refused = [e for e in entries if e["event"] == "refused"]
    auth = [e for e in refused if e["stage"] == "authentication"]
    assert len(auth) == 2, auth
    unknown, anonymous = auth
    assert unknown["fingerprint"] == stranger.fingerprint and "not authorized" in unknown["reason"]
    assert anonymous["fingerprint"] is None and "presented none" in anonymous["reason"]
    assert all(e["code"] == 1007 and e["peer"].startswith("127.0.0.1:") for e in auth)
    requests = [e for e in refused if e["stage"] == "request"]
    assert [e["type"] for e in requests] == ["admin.exec", "admin.status"]
    assert all(e["who"] == "bob" and e["fingerprint"] == bob.fingerprint for e in requests)
    assert all("requires the role 'admin'" in e["reason"] for e in requests)
    assert not any(e["event"] == "refused" for e in others), others


async def test_the_policy_decides_and_every_decision_is_audited(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    policy = Policy.from_mapping({"roles": {"admin": {"commands": ["echo **"]}}})
    async with running_agent(tmp_path, server_identity, authorized, policy=policy) as agent:
        conn = await connect(agent.target, alice, tmp_path)
        try:
            status, sink, _ = await run(conn, ["echo", "allowed"])
            assert status == 0 and sink.out == b"allowed\n"
            with pytest.raises(MessageRejected, match="allows 'rm -rf /tmp/nothing'"):
                await conn.exec(["rm", "-rf", "/tmp/nothing"], Collector(), stdin=False)
            with pytest.raises(MessageRejected, match="shell"):
                await conn.exec(["echo", "hi"], Collector(), shell=True, stdin=False)
            with pytest.raises(MessageRejected, match="copy files"):
                await conn.request({"path": "/etc/hostname"}, "admin.get.open")
        finally:
            await conn.close()
        decisions = [(e["event"], e.get("decision"), e.get("who")) for e in agent.audit()]
    assert ("exec", "allowed", "alice") in decisions
    assert decisions.count(("exec", "denied", "alice")) == 2
    assert ("get", "denied", "alice") in decisions


async def test_shell_and_tty(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        conn = await connect(agent.target, alice, tmp_path)
        try:
            status, sink, _ = await run(conn, ["echo", "a", "|", "tr", "a", "b"], shell=True)
            assert status == 0 and sink.out == b"b\n"
            status, sink, _ = await run(
                conn, ["sh", "-c", "test -t 1 && stty size"], tty=True, size=(100, 30)
            )
            assert status == 0 and sink.out.strip() == b"30 100"
            status, sink, _ = await run(conn, ["sh", "-c", "test -t 1"])
            assert status == 1
        finally:
            await conn.close()


async def test_a_tty_job_takes_more_input_than_its_terminal_holds_and_follows_resizes(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    """A --tty job's stdin goes through its supervisor to the terminal: 200 kB (far more
    than a terminal's input queue) arrive whole; a resize reaches the terminal."""
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        conn = await connect(agent.target, alice, tmp_path)
        try:
            sink = Collector()
            script = "stty raw -echo; echo ready; head -c 200000 | wc -c; stty size"
            job = await conn.exec(["sh", "-c", script], sink, tty=True, size=(100, 30))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT
            while b"ready" not in sink.out and loop.time() < deadline:
                await asyncio.sleep(0.01)
            await job.resize(77, 22)
            await job.send_stdin(bytes(range(32, 132)) * 2000)
            notice = await job.wait(WAIT)
        finally:
            await conn.close()
        assert exit_status(notice) == 0
        assert sink.out.split()[-3:] == [b"200000", b"22", b"77"], sink.out


async def test_status_and_jobs(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        conn = await connect(agent.target, alice, tmp_path)
        try:
            status = await conn.request({}, "admin.status")
            assert status["uptime"] > 0 and len(status["load"]) == 3
            assert status["memory"]["total"] > 0 and any(d["mount"] == "/" for d in status["disks"])
            job = await conn.exec(["sh", "-c", "echo hi; exit 3"], Collector(), stdin=False)
            await job.wait(WAIT)
            listed = await conn.request({}, "admin.jobs")
            assert [(j["job"], j["exit"]["code"], j["stdout"]) for j in listed] == [(job.id, 3, 3)]
        finally:
            await conn.close()


async def test_the_client_keeps_each_byte_once_whatever_the_agent_resends() -> None:
    from korinet_admin.execclient import JobRun

    sink = Collector()
    run = JobRun(None, "a" * 32, sink)  # type: ignore[arg-type]
    chunk = {"job": run.id, "stream": 1}
    run._output({**chunk, "offset": 0, "data": b"hel"})  # overtook the exec reply: held
    assert sink.out == b""
    run._confirm({"offsets": [0, 0]})
    assert sink.out == b"hel"
    run._output({**chunk, "offset": 0, "data": b"hello "})
    run._output({**chunk, "offset": 0, "data": b"hello "})  # all of it again
    run._output({**chunk, "offset": 3, "data": b"lo world"})  # overlapping
    run._output({**chunk, "stream": 2, "offset": 0, "data": b"e"})
    assert sink.out == b"hello world" and sink.err == b"e"
    run._output({**chunk, "offset": 20, "data": b"gap"})  # bytes 11-19 missing: an error, not silence
    with pytest.raises(Exception, match="skipped from 11 to 20"):
        await run.wait(1)
    run._exited({"job": run.id, "code": 0})
    run._exited({"job": run.id, "code": 0})
    assert run.exit_notices == 2 and sink.out == b"hello world"


async def test_a_korinet_server_without_an_agent_runs_nothing(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    """Every KoriNet process registers the admin message types (it loads the plugin);
    only a server bound to an Agent acts on them."""
    from korinet_admin.execclient import Target, admin_plugins

    from korinet import Server
    from korinet.security import ServerTLS

    marker = tmp_path / "ran"
    tls = ServerTLS(server_identity, authorized=authorized)
    async with Server("127.0.0.1", 0, tls=tls, plugins=admin_plugins(), accept_plain=False) as server:
        conn = await connect(Target("127.0.0.1", server.port), alice, tmp_path)
        try:
            with pytest.raises(MessageRejected, match="does not run the korinet-admin agent"):
                await conn.exec(["touch", str(marker)], Collector(), stdin=False)
        finally:
            await conn.close()
    assert not marker.exists()


async def test_insecure_plaintext_makes_every_client_the_anonymous_admin(tmp_path: Path) -> None:
    from korinet_admin.execclient import AdminConnection

    async with running_agent(tmp_path, None, None) as agent:
        conn = await AdminConnection.open(agent.target, tls=None, open_timeout=10)
        try:
            status, sink, _ = await run(conn, ["echo", "plain"])
            assert status == 0 and sink.out == b"plain\n"
        finally:
            await conn.close()
        execs = [e for e in agent.audit() if e["event"] == "exec"]
        assert execs[0]["who"] == "anonymous" and execs[0]["decision"] == "allowed"


async def test_file_chunks_need_an_open_checked_by_the_policy(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    carol = Identity.generate()
    authorized.authorize(carol.fingerprint, "carol", ["admin"])
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cret")
    sha = "0" * 64
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        mine = await connect(agent.target, alice, tmp_path)
        theirs = await connect(agent.target, carol, tmp_path)
        try:
            with pytest.raises(MessageRejected, match=r"admin\.get\.open first"):
                await mine.request({"path": str(secret), "offset": 0, "length": 6}, "admin.get.chunk")
            opened = await mine.request({"path": str(secret)}, "admin.get.open")
            assert opened["size"] == 6
            assert (
                await mine.request({"path": str(secret), "offset": 0, "length": 6}, "admin.get.chunk")
                == b"s3cret"
            )
            # another session did not open it: refused, whatever alice did
            with pytest.raises(MessageRejected, match=r"admin\.get\.open first"):
                await theirs.request({"path": str(secret), "offset": 0, "length": 6}, "admin.get.chunk")
            target = str(tmp_path / "upload")
            await mine.request({"path": target, "size": 3, "sha256": sha}, "admin.put.open")
            with pytest.raises(MessageRejected, match="no upload open"):
                await theirs.request(
                    {"path": target, "sha256": sha, "offset": 0, "data": b"bad"}, "admin.put.chunk"
                )
        finally:
            await mine.close()
            await theirs.close()
