"""exec on a fleet: inventory selections and pinned keys, one state per host, JSON
lines and output files for scripts, the exit code of a whole run."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from admin_helpers import CLI, cli_env, client_tls, install_client_identity, running_agent
from korinet_admin.execclient import Target
from korinet_admin.fleet import Fleet, FleetHost, FleetOptions, Outcome, Progress, fleet_exit_code
from korinet_admin.inventory import load_seen
from korinet_admin.policy import Policy
from testutil import TIMEOUT_FACTOR, eventually
from testutil.relay import Relay

from korinet.security import AuthorizedKeys, Identity

pytestmark = pytest.mark.timeout(90 * TIMEOUT_FACTOR)

WAIT = 30 * TIMEOUT_FACTOR


async def cli(home: Path, *args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(home),
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode is not None
    return proc.returncode, out, err


def dead_port() -> int:
    with socket.socket() as s:  # nothing listens there once closed
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def json_lines(out: bytes) -> dict[str, dict]:  # type: ignore[type-arg]
    records = [json.loads(line) for line in out.decode().splitlines()]
    by_host = {r["host"]: r for r in records}
    assert len(by_host) == len(records), "a host reported twice"
    return by_host


async def test_groups_globs_exclusions_pinned_keys_files_and_the_hosts_listing(
    tmp_path: Path, home: Path, alice: Identity, server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    install_client_identity(home, alice)
    impostor = Identity.generate()
    async with (
        running_agent(tmp_path, server_identity, authorized, job_env={"HOST_NAME": "web1"}) as web1,
        running_agent(tmp_path, server_identity, authorized, job_env={"HOST_NAME": "web2"}) as web2,
        running_agent(tmp_path, impostor, authorized) as db1,
    ):
        (home / "hosts.toml").write_text(
            f"""
[hosts.web1]
address = "127.0.0.1:{web1.port}"
key = "{server_identity.fingerprint}"
groups = ["web"]

[hosts.web2]
address = "127.0.0.1:{web2.port}"
key = "{server_identity.fingerprint}"
groups = ["web"]

[hosts.db1]
address = "127.0.0.1:{db1.port}"
key = "{server_identity.fingerprint}"

[groups]
db = ["db1"]
"""
        )
        # a group, in inventory order; each host's line prefixed with its name
        code, out, err = await cli(home, "exec", "@web", "--", "sh", "-c", "echo hi")
        assert code == 0, err
        assert sorted(out.decode().splitlines()) == ["web1: hi", "web2: hi"]
        assert b"\r" not in err and b"\x1b[" not in err  # stderr is no terminal: no live line
        # db1 presents another key than the one pinned for it: refused, for the key
        code, out, err = await cli(home, "exec", "@all,!web2", "--json", "--", "true")
        records = json_lines(out)
        assert set(records) == {"web1", "db1"}
        assert records["web1"]["state"] == "done" and records["web1"]["exit_code"] == 0
        assert records["db1"]["state"] == "refused" and records["db1"]["exit_code"] is None
        assert (
            records["db1"]["reason"].startswith("key: ") and impostor.fingerprint in records["db1"]["reason"]
        )
        assert code == 255
        # a glob and --output-dir: files as output comes, 0600; the first non-zero code
        outdir = tmp_path / "out"
        script = 'echo "out $HOST_NAME"; echo err >&2; [ "$HOST_NAME" = web2 ] && exit 3; exit 0'
        code, out, err = await cli(
            home, "exec", "web*", "--output-dir", str(outdir), "--", "sh", "-c", script
        )
        assert code == 3 and out == b""
        assert (outdir / "web1.out").read_bytes() == b"out web1\n"
        assert (outdir / "web2.err").read_bytes() == b"err\n"
        assert stat.S_IMODE(os.stat(outdir / "web1.out").st_mode) == 0o600
        assert re.search(rb"^web2\s+done\s+3\b", err, re.M) and re.search(rb"^web1\s+done\s+0\b", err, re.M)
        # attach takes an inventory name, with its pinned key
        code, out, err = await cli(home, "exec", "web1", "--json", "--", "sh", "-c", "echo again")
        job = json_lines(out)["web1"]["job"]
        code, out, err = await cli(home, "attach", "web1", job)
        assert (code, out) == (0, b"again\n"), err
        # unknown group: one line naming the known ones
        code, out, err = await cli(home, "exec", "@nope", "--", "true")
        assert code == 2 and err.decode().strip() == (
            f"korinet-admin: no group 'nope' in {home / 'hosts.toml'} (groups: @all, @db, @web)"
        )
        code, out, err = await cli(home, "hosts")
        web1_port = web1.port
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.decode().splitlines()}
    assert re.search(
        rf"127\.0\.0\.1:{web1_port}\s+web\s+SHA256:\S+…\s+done \(exit 0\), \d+s ago", rows["web1"]
    )
    assert "refused (key: " in rows["db1"] and " db " in rows["db1"]
    seen = load_seen(home / "hosts-seen.json")
    assert seen["db1"]["state"] == "refused" and seen["web2"]["state"] == "done"
    code, out, _ = await cli(home, "hosts", "--groups")
    assert [line.split(None, 2) for line in out.decode().splitlines()] == [
        ["@all", "3", "web1, web2, db1"],
        ["@web", "2", "web1, web2"],
        ["@db", "1", "db1"],
    ]


def outcome(state: str, code: int | None) -> Outcome:
    return Outcome("h", "127.0.0.1:1", state, code, None, "", None, 0, 0, None, 0.0)


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([("done", 0), ("done", 0)], 0),
        ([("done", 0), ("done", 3), ("done", 1)], 3),  # the first non-zero, in host order
        ([("done", 3), ("unreachable", None)], 255),  # any host not done: 255 first
        ([("done", 0), ("lost", None)], 255),
        ([("refused", None), ("done", 0)], 255),
        ([("done", 0), ("skipped", None)], 255),
    ],
)
def test_the_exit_code_of_a_run(states: list[tuple[str, int | None]], expected: int) -> None:
    assert fleet_exit_code([outcome(s, c) for s, c in states]) == expected


def test_the_live_line_counts_states_and_names_the_last_hosts() -> None:
    progress = Progress(7, None)
    for name in "abcdefg":
        progress.started(name)
    for name, state in zip("abcd", ["done", "done", "unreachable", "refused"], strict=True):
        progress.ended(name, state)
    assert progress.line() == "3/7 running · 2 done · 1 unreachable · 1 refused · still running: e, f, g"
    progress = Progress(10, None)
    progress.started("a")
    assert progress.line() == "1/10 running"  # others still waiting: no names


async def test_every_host_ends_in_one_state_with_its_bytes(tmp_path: Path) -> None:
    """In-process, plaintext: done (text, binary, too big for JSON), refused by the
    policy, unreachable, lost past the outage limit with the attach command."""
    deny = Policy.from_mapping({"roles": {"admin": {"commands": ["true"]}}})
    flag = tmp_path / "release"
    script = f'echo "text é"; echo e >&2; while [ ! -e {flag} ]; do sleep 0.05; done'
    sent = (len("text é\n".encode()), 2)
    async with (
        running_agent(tmp_path, None, None) as ok,
        running_agent(tmp_path, None, None, policy=deny) as denied,
        running_agent(tmp_path, None, None) as cut,
    ):
        relay = await Relay("127.0.0.1", cut.port).start()
        hosts = [
            FleetHost("ok", ok.target),
            FleetHost("denied", denied.target),
            FleetHost("dead", Target("127.0.0.1", dead_port())),
            FleetHost("cut", Target("127.0.0.1", relay.port)),
        ]
        seen: list[str] = []
        options = FleetOptions(["sh", "-c", script], json=True, outage_limit=1.5 * TIMEOUT_FACTOR)
        fleet = Fleet(hosts, options, None, on_outcome=lambda o: seen.append(o.host))
        try:
            task = asyncio.ensure_future(fleet.run())
            # once both have all their output, "cut" becomes unreachable and "ok" ends
            await eventually(
                lambda: all(n in fleet.runs and tuple(fleet.runs[n].offsets) == sent for n in ("ok", "cut")),
                WAIT,
            )
            relay.refuse = True
            relay.cut()
            flag.touch()
            results = await asyncio.wait_for(task, WAIT)
            for name, what in (("big", "head -c 70000 /dev/zero"), ("bin", r"printf '\377\000'")):
                one = Fleet([FleetHost(name, ok.target)], FleetOptions(["sh", "-c", what], json=True), None)
                results += await one.run()
        finally:
            flag.touch()
            await relay.close()
    assert sorted(seen) == sorted(h.name for h in hosts)  # each reported once, as it ended
    by = {o.host: o.record() for o in results}
    assert by["ok"]["state"] == "done" and by["ok"]["exit_code"] == 0
    assert (by["ok"]["stdout"], by["ok"]["stderr"], by["ok"]["encoding"]) == ("text é\n", "e\n", "utf-8")
    assert (by["ok"]["bytes_out"], by["ok"]["bytes_err"]) == sent
    assert by["denied"]["state"] == "refused" and by["denied"]["reason"].startswith("policy: ")
    assert by["dead"]["state"] == "unreachable" and "refused (is the agent running?)" in by["dead"]["reason"]
    lost = by["cut"]
    assert lost["state"] == "lost" and lost["exit_code"] is None and lost["stdout"] == "text é\n"
    assert f"korinet-admin attach cut {lost['job']}" in lost["reason"]
    assert by["big"]["stdout"] is None and by["big"]["bytes_out"] == 70000 and by["big"]["stderr"] == ""
    assert by["bin"]["encoding"] == "base64" and base64.b64decode(by["bin"]["stdout"]) == b"\xff\x00"
    for rec in by.values():
        assert set(rec) >= {"host", "address", "state", "exit_code", "signal", "reason", "job", "bytes_out",
                            "bytes_err", "started", "duration_s"}  # fmt: skip


class Terminal:
    """A pseudo-terminal for a CLI's stdin and stderr: what it writes, read as it comes."""

    def __init__(self) -> None:
        import pty

        self.master, self.slave = pty.openpty()
        os.set_blocking(self.master, False)
        self.seen = b""
        self._more = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:  # the other side closed (EIO on Linux)
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
        self.seen += data
        self._more.set()

    async def wait_for(self, pattern: str) -> None:
        async def scan() -> None:
            while not re.search(pattern, self.seen.decode(errors="replace")):
                self._more.clear()
                await self._more.wait()

        try:
            await asyncio.wait_for(scan(), WAIT)
        except TimeoutError:
            shown = self.seen[-2000:]
            raise AssertionError(f"{pattern!r} never came; the terminal shows {shown!r}") from None

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)
        os.close(self.slave)


@pytest.mark.parametrize("answer", ["d", "s"])
async def test_ctrl_c_on_a_terminal_asks_whether_to_stop_or_detach(
    tmp_path: Path, home: Path, answer: str
) -> None:
    flag = tmp_path / "release"
    script = f"echo started; while [ ! -e {flag} ]; do sleep 0.05; done; echo finished"
    async with (
        running_agent(tmp_path, None, None) as a,
        running_agent(tmp_path, None, None) as b,
        running_agent(tmp_path, None, None) as c,
    ):
        agents = {f"127.0.0.1:{x.port}": x for x in (a, b, c)}
        term = Terminal()
        try:
            proc = await asyncio.create_subprocess_exec(
                *CLI, "exec", ",".join(agents), "--insecure-plaintext", "--", "sh", "-c", script,
                stdin=term.slave, stdout=subprocess.PIPE, stderr=term.slave, env=cli_env(home),
            )  # fmt: skip
            # the live line, on the terminal
            await term.wait_for(r"\x1b\[K3/3 running · still running: ")
            for x in agents.values():  # every job runs, and the client has what it printed
                await eventually(lambda x=x: any(j.acked[0] >= 8 for j in x.agent.jobs.jobs.values()), WAIT)
            proc.send_signal(signal.SIGINT)
            await term.wait_for(r"\[s\]top the remote commands, \[d\]etach .*\? \[s\] ")
            os.write(term.master, answer.encode() + b"\n")
            out, _ = await asyncio.wait_for(proc.communicate(), WAIT)
            jobs = {h: list(x.agent.jobs.jobs.values()) for h, x in agents.items()}
            if answer == "d":
                assert proc.returncode == 255
                for host, (job,) in jobs.items():
                    assert not job.done.done(), "a detached job was stopped"
                    h = re.escape(host)
                    await term.wait_for(rf"{h}: korinet-admin attach {h} {job.id}")
                    await term.wait_for(rf"{h}\s+lost\s+detached")
            else:
                assert proc.returncode == 128 + signal.SIGINT
                await term.wait_for(r"sending SIGINT to the remote commands")
                for host, (job,) in jobs.items():
                    assert job.done.done()
                    await term.wait_for(rf"{re.escape(host)}\s+done\s+130\s+killed by SIGINT")
            assert sorted(out.decode().splitlines()) == sorted(f"{h}: started" for h in agents)
        finally:
            flag.touch()
            term.close()


async def test_a_detach_leaves_started_jobs_lost_and_the_rest_skipped(tmp_path: Path) -> None:
    flag = tmp_path / "release"
    async with running_agent(tmp_path, None, None) as a, running_agent(tmp_path, None, None) as b:
        hosts = [FleetHost("first", a.target), FleetHost("second", b.target)]
        argv = ["sh", "-c", f"echo started; while [ ! -e {flag} ]; do sleep 0.05; done"]
        fleet = Fleet(hosts, FleetOptions(argv, fanout=1, json=True), None)
        try:
            task = asyncio.ensure_future(fleet.run())
            await eventually(lambda: "first" in fleet.runs and fleet.runs["first"].offsets[0] == 8, WAIT)
            fleet.cancel("detached")
            first, second = await asyncio.wait_for(task, WAIT)
            (job,) = a.agent.jobs.jobs.values()
            assert not job.done.done() and not b.agent.jobs.jobs  # left running; never asked
        finally:
            flag.touch()
    assert (first.state, first.job, first.extra["stdout"]) == ("lost", job.id, "started\n")
    assert first.reason == f"detached; job {job.id} keeps running: korinet-admin attach first {job.id}"
    assert (second.state, second.reason, second.job) == ("skipped", "detached before its turn", None)
    assert fleet_exit_code([first, second]) == 255


async def test_a_key_without_the_admin_role_is_refused_for_the_role(
    tmp_path: Path, server_identity: Identity, authorized: AuthorizedKeys, bob: Identity
) -> None:
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        host = FleetHost("h", agent.target, server_identity.fingerprint)
        (result,) = await Fleet([host], FleetOptions(["true"], json=True), client_tls(bob, tmp_path)).run()
    assert result.state == "refused" and result.reason.startswith("role: "), result
    assert "korinet authorize" in result.reason  # what to do, on the agent
