"""exec on a fleet: inventory selections and pinned keys, one state per host, JSON
lines and output files for scripts, the exit code of a whole run."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from admin_helpers import CLI, cli_env, install_client_identity, running_agent
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
