"""Audio channels shared by two hubs through the cluster bus (apps/audio/cluster.py):
first two hubs on one in-process LocalBus, then two hubs each on its own connection
to a real nats-server (skipped when it is not installed, unless CI=1), where the
latency the bus adds is measured; and ``korinet-audio serve --cluster``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import audio_helpers
import korinet_audio.cluster as audio_cluster
import korinet_audio.plugin as audio_plugin
import msgpack
import pytest
from audio_helpers import loud_frames, tone, tone_share, wait_for
from korinet_audio import codecs
from korinet_audio.cluster import PTT_KEEP, PTT_MAX_BYTES, channel_subjects
from korinet_audio.frames import UtterancePart
from korinet_audio.hub import AudioHub
from korinet_audio.plugin import use_audio_hub
from korinet_audio.talk import Call
from korinet_audio.wavio import FileCapture, FilePlayback
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Client, Server
from korinet.cluster import ClusterBus, LocalBus
from korinet.plugins import PluginManager

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "plugins" / "nats" / "tests"))
from nats_server import NatsServer

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)


@pytest.fixture
def plugins() -> PluginManager:
    return PluginManager.load(entry_points=False, extra=[audio_plugin])


_opened: list[Call] = []


async def open_call(port: int, plugins: PluginManager, name: str, **kwargs: Any) -> tuple[Call, FilePlayback]:
    call, heard = await audio_helpers.open_call(port, plugins, name, **kwargs)
    _opened.append(call)
    return call, heard


@pytest.fixture(autouse=True)
async def close_every_call() -> AsyncIterator[None]:
    """A test that fails half-way still closes its clients: a client left reconnecting
    to a closed hub can ignore the event loop's cancel at the end of the test."""
    yield
    while _opened:
        await _opened.pop().client.close()


@dataclass
class Side:
    """One hub: the KoriNet server and its AudioHub on the bus."""

    server: Server
    audio: AudioHub
    bus: ClusterBus

    @property
    def port(self) -> int:
        return self.server.port


@asynccontextmanager
async def two_hubs(
    plugins: PluginManager,
    make_bus: Callable[[], ClusterBus],
    refresh: float = 2.0,
    ptt_keep: float = PTT_KEEP,
) -> AsyncIterator[tuple[Side, Side]]:
    sides: list[Side] = []
    try:
        for name in ("A", "B"):
            bus = make_bus()
            await bus.connect()
            audio = AudioHub(bus=bus, hub_id=f"hub{name}", refresh=refresh, ptt_keep=ptt_keep)
            server = Server("127.0.0.1", 0, plugins=plugins, accept_plain=False)
            use_audio_hub(server.hub, audio)
            await server.start()
            sides.append(Side(server, audio, bus))
        yield sides[0], sides[1]
    finally:
        for side in sides:
            await side.server.close()
            await side.audio.close()
            await side.bus.close()


def local_buses() -> Callable[[], ClusterBus]:
    shared = LocalBus()
    return lambda: shared


async def members_are(calls: list[Call], names: set[str], timeout: float = 5.0) -> None:
    await wait_for(
        lambda: all(set(c.receiver.members) == names for c in calls), timeout, f"every roster to be {names}"
    )


def record_frames(call: Call) -> list[tuple[str, int, int, float]]:
    """(src, stream, seq, transit) of every frame as it reaches the listener: transit is
    the arrival time minus the capture time (one clock: one machine)."""
    arrivals: list[tuple[str, int, int, float]] = []
    receive = call.receiver.on_frame

    def on_frame(obj: Any) -> None:
        arrivals.append((obj[6], obj[1], obj[2], time.time() - obj[3] / 1e6))
        receive(obj)

    call.receiver.on_frame = on_frame  # type: ignore[method-assign]
    return arrivals


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def close_calls(*calls: Call) -> None:
    for call in calls:
        await call.client.close()


# ---------------------------------------------------------------------- LocalBus


async def test_a_talker_on_hub_a_is_heard_on_hub_b_each_frame_once(plugins: PluginManager) -> None:
    async with two_hubs(plugins, local_buses()) as (a, b):
        bob, bob_heard = await open_call(b.port, plugins, "bob")
        carol, carol_heard = await open_call(a.port, plugins, "carol")  # beside the talker
        alice, _ = await open_call(a.port, plugins, "alice", capture=FileCapture(tone(1.5)))
        await members_are([alice, bob, carol], {"alice", "bob", "carol"})
        assert bob.receiver.members[0] == "bob", "a hub's own members first, then the other hub's"
        bob_frames, carol_frames, alice_frames = (
            record_frames(bob),
            record_frames(carol),
            record_frames(alice),
        )
        await asyncio.gather(alice.run(1.6), bob.run(1.8), carol.run(1.8))

        assert tone_share(bob_heard.recorded) >= 0.6, "the listener on the other hub did not hear the tone"
        assert tone_share(carol_heard.recorded) >= 0.6
        assert sum(loud_frames(bob_heard.recorded)) >= 70
        for frames in (bob_frames, carol_frames):
            seqs = Counter((stream, seq) for src, stream, seq, _ in frames if src == "alice")
            assert len(seqs) >= 70 and set(seqs.values()) == {1}, "a frame came twice (or none came)"
        assert not alice_frames, "the talker heard herself back"
        # hub A heard its own signals back and dropped them; hub B forwarded every one
        await wait_for(lambda: b.audio.stats.frames_from_bus == a.audio.stats.frames_to_bus, 2.0, "hub B")
        assert a.audio.stats.frames_own_ignored == a.audio.stats.frames_to_bus >= 70
        assert b.audio.stats.frames_to_bus == 0 and b.audio.stats.frames_own_ignored == 0
        assert a.audio.stats.frames_bus_dropped == 0 and b.audio.stats.frames_malformed == 0
        await close_calls(alice, bob, carol)


class MutedBus:
    """A hub's view of a shared LocalBus whose signals can be silenced: the hub goes
    quiet on the bus without a word (as when it dies)."""

    def __init__(self, bus: LocalBus) -> None:
        self.bus = bus
        self.muted = False
        self.address = bus.address

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bus, name)

    async def signal(self, subject: str, data: bytes) -> None:
        if not self.muted:
            await self.bus.signal(subject, data)


async def test_rosters_span_the_hubs_and_forget_a_hub_that_went_quiet(plugins: PluginManager) -> None:
    shared = LocalBus()
    buses = iter([shared, MutedBus(shared)])
    async with two_hubs(plugins, lambda: next(buses), refresh=0.2) as (a, b):
        alice, _ = await open_call(a.port, plugins, "alice")
        bob, _ = await open_call(b.port, plugins, "bob")
        await members_are([alice, bob], {"alice", "bob"})
        # names are unique across the hubs
        client = await Client.connect("127.0.0.1", b.port, plugins=plugins)
        other = Call(client, "lobby", "alice", None, FilePlayback(None), codecs=["pcm16"])
        await other.join()
        assert other.joined_as == "alice-2"
        await members_are([alice, bob, other], {"alice", "bob", "alice-2"})
        if "opus" in codecs.available():  # the codec choice spans the hubs too
            await wait_for(lambda: alice.codec == "pcm16", 2.0, "alice to fall back to pcm16")
        await client.close()  # that session ends: hub B says so at once
        await members_are([alice, bob], {"alice", "bob"})
        if "opus" in codecs.available():
            await wait_for(lambda: alice.codec == "opus", 2.0, "alice to go back to opus")

        # hub B goes quiet: after 3 refreshes without a word, its members are gone
        assert isinstance(b.bus, MutedBus)
        b.bus.muted = True
        await members_are([alice], {"alice"})
        b.bus.muted = False  # and they come back with its next announcement
        await members_are([alice, bob], {"alice", "bob"})
        await close_calls(alice, bob)


async def test_push_to_talk_said_on_hub_a_is_replayed_once_to_a_listener_away_from_hub_b(
    plugins: PluginManager,
) -> None:
    async with two_hubs(plugins, local_buses()) as (a, b):
        relay = await Relay("127.0.0.1", b.port).start()
        away, away_heard = await open_call(relay.port, plugins, "bob")
        present, present_heard = await open_call(b.port, plugins, "carol")
        talker, _ = await open_call(a.port, plugins, "alice", capture=FileCapture(tone(5.0)), ptt=True)
        await members_are([away, present, talker], {"alice", "bob", "carol"})
        runs = asyncio.gather(talker.run(3.2), away.run(5.0), present.run(5.0))
        relay.refuse = True
        relay.cut()  # bob is away for the whole utterance
        talker.set_talking(True)
        await asyncio.sleep(1.2)  # a 1.2 s utterance: three parts, through hub A's log
        talker.set_talking(False)
        await wait_for(lambda: b.audio.stats.utterances_from_bus == 3, 5.0, "hub B to take the three parts")
        relay.refuse = False
        await runs
        assert talker.stats.parts_sent == 3
        assert away.stats.missed_parts_played == 3, "bob did not get the utterance he missed, once"
        assert away.stats.missed_parts_heard == 0
        assert present.stats.missed_parts_played == 0 and present.stats.missed_parts_heard == 3
        # 1.2 s = 60 frames: bob heard them all once, from the reliable copy (not twice)
        assert tone_share(away_heard.recorded) * len(away_heard.recorded) * 0.02 >= 0.9
        assert 55 <= sum(loud_frames(away_heard.recorded)) <= 66
        assert 55 <= sum(loud_frames(present_heard.recorded)) <= 66
        _, _, log = channel_subjects("lobby")
        assert await a.bus.head(log) == 3
        assert a.audio.stats.utterances_to_bus == 3 and a.audio.stats.utterances_from_bus == 0
        await close_calls(talker, away, present)
        await relay.close()


async def test_a_part_stored_twice_is_played_once_and_garbage_on_the_bus_is_dropped(
    plugins: PluginManager,
) -> None:
    bus = LocalBus()
    async with two_hubs(plugins, lambda: bus) as (a, b):
        alice, _ = await open_call(a.port, plugins, "alice")
        bob, _ = await open_call(b.port, plugins, "bob")
        await members_are([alice, bob], {"alice", "bob"})
        parts: list[Any] = []
        receive = bob.receiver.on_utterance
        bob.receiver.on_utterance = lambda obj: (parts.append(obj), receive(obj))  # type: ignore[method-assign]
        frames_subject, members_subject, log = channel_subjects("lobby")
        # garbage where frames, member lists and parts travel: counted or logged, dropped
        for junk in (b"", b"\xc1", msgpack.packb([1, 2, 3]), msgpack.packb(["hubX", [1, 2]])):
            await bus.signal(frames_subject, junk)
            await bus.signal(members_subject, junk)
        await bus.signal(members_subject, msgpack.packb({"hub": "hubX", "n": 1, "members": [["x" * 99, []]]}))
        await bus.append(log, msgpack.packb({"hub": "hubX", "part": {"v": 9}}), msg_id="junk")

        assert a.audio.cluster is not None
        part = UtterancePart(7, 0, 0, int(time.time() * 1e6), "pcm16", (b"\x00" * 640,) * 3, False, "alice")
        a.audio.cluster.part_out("lobby", "sess1", part)
        a.audio.cluster.part_out("lobby", "sess1", part)  # the same part again: stored once
        later = UtterancePart(7, 0, 3, part.capture_us + 60000, "pcm16", (b"\x00" * 640,) * 3, True, "alice")
        a.audio.cluster.part_out("lobby", "sess1", later)
        await wait_for(lambda: len(parts) == 2, 5.0, "bob to get both parts")
        await wait_for(lambda: b.audio.stats.frames_malformed == 4, 2.0, "the junk frames to be counted")
        assert await bus.head(log) == 3  # the junk entry, then each part once
        assert [p["first_seq"] for p in parts] == [0, 3] and parts[0]["src"] == "alice"
        assert b.audio.stats.utterances_from_bus == 2
        assert set(bob.receiver.members) == {"alice", "bob"}, "a malformed member list got in"
        await close_calls(alice, bob)


async def test_frames_said_while_a_hub_was_not_listening_are_never_replayed(plugins: PluginManager) -> None:
    """Signals are not kept: frames sent while hub B had nobody in the channel (and did
    not listen) never reach B's next member, only those sent after it listens."""
    async with two_hubs(plugins, local_buses()) as (a, b):
        alice, _ = await open_call(a.port, plugins, "alice", capture=FileCapture(tone(4.0)))
        bob, _ = await open_call(b.port, plugins, "bob")
        await members_are([alice, bob], {"alice", "bob"})
        runs = asyncio.gather(alice.run(3.0))
        await wait_for(lambda: a.audio.stats.frames_to_bus >= 10, 3.0, "frames on the bus")
        await bob.client.close()  # hub B leaves the channel and stops listening
        await members_are([alice], {"alice"})
        sent_before = alice.sender.seq
        late, _ = await open_call(b.port, plugins, "dave")
        await members_are([alice, late], {"alice", "dave"})
        frames = record_frames(late)
        await asyncio.gather(runs, late.run(1.0))
        seqs = [seq for src, _, seq, _ in frames if src == "alice"]
        assert seqs, "dave heard nothing"
        assert min(seqs) >= sent_before, "a frame from before hub B listened again was replayed"
        await close_calls(alice, late)


async def test_a_push_to_talk_log_forgets_parts_older_than_ptt_keep(plugins: PluginManager) -> None:
    now = [0.0]
    bus = LocalBus(clock=lambda: now[0])  # the bus's clock only: the hubs run on real time
    async with two_hubs(plugins, lambda: bus, ptt_keep=60.0) as (a, b):
        alice, _ = await open_call(a.port, plugins, "alice")
        bob, _ = await open_call(b.port, plugins, "bob")
        await members_are([alice, bob], {"alice", "bob"})
        parts: list[Any] = []
        receive = bob.receiver.on_utterance
        bob.receiver.on_utterance = lambda obj: (parts.append(obj), receive(obj))  # type: ignore[method-assign]
        _, _, log = channel_subjects("lobby")
        assert a.audio.cluster is not None
        said = UtterancePart(7, 0, 0, int(time.time() * 1e6), "pcm16", (b"\x00" * 640,) * 3, False, "alice")
        a.audio.cluster.part_out("lobby", "sess1", said)
        await wait_for(lambda: len(parts) == 1, 5.0, "bob to get the first part")
        now[0] = 59.0
        assert [e.seq for e in await bus.read(log, 0)] == [1]  # kept within ptt_keep
        now[0] = 61.0
        assert await bus.read(log, 0) == [] and await bus.head(log) == 1  # gone, its number kept
        later = UtterancePart(7, 0, 3, said.capture_us + 60000, "pcm16", (b"\x00" * 640,) * 3, True, "alice")
        a.audio.cluster.part_out("lobby", "sess1", later)  # and the channel goes on
        await wait_for(lambda: len(parts) == 2, 5.0, "bob to get the next part")
        assert [e.seq for e in await bus.read(log, 0)] == [2]
        assert [p["first_seq"] for p in parts] == [0, 3]
        await close_calls(alice, bob)


class _FollowerThatSwallowsItsCancel(LocalBus):
    """A bus whose log follower takes its first cancel for nothing and goes on
    waiting, as one does when asyncio.wait_for (inside the NATS client, on Python
    3.11) swallows a cancellation that lands as what it waits for completes."""

    def __init__(self) -> None:
        super().__init__()
        self.swallowed = 0

    async def follow(self, log: str, after: int) -> AsyncIterator[Any]:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.swallowed += 1
        await asyncio.Event().wait()
        yield  # (an async generator, as follow() is)


async def test_closing_a_hub_ends_a_link_task_that_swallowed_its_cancel(
    plugins: PluginManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audio_cluster, "CANCEL_PATIENCE", 0.05)
    bus = _FollowerThatSwallowsItsCancel()
    async with asyncio.timeout(20 * TIMEOUT_FACTOR):  # (closing hung for good before)
        async with two_hubs(plugins, lambda: bus) as (a, _):
            alice, _ = await open_call(a.port, plugins, "alice")
            assert a.audio.cluster is not None
            await wait_for(lambda: a.audio.cluster.links["lobby"].ready.is_set(), 10.0, "the channel")
            await close_calls(alice)
    assert bus.swallowed >= 1


# ---------------------------------------------------------------------- nats-server


async def test_through_nats_the_bus_adds_little_latency(plugins: PluginManager, tmp_path: Path) -> None:
    """alice on hub A; carol on hub A hears her through one hub, bob on hub B through
    the bus (hub A -> nats-server -> hub B), the same frames at the same time: the
    difference is what the bus adds. Loose bounds: the machine is shared and busy."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        # each hub on its own connection, as hubs in two processes would be
        async with two_hubs(plugins, lambda: _nats_bus(server.url)) as (a, b):
            bob, bob_heard = await open_call(b.port, plugins, "bob")
            carol, _ = await open_call(a.port, plugins, "carol")
            alice, _ = await open_call(a.port, plugins, "alice", capture=FileCapture(tone(4.0)))
            await members_are([alice, bob, carol], {"alice", "bob", "carol"})
            bob_frames, carol_frames = record_frames(bob), record_frames(carol)
            await asyncio.gather(alice.run(4.0), bob.run(4.2), carol.run(4.2))

            assert tone_share(bob_heard.recorded) >= 0.6, "bob did not hear the tone through NATS"
            bob_seqs = Counter((stream, seq) for src, stream, seq, _ in bob_frames if src == "alice")
            carol_seqs = {(stream, seq) for src, stream, seq, _ in carol_frames if src == "alice"}
            assert set(bob_seqs.values()) == {1}, "a frame came twice through the bus"
            # what the talker or the busy machine dropped, carol missed too
            assert len(bob_seqs.keys() & carol_seqs) >= 0.95 * len(carol_seqs) >= 100
            assert a.audio.stats.frames_own_ignored == a.audio.stats.frames_to_bus
            bus_transit = {(stream, seq): t for src, stream, seq, t in bob_frames if src == "alice"}
            hub_transit = {(stream, seq): t for src, stream, seq, t in carol_frames if src == "alice"}
            # per frame, both listeners had it: how much later it reached bob than carol
            added = [bus_transit[k] - hub_transit[k] for k in bus_transit.keys() & hub_transit.keys()]
            assert len(added) >= 100
            bus_play, hub_play = list(bob.stats.latencies), list(carol.stats.latencies)
            ms = {
                "one hub": [*map(percentile, [list(hub_transit.values())] * 2, (0.5, 0.99))],
                "via bus": [*map(percentile, [list(bus_transit.values())] * 2, (0.5, 0.99))],
                "added": [percentile(added, 0.5), percentile(added, 0.99)],
                "played one hub": [percentile(hub_play, 0.5), percentile(hub_play, 0.99)],
                "played via bus": [percentile(bus_play, 0.5), percentile(bus_play, 0.99)],
            }
            print("p50/p99 ms:", {k: [round(v * 1000, 1) for v in p] for k, p in ms.items()})
            assert ms["added"][0] <= 0.020, ms  # a loopback hop through nats-server: about 1 ms
            assert ms["via bus"][1] <= ms["one hub"][1] + 0.400, ms  # the tail: the machine's load
            assert ms["played via bus"][0] <= ms["played one hub"][0] + 0.040, ms
            await close_calls(alice, bob, carol)
    finally:
        server.stop()


def _nats_bus(url: str) -> ClusterBus:
    from korinet_nats import NatsBus

    return NatsBus(url)


# ---------------------------------------------------------------------- serve --cluster


def run_cli(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KORINET_HOME": str(home), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "korinet_audio.cli", *args],
        env=env, capture_output=True, text=True, timeout=30 * TIMEOUT_FACTOR,
    )  # fmt: skip


async def test_on_nats_the_push_to_talk_stream_has_the_retention(
    plugins: PluginManager, tmp_path: Path
) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        async with two_hubs(plugins, lambda: _nats_bus(server.url), ptt_keep=300.0) as (a, _):
            alice, _ = await open_call(a.port, plugins, "alice")
            assert a.audio.cluster is not None
            await wait_for(
                lambda: a.audio.cluster.links["lobby"].ready.is_set(), 10.0, "the channel on the bus"
            )
            _, _, log = channel_subjects("lobby")
            config = (await a.bus.js.stream_info(f"KORINET_{log}")).config  # type: ignore[attr-defined]
            assert (config.max_age, config.max_bytes, config.max_msgs) == (300.0, PTT_MAX_BYTES, -1)
            await close_calls(alice)
    finally:
        server.stop()


def test_serve_cluster_says_in_one_line_when_the_bus_cannot_be_used(tmp_path: Path) -> None:
    serve = ("serve", "127.0.0.1:0", "--insecure-plaintext", "--cluster")
    r = run_cli(*serve, "nats://127.0.0.1:1", home=tmp_path)
    lines = [line for line in r.stderr.splitlines() if not line.startswith("korinet-audio: WARNING")]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and "cannot reach the cluster bus at nats://127.0.0.1:1: no answer" in lines[0], (
        r.stderr
    )
    assert "korinet-audio hub on" not in r.stdout, "it listened before it had its bus"
    # korinet-nats not installed (here: disabled)
    r = run_cli(*serve, "nats://127.0.0.1:1", home=tmp_path, env={"KORINET_DISABLE_PLUGINS": "nats"})
    lines = [line for line in r.stderr.splitlines() if not line.startswith("korinet-audio: WARNING")]
    assert r.returncode == 1 and len(lines) == 1 and "pip install korinet-nats" in lines[0], r.stderr
    r = run_cli(*serve, "local", home=tmp_path)
    assert r.returncode == 1 and "nats://HOST:PORT" in r.stderr and "Traceback" not in r.stderr


async def test_serve_cluster_shares_its_channels(plugins: PluginManager, tmp_path: Path) -> None:
    """A `korinet-audio serve --cluster` process and a hub in this process on one
    nats-server: a talker on each sees the other in the roster; Ctrl-C says bye."""
    nats = NatsServer(tmp_path / "nats").start()
    env = {**os.environ, "KORINET_HOME": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "korinet_audio.cli", "-v", "serve", "127.0.0.1:0", "--insecure-plaintext",
        "--cluster", nats.url, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 15 * TIMEOUT_FACTOR)).decode()
        assert first.startswith("korinet-audio hub on 127.0.0.1:"), first
        port = int(first.rsplit(":", 1)[1])
        second = (await asyncio.wait_for(proc.stdout.readline(), 5 * TIMEOUT_FACTOR)).decode()
        assert second.startswith(f"sharing channels through {nats.url} as hub "), second
        async with two_hubs(plugins, lambda: _nats_bus(nats.url)) as (here, _):
            alice, _ = await open_call(port, plugins, "alice")
            bob, _ = await open_call(here.port, plugins, "bob")
            await members_are([alice, bob], {"alice", "bob"})
            proc.send_signal(signal.SIGINT)
            try:
                code = await asyncio.wait_for(proc.wait(), 15 * TIMEOUT_FACTOR)
            except TimeoutError:
                proc.kill()
                assert proc.stderr is not None
                raise AssertionError((await proc.stderr.read()).decode()[-3000:]) from None
            assert code == 0
            await members_are([bob], {"bob"}, timeout=3.0)  # the bye, not the 6 s expiry
            await close_calls(alice, bob)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        nats.stop()
