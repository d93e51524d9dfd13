"""Calls through a real hub on loopback: the tone gets across, a 2 s cut leaves no
backlog, malformed frames are counted and dropped, push-to-talk replays what a
listener missed exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import korinet_audio.plugin as audio_plugin
import pytest
from audio_helpers import (
    PULSE_EVERY,
    compare_pulses,
    gaps_after_start,
    loud_frames,
    open_call,
    pulse_train,
    pulses_heard,
    record_arrivals,
    talk_spurts,
    tone,
    tone_share,
    wait_for,
)
from korinet_audio import codecs
from korinet_audio.frames import AudioFrame
from korinet_audio.plugin import FRAME, audio_hub
from korinet_audio.talk import Call
from korinet_audio.wavio import FileCapture, FilePlayback
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Client, MessageRejected, Server
from korinet.plugins import PluginManager

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)


@pytest.fixture
def plugins() -> PluginManager:
    return PluginManager.load(entry_points=False, extra=[audio_plugin])


@pytest.fixture
async def server(plugins: PluginManager) -> AsyncIterator[Server]:
    async with Server("127.0.0.1", 0, plugins=plugins, accept_plain=False) as srv:
        yield srv


async def test_a_tone_goes_from_talker_through_the_hub_to_the_listener(
    server: Server, plugins: PluginManager
) -> None:
    listener, heard = await open_call(server.port, plugins, "bob")
    arrived = record_arrivals(listener)
    talker, _ = await open_call(server.port, plugins, "alice", capture=FileCapture(tone(1.5)))
    assert talker.codec == listener.codec  # negotiated: the best both have
    await asyncio.gather(talker.run(1.6), listener.run(1.8))
    assert tone_share(heard.recorded) >= 0.6, "the listener did not hear the tone"
    # frames the talker's own loop was too stalled to send in time are the machine's
    late = talker.stats.dropped_deadline
    assert sum(loud_frames(heard.recorded)) >= 70 - late and gaps_after_start(heard.recorded) <= 2 + late
    assert len(listener.stats.latencies) >= 60 - late
    # The delay the buffer adds, from each frame's arrival to its playout, is bounded
    # by its cap (its target follows the machine's jitter; a continuous tone has no
    # pause to shrink back in); the path before it is the machine's.
    held = sorted(h - arrived[c] for h, c in listener.receiver.history if c in arrived)
    jitter = listener.receiver.sources["alice"].jitter
    assert len(held) >= 60 - late
    # the cap, and a frame of pop phase: it arrived just after a pop
    assert held[int(len(held) * 0.9)] <= jitter.max_age + jitter.frame, f"held past the cap: {held[-10:]}"
    assert listener.receiver.members == ["bob", "alice"]
    hub = audio_hub(next(iter(server.hub.sessions.values())))
    assert hub is not None and hub.stats.frames_out >= 70 and hub.stats.frames_malformed == 0
    await talker.client.close()
    await listener.client.close()


@pytest.mark.parametrize("side", ["listener", "talker"])
async def test_a_2s_cut_mid_call_leaves_no_backlog_and_latency_recovers_within_1s(
    server: Server, plugins: PluginManager, side: str
) -> None:
    relay = await Relay("127.0.0.1", server.port).start()
    listener, _ = await open_call(relay.port if side == "listener" else server.port, plugins, "bob")
    arrived = record_arrivals(listener)
    talker_port = relay.port if side == "talker" else server.port
    talker, _ = await open_call(talker_port, plugins, "alice", capture=FileCapture(talk_spurts(40.0)))
    cut_call = listener if side == "listener" else talker
    runs = asyncio.gather(talker.run(40), listener.run(40))

    def played_since(t: float) -> int:
        return sum(1 for h, _ in listener.receiver.history if h > t)

    # half a second to settle, then half a second of call to compare with (waited
    # for, not slept: a loaded machine takes longer to get there)
    await wait_for(lambda: listener.receiver.history, 10.0, "the call to start")
    settle = listener.receiver.history[0][0] + 0.5
    await wait_for(lambda: played_since(settle) >= 25, 10.0, "half a second of call")
    links = cut_call.client.links_opened
    relay.refuse = True
    relay.cut()
    cut_at = time.time()
    await asyncio.sleep(2.0)
    relay.refuse = False
    await wait_for(lambda: cut_call.client.links_opened > links, 2.0, "the reconnect")
    back_at = time.time()
    await wait_for(lambda: played_since(back_at + 1.0) >= 25, 10.0, "half a second of call 1 s after")
    for call in (talker, listener):
        call.stop()
    await runs
    history = list(listener.receiver.history)
    # no backlog: nothing captured while the link was down was played afterwards
    during = [(h, c) for h, c in history if cut_at + 0.15 < c < back_at - 0.15]
    assert not during, f"{len(during)} frames of the outage were played late"
    # Latency on a loaded machine is the machine's, and changes as its load does: judge
    # it against this run's own before the cut (from 0.5 s after playout started), and
    # judge the buffer by what it holds (arrival to playout) against its own target.
    before = sorted(h - c for h, c in history if settle < h < cut_at)
    after = [h - c for h, c in history if h > back_at]
    settled = sorted(h - c for h, c in history if h > back_at + 1.0)
    held = sorted(h - arrived[c] for h, c in history if h > back_at + 1.0 and c in arrived)
    assert len(before) >= 25 and len(settled) >= 25 and len(held) >= 25, (len(before), len(settled))
    before_p50, before_p99 = before[len(before) // 2], before[int(len(before) * 0.99)]
    assert after, "nothing played after the reconnect"
    # stale: further behind than the buffer's cap (120 ms) allows, as a backlog would be
    assert after[0] <= before_p50 + 0.120, "the first frame after the reconnect was stale"
    jitter = listener.receiver.sources["alice"].jitter
    settled_p50, held_p50 = settled[len(settled) // 2], held[len(held) // 2]
    figures = (
        f"before p50/p99 {before_p50 * 1000:.0f}/{before_p99 * 1000:.0f} ms, after 1 s p50 "
        f"{settled_p50 * 1000:.0f} ms, held p50 {held_p50 * 1000:.0f} ms, target {jitter.target} frames"
    )
    print(figures)
    # back within 1 s: the buffer holds no more than its target (and a frame of pop
    # phase). Not the delay before the cut plus a margin: the reconnect is work that
    # raises a loaded machine's jitter, and the target with it, by design.
    assert held_p50 <= (jitter.target + 1) * jitter.frame, f"the buffer is deeper than its target: {figures}"
    assert cut_call.stats.reconnects == 1
    if side == "talker":
        assert talker.stats.dropped_offline > 50  # dropped at the source, not queued
    await talker.client.close()
    await listener.client.close()
    await relay.close()


async def test_malformed_frames_are_counted_and_dropped_at_hub_and_listener(
    server: Server, plugins: PluginManager
) -> None:
    listener, heard = await open_call(server.port, plugins, "bob")
    rogue = await Client.connect("127.0.0.1", server.port, plugins=plugins)
    await rogue.request({"channel": "lobby", "name": "mallory", "codecs": ["pcm16"]}, "audio.join")
    garbage: list[Any] = [None, 5, "x", [1, 2, 3], {"seq": 1}, [1, -1, 0, 0, "pcm16", b"", ""], [9] * 7]
    for obj in garbage:
        assert rogue.send_realtime(obj, FRAME)
    hub = audio_hub(next(p for p in server.hub.sessions.values() if p.session_id == rogue.session_id))
    assert hub is not None
    await wait_for(lambda: hub.stats.frames_malformed == len(garbage), 2.0, "the hub to count them")
    assert hub.stats.frames_out == 0

    # a hub that forwards well-formed frames with junk payloads: the listener conceals
    now_us = int(time.time() * 1e6)
    for seq, (codec, payload) in enumerate([("pcm16", b"\x00" * 7), ("nosuch", b"x"), ("opus", b"\xff")] * 3):
        frame = AudioFrame(1, seq, now_us + seq * 20000, codec, payload, "mallory")
        assert rogue.send_realtime(frame.to_wire(), FRAME)
    # and malformed frames straight to the listener's session, as a rogue hub would
    sessions = server.hub.sessions.values()
    listener_peer = next(p for p in sessions if p.session_id == listener.client.session_id)
    for obj in garbage:
        listener_peer.send_realtime(obj, FRAME)
    await listener.run(0.5)
    assert listener.stats.malformed == len(garbage)
    assert listener.stats.undecodable >= 3
    assert heard.written >= 15, "playback stopped"
    await rogue.close()
    await listener.client.close()


async def test_push_to_talk_replays_what_a_listener_missed_exactly_once(
    server: Server, plugins: PluginManager
) -> None:
    relay = await Relay("127.0.0.1", server.port).start()
    away, away_heard = await open_call(relay.port, plugins, "bob")
    present, present_heard = await open_call(server.port, plugins, "carol")
    talker, _ = await open_call(server.port, plugins, "alice", capture=FileCapture(tone(5.0)), ptt=True)
    runs = asyncio.gather(talker.run(3.2), away.run(5.0), present.run(5.0))
    relay.refuse = True
    relay.cut()  # bob is away for the whole utterance
    talker.set_talking(True)
    await asyncio.sleep(1.2)  # a 1.2 s utterance: three parts on the reliable lane
    talker.set_talking(False)
    await asyncio.sleep(0.5)
    relay.refuse = False
    await runs
    assert talker.stats.parts_sent == 3
    assert away.stats.missed_parts_played == 3, "bob did not get the utterance he missed, once"
    assert away.stats.missed_parts_heard == 0
    assert present.stats.missed_parts_played == 0 and present.stats.missed_parts_heard == 3
    # bob's speaker played the missed tone (about 1.2 s), marked as a replay while it did
    assert tone_share(away_heard.recorded) * len(away_heard.recorded) * 0.02 >= 0.9
    assert tone_share(present_heard.recorded) * len(present_heard.recorded) * 0.02 >= 0.9
    # 1.2 s = 60 frames: bob heard them all, once, from the reliable copy (not twice)
    assert 55 <= sum(loud_frames(away_heard.recorded)) <= 66
    assert 55 <= sum(loud_frames(present_heard.recorded)) <= 66
    for call in (talker, away, present):
        await call.client.close()
    await relay.close()


async def test_codec_is_renegotiated_as_members_come_and_go(server: Server, plugins: PluginManager) -> None:
    if "opus" not in codecs.available():
        pytest.skip(f"opus unavailable: {codecs.opus_missing_reason()}")
    talker, _ = await open_call(server.port, plugins, "alice")
    assert talker.codec == "opus"
    client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
    old = Call(client, "lobby", "alice", None, FilePlayback(None), codecs=["pcm16"])  # same name
    await old.join()
    assert old.joined_as == "alice-2", "names are unique within a channel"
    await wait_for(lambda: talker.codec == "pcm16", 2.0, "the talker to fall back to pcm16")
    assert talker.receiver.members == ["alice", "alice-2"]
    await client.close()  # the session ends: the member leaves, the best codec is back
    await wait_for(lambda: talker.codec == "opus", 2.0, "the talker to go back to opus")
    assert talker.receiver.members == ["alice"]
    await talker.client.close()


async def test_a_join_with_a_bad_channel_name_is_rejected_with_the_reason(
    server: Server, plugins: PluginManager
) -> None:
    client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
    call = Call(client, "no spaces allowed", "alice", None, None)
    with pytest.raises(MessageRejected, match="channel name"):
        await call.join()
    await client.close()


async def test_a_jittery_link_is_smoothed_by_a_deeper_buffer(server: Server, plugins: PluginManager) -> None:
    """0-60 ms of random delay per chunk (in order) between the hub and the listener."""
    relay = await Relay("127.0.0.1", server.port, delay=(0.0, 0.060), seed=7).start()
    listener, heard = await open_call(relay.port, plugins, "bob")
    talker, _ = await open_call(server.port, plugins, "alice", capture=FileCapture(tone(3.0)))
    await asyncio.gather(talker.run(3.0), listener.run(3.2))
    jitter = listener.receiver.sources["alice"].jitter
    assert jitter.target > jitter.min_target, "the target did not adapt to the jitter"
    assert jitter.stats.concealed <= 0.08 * jitter.stats.received + jitter.idle_after
    assert gaps_after_start(heard.recorded) <= 8
    lat = sorted(listener.stats.latencies)
    assert lat[int(len(lat) * 0.99)] <= 0.060 + 0.120, "more than the link's jitter plus the cap"
    print(
        f"jittery link: target {jitter.target} frames, {jitter.stats}, p50 {lat[len(lat) // 2] * 1000:.0f} ms"
    )
    await talker.client.close()
    await listener.client.close()
    await relay.close()


def median_delay(call: Call, since: float, until: float) -> float | None:
    """Median capture-to-ear delay of the frames heard between two wall-clock times."""
    delays = sorted(h - c for h, c in call.receiver.history if since <= h < until)
    return delays[len(delays) // 2] if len(delays) >= 25 else None


@pytest.mark.parametrize("freeze", ["black_hole", "stall"])
async def test_after_a_2s_freeze_the_delay_is_back_within_10s(
    server: Server, plugins: PluginManager, freeze: str
) -> None:
    """The hub-to-listener link freezes for 2 s, open but passing nothing: what it
    carries is lost (black hole) or held and delivered in a burst (stall, as TCP does
    when a frozen link thaws). Within 10 s the delay is back within half a frame of
    before: the frames the buffer takes out to come back down are pauses of the talk
    spurts. "Before" is at least the buffer's target depth: a buffer that happened to
    run below its target before the freeze (a frame short since the call's start, at
    28 ms instead of 43) comes back to its target, not to that."""
    relay = await Relay("127.0.0.1", server.port).start()
    listener, _ = await open_call(relay.port, plugins, "bob")
    talker, _ = await open_call(server.port, plugins, "alice", capture=FileCapture(talk_spurts(40.0)))
    runs = asyncio.gather(talker.run(40), listener.run(40))
    start = time.time()
    await wait_for(lambda: median_delay(listener, start + 1.0, time.time()) is not None, 10, "a steady call")
    await asyncio.sleep(1.0)  # a realtime call: a second of delays to measure
    before = median_delay(listener, start + 1.0, time.time())
    assert before is not None
    if freeze == "stall":
        relay.stall()
    else:
        relay.black_hole = True
    await asyncio.sleep(2.0)
    relay.resume()
    relay.black_hole = False
    thawed = time.time()

    lasts: list[float] = []

    source = listener.receiver.sources["alice"]

    def recovered() -> bool:
        now = time.time()
        last = median_delay(listener, max(thawed, now - 1.0), now)
        if last is not None:
            lasts.append(last)
        buffer = source.jitter
        return last is not None and last <= max(before, buffer.target * buffer.frame) + buffer.frame / 2

    try:
        await wait_for(recovered, 10.0, "the delay to come back down")
    except AssertionError as exc:
        buffer = source.jitter
        trail = ", ".join(f"{x * 1000:.0f}" for x in lasts[:: max(1, len(lasts) // 20)])
        raise AssertionError(
            f"{exc}: before {before * 1000:.0f} ms; medians since the thaw (ms): {trail}; buffer depth "
            f"{buffer.depth} target {buffer.target} jitter {buffer.jitter * 1000:.1f} ms; {buffer.stats}"
        ) from None
    back = time.time() - thawed
    peak = max(h - c for h, c in listener.receiver.history if h > thawed)
    print(
        f"{freeze}: delay before {before * 1000:.0f} ms, peak {peak * 1000:.0f} ms, back within half a frame "
        f"after {back:.1f} s; {source.jitter.stats}"
    )
    for call in (talker, listener):
        call.stop()
    await runs
    await talker.client.close()
    await listener.client.close()
    await relay.close()


async def ptt_through_a_cut(
    server: Server,
    plugins: PluginManager,
    *,
    seconds: float,
    cut_at: float,
    cut_for: float,
    codec: str | None = None,
) -> dict[str, float]:
    """A push-to-talk pulse train; the listener's link is cut ``cut_at`` seconds into it
    for ``cut_for`` seconds. Returns the figures (see the test below)."""
    relay = await Relay("127.0.0.1", server.port).start()
    listener, heard = await open_call(relay.port, plugins, "bob")
    arrived = record_arrivals(listener)
    capture = FileCapture(pulse_train(seconds))
    talker, _ = await open_call(server.port, plugins, "alice", capture=capture, ptt=True)
    if codec is not None:
        talker.sender.use_codec(codec)
    dropped: set[int] = set()  # seqs the talker dropped (too old to send: a stalled loop)
    capture_frame = talker.sender.capture

    def capture_and_note(samples: Any, captured: float, now: float) -> Any:
        frame = capture_frame(samples, captured, now)
        if frame is None:
            dropped.add(talker.sender.seq - 1)
        return frame

    talker.sender.capture = capture_and_note  # type: ignore[method-assign]
    talker.set_talking(True)
    runs = asyncio.gather(talker.run(seconds + 60), listener.run(seconds + 60))
    frames_at_cut = int(cut_at / 0.020)
    await wait_for(lambda: capture.produced >= frames_at_cut, cut_at + 10, "the talker to reach the cut")
    links = listener.client.links_opened
    relay.refuse = True
    relay.cut()
    cut_time = time.time()
    await asyncio.sleep(cut_for)  # the outage
    relay.refuse = False
    await wait_for(lambda: listener.client.links_opened > links, 5.0, "the reconnect")
    back_at = time.time()
    await wait_for(lambda: listener.receiver.replaying, 5.0, "the catch-up to start")
    await wait_for(lambda: not listener.receiver.replaying, seconds, "the catch-up to meet the live edge")
    live_at = time.time()
    await wait_for(lambda: capture.finished, seconds + 10, "the end of the utterance")
    ended_at = time.time()
    target = listener.receiver.sources["alice"].jitter.target  # frames, as the machine's jitter set it
    talker.set_talking(False)
    await wait_for(lambda: not listener.receiver.replaying, 30.0, "the listener to catch up")
    await asyncio.sleep(0.3)  # the last frames through the jitter buffer
    for call in (talker, listener):
        call.stop()
    await runs
    # a pulse is in the first frame of its 100 ms (5 frames): that frame dropped at the
    # source is lost for everyone, live or not, and not what this measures
    lost = {seq // 5 for seq in dropped if seq % 5 == 0}
    once, missing, extra = compare_pulses(pulses_heard(heard.recorded), int(seconds / PULSE_EVERY), lost)
    delays = [(h, h - c) for h, c in listener.receiver.history if back_at < h < ended_at]
    live = sorted(d for h, d in delays if h > live_at)
    history = list(listener.receiver.history)
    before = sorted(h - c for h, c in history if history[0][0] + 0.5 < h < cut_time)
    held = sorted(h - arrived[c] for h, c in history if live_at < h < ended_at and c in arrived)
    figures = {
        "once": once, "missing": missing, "extra": extra,
        "peak_delay": max((d for _, d in delays), default=0.0),
        "live_edge_after": live_at - back_at,
        "live_for": ended_at - live_at,
        "live_p50": live[len(live) // 2] if live else 1.0,
        "live_p90": live[len(live) * 9 // 10] if live else 1.0,
        "before_p50": before[len(before) // 2] if before else 0.0,
        "live_held_p50": held[len(held) // 2] if held else 1.0,
        "target": target * 0.020,
        "cap": listener.receiver.sources["alice"].jitter.max_age,
        "parts_played": listener.stats.missed_parts_played,
        "lost_at_source": len(lost),
    }  # fmt: skip
    for call in (talker, listener):
        await call.client.close()
    await relay.close()
    return figures


async def test_push_to_talk_through_a_cut_loses_nothing_and_catches_up(
    server: Server, plugins: PluginManager
) -> None:
    """A 15 s utterance, the listener cut off 2 s into it for 2 s: every pulse is heard
    once (the missed ones, then what was said meanwhile, at 1.5x), and the delay is
    back to what it was before the cut within 10 s of the reconnect: the catch-up meets
    the live edge (about 4 s: 2 s missed, caught up at half a second per second) and
    live frames play from then on: the jitter buffer holds them (arrival to playout) a
    median under its cap, live, not seconds behind. Not a fixed delay: a loaded
    machine's path to the buffer is its own, and the target follows the jitter it
    makes (at load 26 the target at the end was 40 ms, the live median held 75 ms)."""
    figures = await ptt_through_a_cut(server, plugins, seconds=15.0, cut_at=2.0, cut_for=2.0)
    print(f"push-to-talk through a 2 s cut: {figures}")
    # the talker's own loop stalled past the deadline that often: say so, not "missing"
    assert figures["lost_at_source"] <= 6, f"the machine is too busy to measure this: {figures}"
    assert figures["missing"] == 0 and figures["extra"] == 0, figures
    assert figures["once"] + figures["lost_at_source"] == 150
    assert figures["live_edge_after"] <= 10.0, figures
    assert figures["live_for"] >= 0.5, figures
    assert figures["live_held_p50"] <= figures["cap"], figures
