"""Output that survives the network: 100 MB byte-identical to a local run, with the
connection cut several times mid-output, and a session that expired meanwhile."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from admin_helpers import Collector, connect, running_agent
from korinet_admin.execclient import Target
from korinet_admin.protocol import exit_status
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet.security import AuthorizedKeys, Identity

pytestmark = pytest.mark.timeout(120 * TIMEOUT_FACTOR)

MB = 1_000_000
#: 100 MB of seeded random bytes on stdout, and a progress line on stderr every 10 MB.
GENERATOR = [
    sys.executable,
    "-c",
    "import random, sys\n"
    "r = random.Random(7)\n"
    "for i in range(100):\n"
    "    sys.stdout.buffer.write(r.randbytes(1_000_000))\n"
    "    if i % 10 == 0:\n"
    "        sys.stdout.buffer.flush(); print(f'progress {i}', file=sys.stderr, flush=True)\n",
]


@pytest.fixture(scope="module")
def local_run() -> tuple[str, bytes]:
    """The generator run locally: the sha256 of its stdout, and its stderr."""
    proc = subprocess.run(GENERATOR, capture_output=True, check=True)
    assert len(proc.stdout) == 100 * MB
    return hashlib.sha256(proc.stdout).hexdigest(), proc.stderr


class HashingSink:
    """Hashes stdout as it arrives (100 MB are not kept), keeps stderr, and calls
    ``at(byte_count)`` callbacks once stdout passes each threshold."""

    def __init__(self, cuts: list[int] | None = None, action: object = None) -> None:
        self.sha = hashlib.sha256()
        self.count = 0
        self.err = bytearray()
        self.cuts = sorted(cuts or [])
        self.action = action

    def __call__(self, stream: int, data: bytes) -> None:
        if stream == 2:
            self.err += data
            return
        self.sha.update(data)
        self.count += len(data)
        while self.cuts and self.count >= self.cuts[0]:
            self.cuts.pop(0)
            self.action()  # type: ignore[operator]


async def test_100_mb_byte_identical_to_a_local_run(
    tmp_path: Path,
    server_identity: Identity,
    alice: Identity,
    authorized: AuthorizedKeys,
    local_run: tuple[str, bytes],
) -> None:
    expected_sha, expected_err = local_run
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        conn = await connect(agent.target, alice, tmp_path)
        try:
            sink = HashingSink()
            job = await conn.exec(GENERATOR, sink, stdin=False)
            assert exit_status(await job.wait(60 * TIMEOUT_FACTOR)) == 0
        finally:
            await conn.close()
        assert sink.count == 100 * MB and sink.sha.hexdigest() == expected_sha
        assert bytes(sink.err) == expected_err
        # the output stays on the host (for attach --from), on disk, not in the agent's memory
        job_state = agent.agent.jobs.jobs[job.id]
        assert hashlib.sha256(job_state.out.path.read_bytes()).hexdigest() == expected_sha


async def test_100_mb_through_five_cuts_nothing_lost_nothing_repeated(
    tmp_path: Path,
    server_identity: Identity,
    alice: Identity,
    authorized: AuthorizedKeys,
    local_run: tuple[str, bytes],
) -> None:
    expected_sha, expected_err = local_run
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        relay = await Relay("127.0.0.1", agent.port).start()
        conn = await connect(Target("127.0.0.1", relay.port), alice, tmp_path)
        try:
            cuts = [5 * MB, 23 * MB, 47 * MB, 71 * MB, 96 * MB]
            sink = HashingSink(cuts, relay.cut)
            job = await conn.exec(GENERATOR, sink, stdin=False)
            notice = await job.wait(90 * TIMEOUT_FACTOR)
            assert exit_status(notice) == 0
            await asyncio.sleep(0.2)  # a duplicated exit notice would arrive by now
        finally:
            await conn.close()
            await relay.close()
        assert relay.cuts == 5 and relay.connections >= 6
        assert sink.count == 100 * MB and sink.sha.hexdigest() == expected_sha
        assert bytes(sink.err) == expected_err
        assert job.exit_notices == 1
        assert conn.client.links_opened >= 6, "the session did not resume after the cuts"


async def test_after_the_session_expired_the_client_reattaches_from_its_offsets(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    """The agent forgets the session (its TTL passes while the network is down); the job
    keeps running and its output waits; the client comes back in a new session and
    re-attaches from the bytes it has."""
    script = "echo before; echo err-before >&2; sleep 1.5; echo after; echo err-after >&2; exit 7"
    async with running_agent(tmp_path, server_identity, authorized, session_ttl=0.3) as agent:
        relay = await Relay("127.0.0.1", agent.port).start()
        conn = await connect(Target("127.0.0.1", relay.port), alice, tmp_path, backoff_cap=0.1)
        try:
            sink = Collector()
            job = await conn.exec(["sh", "-c", script], sink, stdin=False)
            for _ in range(int(100 * TIMEOUT_FACTOR)):
                if sink.out == b"before\n" and sink.err == b"err-before\n":
                    break
                await asyncio.sleep(0.05)
            assert sink.out == b"before\n"
            relay.refuse = True
            relay.cut()
            for _ in range(int(100 * TIMEOUT_FACTOR)):  # the agent drops the session (TTL)
                if not agent.server.hub.sessions:
                    break
                await asyncio.sleep(0.05)
            assert not agent.server.hub.sessions
            relay.refuse = False
            notice = await job.wait(20 * TIMEOUT_FACTOR)
        finally:
            await conn.close()
            await relay.close()
        assert exit_status(notice) == 7
        assert sink.out == b"before\nafter\n" and sink.err == b"err-before\nerr-after\n"
        assert job.exit_notices == 1
        attaches = [e for e in agent.audit() if e["event"] == "attach"]
        assert attaches and attaches[-1]["offsets"] == [7, 11]


async def test_a_detached_job_blocks_and_nothing_is_lost(
    tmp_path: Path, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    """With nobody reading, beyond 2 MB unacknowledged the supervisor stops reading the
    pipe (the command blocks); a client that comes back gets all of it."""
    writer = [
        sys.executable,
        "-c",
        "import random, sys\nr = random.Random(3)\n"
        "for _ in range(96): sys.stdout.buffer.write(r.randbytes(65536))\n",
    ]
    expected = hashlib.sha256(subprocess.run(writer, capture_output=True, check=True).stdout).hexdigest()
    limits = {"max_retained": 2 * MB}
    async with running_agent(tmp_path, server_identity, authorized, **limits) as agent:
        relay = await Relay("127.0.0.1", agent.port).start()
        conn = await connect(Target("127.0.0.1", relay.port), alice, tmp_path, backoff_cap=0.1)
        try:
            sink = HashingSink()
            # the command waits for its stdin before writing, so that nothing is read before
            # the link goes silent (as a laptop lid closing: up, but carrying nothing)
            run = await conn.exec(["sh", "-c", 'read go; exec "$@"', "sh", *writer], sink, stdin=True)
            relay.black_hole = True
            job = agent.agent.jobs.jobs[run.id]
            await job.write_stdin(0, b"go\n", eof=True)  # as if it had come from the client
            for _ in range(int(300 * TIMEOUT_FACTOR)):
                if job.paused(1):
                    break
                await asyncio.sleep(0.01)
            assert job.paused(1), "the pipe was not paused"
            await asyncio.sleep(0.3)
            assert not job.done.done(), "the command finished although nobody read its output"
            assert job.out.end <= 2 * MB + 1024 * 1024  # the limit, plus one read at most
            relay.black_hole = False
            relay.cut()  # the client notices and reconnects; the session resumes
            notice = await run.wait(30 * TIMEOUT_FACTOR)
        finally:
            await conn.close()
            await relay.close()
        assert exit_status(notice) == 0
        assert sink.count == 96 * 65536 and sink.sha.hexdigest() == expected


async def test_two_terminals_on_one_job_each_get_every_byte(
    tmp_path: Path,
    server_identity: Identity,
    alice: Identity,
    authorized: AuthorizedKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fast and a slow client attached to one job: the agent forgets a byte only once
    both have it, so the slow one loses nothing."""
    # little in flight: the slow client's stream must come back to the buffer many times
    monkeypatch.setattr("korinet_admin.agent.MAX_INFLIGHT_BYTES", 128 * 1024)
    writer = [
        sys.executable,
        "-c",
        "import random, sys\nr = random.Random(5)\n"
        "for _ in range(48): sys.stdout.buffer.write(r.randbytes(65536)); sys.stdout.buffer.flush()\n",
    ]
    expected = hashlib.sha256(subprocess.run(writer, capture_output=True, check=True).stdout).hexdigest()
    async with running_agent(tmp_path, server_identity, authorized) as agent:
        slow_link = await Relay("127.0.0.1", agent.port, delay=(0.01, 0.02)).start()
        fast = await connect(agent.target, alice, tmp_path)
        slow = await connect(Target("127.0.0.1", slow_link.port), alice, tmp_path)
        try:
            fast_sink, slow_sink = HashingSink(), HashingSink()
            run = await fast.exec(["sh", "-c", 'read go; exec "$@"', "sh", *writer], fast_sink, stdin=True)
            other = await slow.attach(run.id, slow_sink, [0, 0])
            await run.send_stdin(b"go\n", eof=True)
            notices = await asyncio.gather(run.wait(60 * TIMEOUT_FACTOR), other.wait(60 * TIMEOUT_FACTOR))
        finally:
            await fast.close()
            await slow.close()
            await slow_link.close()
        assert [exit_status(n) for n in notices] == [0, 0]
        for sink in (fast_sink, slow_sink):
            assert sink.count == 48 * 65536 and sink.sha.hexdigest() == expected
