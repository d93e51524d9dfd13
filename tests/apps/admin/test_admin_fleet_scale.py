"""exec on 200 agents: 4 agent processes of 50 on loopback, plus ports where nothing
listens. Some agents refuse the command (policy), one process is killed mid-output
(its hosts are lost: their jobs run on), a few links are cut mid-output and come
back. Every host must end in the right state and every byte arrive exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import cli_env, install_client_identity
from testutil import TIMEOUT_FACTOR, eventually
from testutil.relay import Relay

from korinet.security import AuthorizedKeys, Identity

pytestmark = pytest.mark.timeout(150 * TIMEOUT_FACTOR)

WAIT = 60 * TIMEOUT_FACTOR
POOL = Path(__file__).with_name("agent_pool.py")
#: The CLI, reporting its peak RSS (KiB) on its last stderr line.
CLI_RSS = [
    sys.executable,
    "-c",
    "import resource, sys; from korinet_admin.cli import main; code = main(); "
    "print(f'MAXRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr); sys.exit(code)",
]
MORE_LINES = 4000  # the second part: ~80 KB, so that a cut falls mid-output


def script(flag: Path) -> str:
    # part one; hosts of the slow kinds wait for the test's word; part two, bigger
    return (
        'seq -f "$HOST_NAME out %g" 1 100; echo "$HOST_NAME err" >&2; '
        f'if [ -n "$SLOW" ]; then while [ ! -e {flag} ]; do sleep 0.05; done; fi; '
        f'seq -f "$HOST_NAME more %g" 1 {MORE_LINES}'
    )


def expected_out(name: str) -> bytes:
    first = "".join(f"{name} out {i}\n" for i in range(1, 101))
    return (first + "".join(f"{name} more {i}\n" for i in range(1, MORE_LINES + 1))).encode()


async def start_pool(
    base: Path, count: int, prefix: str, home: Path, *extra: str
) -> tuple[Any, dict[str, int]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(POOL), str(base / prefix), str(count), prefix, "--tls", str(home), *extra,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=POOL.parent,
    )  # fmt: skip
    assert proc.stdout is not None
    ports = {}
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode().split()
        assert line, f"agent pool {prefix} ended before it was ready"
        if line == ["ready"]:
            return proc, ports
        ports[line[0]] = int(line[1])


async def test_200_agents_every_state_and_every_byte_once(
    tmp_path: Path, home: Path, alice: Identity, server_identity: Identity
) -> None:
    install_client_identity(home, alice)
    agent_home = tmp_path / "agent-home"
    server_identity.save(agent_home)
    AuthorizedKeys(agent_home / "authorized_keys").authorize(alice.fingerprint, "alice", ["admin"])
    flag = tmp_path / "release"
    slow = ("--env", "SLOW=1")
    pools: list[Any] = []
    relays: dict[str, Relay] = {}
    try:
        # a: 50 fine, 10 of them behind relays cut mid-output; b: 50 fine; c: 40 that
        # refuse the command; d: 50 whose process is killed mid-output
        started = await asyncio.gather(
            start_pool(tmp_path, 40, "a", agent_home),
            start_pool(tmp_path, 10, "r", agent_home, *slow),
            start_pool(tmp_path, 50, "b", agent_home),
            start_pool(tmp_path, 40, "c", agent_home, "--deny"),
            start_pool(tmp_path, 50, "d", agent_home, *slow),
        )
        pools = [proc for proc, _ in started]
        ports = {name: port for _, found in started for name, port in found.items()}
        for name in [n for n in ports if n.startswith("r")]:
            relays[name] = await Relay("127.0.0.1", ports[name]).start()
        dead = []
        for i in range(10):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                dead.append((f"x{i:03d}", s.getsockname()[1]))
        # the slow kinds last: with --fanout 64 they wait in their slots for the word
        order = (
            [n for n in ports if n[0] in "abc"] + [n for n, _ in dead] + [n for n in ports if n[0] in "rd"]
        )
        address = {**{n: relays[n].port if n in relays else p for n, p in ports.items()}, **dict(dead)}
        inventory = "".join(
            f'[hosts.{n}]\naddress = "127.0.0.1:{address[n]}"\nkey = "{server_identity.fingerprint}"\n'
            f'groups = ["{n[0]}"]\n\n'
            for n in order
        )
        (home / "hosts.toml").write_text(inventory)
        outdir = tmp_path / "out"
        t0 = time.monotonic()
        client = await asyncio.create_subprocess_exec(
            *CLI_RSS, "exec", "@all", "--fanout", "64", "--json", "--output-dir", str(outdir),
            "--outage-limit", str(5 * TIMEOUT_FACTOR), "--", "sh", "-c", script(flag),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(home),
        )  # fmt: skip
        stderr_task = asyncio.ensure_future(client.stderr.read())  # type: ignore[union-attr]
        records: dict[str, dict[str, Any]] = {}

        async def read_records() -> None:
            assert client.stdout is not None
            async for line in client.stdout:
                record = json.loads(line)
                assert record["host"] not in records, f"{record['host']} reported twice"
                records[record["host"]] = record

        reader = asyncio.ensure_future(read_records())
        # every slow host has sent its first part: cut the relayed links, kill d
        part_one = expected_out("d000").split(b"d000 more 1\n", 1)[0]
        slow_hosts = [n for n in order if n[0] in "rd"]
        await eventually(
            lambda: all(
                (outdir / f"{n}.out").exists() and (outdir / f"{n}.out").stat().st_size >= len(part_one)
                for n in slow_hosts
            ),
            WAIT,
            "the slow hosts' first part",
        )
        for relay in relays.values():
            relay.cut_after(20_000)  # in the middle of the second part
        d_proc = pools[4]
        d_proc.kill()
        await d_proc.wait()
        flag.touch()
        await asyncio.wait_for(reader, WAIT)
        await asyncio.wait_for(client.wait(), WAIT)
        wall = time.monotonic() - t0
        err = (await stderr_task).decode()
    finally:
        flag.touch()
        for relay in relays.values():
            await relay.close()
        for proc in pools:
            with contextlib.suppress(ProcessLookupError):
                if proc.returncode is None:
                    assert proc.stdin is not None
                    proc.stdin.close()
        for proc in pools:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), WAIT)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    rss = int(err.rsplit("MAXRSS ", 1)[1].split()[0])
    states = {name: r["state"] for name, r in records.items()}
    counts = {s: list(states.values()).count(s) for s in sorted(set(states.values()))}
    cuts = sum(r.cuts for r in relays.values())
    print(
        f"\n200 hosts: {wall:.1f} s wall, client peak RSS {rss / 1024:.0f} MiB, {counts}, {cuts} relay cuts"
    )
    assert sorted(records) == sorted(order), "a host without a state"
    assert client.returncode == 255
    for name in order:
        record = records[name]
        out = (outdir / f"{name}.out").read_bytes()
        err_bytes = (outdir / f"{name}.err").read_bytes()
        assert record["stdout_file"] == str(outdir / f"{name}.out")
        assert (record["bytes_out"], record["bytes_err"]) == (len(out), len(err_bytes)), name
        kind = name[0]
        if kind in "abr":
            assert (record["state"], record["exit_code"]) == ("done", 0), record
            assert out == expected_out(name), f"{name}: output differs"
            assert err_bytes == f"{name} err\n".encode()
        elif kind == "c":
            assert record["state"] == "refused" and record["reason"].startswith("policy: "), record
            assert out == err_bytes == b""
        elif kind == "x":
            assert record["state"] == "unreachable" and "refused" in record["reason"], record
        else:
            assert record["state"] == "lost" and record["exit_code"] is None, record
            assert f"korinet-admin attach {name} {record['job']}" in record["reason"]
            # what came is a prefix of what was written: nothing repeated, nothing out of order
            assert expected_out(name).startswith(out) and len(out) >= len(part_one), name
    assert cuts >= len(relays), "a relayed link was never cut mid-output"
    assert wall < 60 * TIMEOUT_FACTOR
