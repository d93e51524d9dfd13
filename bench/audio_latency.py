"""korinet-audio latency: frames paced at 20 ms through a hub on loopback.

A hub runs in its own process (``korinet-audio serve``, TLS 1.3 by default). This
process runs N talker/listener pairs, each pair in its own channel: the talker sends
a tone paced by the clock as a sound card would (one 20 ms frame per 20 ms), the
listener's playout clock takes one frame per 20 ms out of its jitter buffer.
Capture-to-playout latency is measured for every frame played (capture time stamped
by the talker, playout time at the listener, one clock). CPU is sampled for the hub
process and for this one.

Then the same with a relay between the listeners and the hub that cuts every
connection every few seconds: latency must stay bounded and no frame captured while
a link was down may be played late (counted as "stale played": latency over 120 ms).

    python bench/audio_latency.py [--seconds 15] [--streams 1 4 8] [--cut-every 3] [--outage 1] [--codec opus]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the fault-injecting relay

from korinet_audio import codecs
from korinet_audio.talk import Call, run_calls
from korinet_audio.wavio import FileCapture, FilePlayback
from testutil.relay import Relay

from korinet import Client
from korinet.plugins import default_manager

RATE = 16000


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def start_hub(home: str, plaintext: bool) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "KORINET_HOME": home}
    args = [sys.executable, "-m", "korinet_audio.cli", "serve", "127.0.0.1:0"]
    args += ["--insecure-plaintext"] if plaintext else ["--no-client-auth"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if m := re.search(r"hub on 127\.0\.0\.1:(\d+)", line):
            return proc, int(m.group(1))
    proc.kill()
    raise RuntimeError("the hub did not start")


async def scenario(
    hub_port: int,
    hub_proc: psutil.Process,
    streams: int,
    seconds: float,
    codec: str,
    cut_every: float | None,
    plaintext: bool,
    outage: float = 0.0,
) -> dict[str, Any]:
    from korinet.security import ClientTLS, Identity

    plugins = default_manager()
    tls = None if plaintext else ClientTLS(Identity.load_or_create(), on_first_use=lambda *a: None)
    relay = await Relay("127.0.0.1", hub_port).start() if cut_every else None
    listen_port = relay.port if relay else hub_port
    calls: list[tuple[Call, Call]] = []
    for i in range(streams):
        lc = await Client.connect("127.0.0.1", listen_port, plugins=plugins, tls=tls, backoff_cap=0.2)
        tc = await Client.connect("127.0.0.1", hub_port, plugins=plugins, tls=tls)
        listener = Call(lc, f"ch{i}", "listener", None, FilePlayback(None), codecs=[codec])
        talker = Call(tc, f"ch{i}", "talker", FileCapture(tone(1.0), loop=True), None, codecs=[codec])
        await listener.join()
        await talker.join()
        calls.append((talker, listener))
    me = psutil.Process()
    cpu0, hub0, t0 = me.cpu_times(), hub_proc.cpu_times(), time.monotonic()

    async def cutter() -> None:
        assert relay is not None and cut_every
        while True:
            await asyncio.sleep(cut_every)
            relay.refuse = bool(outage)  # the hub looks down for a while: reconnects fail
            relay.cut()
            if outage:
                await asyncio.sleep(outage)
                relay.refuse = False

    cut_task = asyncio.create_task(cutter()) if relay else None
    # one audio clock for every endpoint in this process, as a multi-line client would
    await run_calls([c for pair in calls for c in pair], seconds)
    wall = time.monotonic() - t0
    cpu1, hub1 = me.cpu_times(), hub_proc.cpu_times()
    if cut_task:
        cut_task.cancel()
    latencies = [h - c for _, listener in calls for h, c in listener.receiver.history]
    played = sum(listener.receiver.sources["talker"].jitter.stats.played for _, listener in calls)
    concealed = sum(listener.receiver.concealed for _, listener in calls)
    sent = sum(talker.stats.frames_sent for talker, _ in calls)
    reconnects = sum(listener.stats.reconnects for _, listener in calls)
    for talker, listener in calls:
        await talker.client.close()
        await listener.client.close()
    if relay:
        await relay.close()
    client_cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall
    hub_cpu = (hub1.user + hub1.system - hub0.user - hub0.system) / wall
    return {
        "streams": streams,
        "codec": codec,
        "cuts": (f"every {cut_every:g} s" + (f", {outage:g} s down" if outage else ""))
        if cut_every
        else "none",
        "frames": played,
        "p50": pct(latencies, 0.5) * 1000,
        "p99": pct(latencies, 0.99) * 1000,
        "max": max(latencies) * 1000 if latencies else float("nan"),
        "stale": sum(lat > 0.120 for lat in latencies),
        "concealed": concealed / max(1, sent) * 100,
        "reconnects": reconnects,
        "hub_cpu": hub_cpu / streams * 100,
        "client_cpu": client_cpu / (2 * streams) * 100,
    }


def row(r: dict[str, Any]) -> str:
    return (
        f"| {r['streams']} | {r['codec']} | {r['cuts']} | {r['frames']} | {r['p50']:.1f} | {r['p99']:.1f} |"
        f" {r['max']:.1f} | {r['stale']} | {r['concealed']:.1f} | {r['reconnects']} | {r['hub_cpu']:.2f} |"
        f" {r['client_cpu']:.2f} |"
    )


HEADER = (
    "| streams | codec | relay cuts | frames played | p50 ms | p99 ms | max ms | played > 120 ms |"
    " concealed % | reconnects | hub CPU %/stream | client CPU %/endpoint |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as home:
        os.environ["KORINET_HOME"] = home
        hub, port = start_hub(home, args.plaintext)
        try:
            hub_proc = psutil.Process(hub.pid)
            print(HEADER, flush=True)
            first = args.streams[0]
            runs = [(n, args.codec, None, 0.0) for n in args.streams]
            runs += [
                (first, args.codec, args.cut_every, 0.0),
                (first, args.codec, args.cut_every, args.outage),
            ]
            if args.codec != codecs.PCM16:
                runs.append((first, codecs.PCM16, None, 0.0))
            for streams, codec, cut, outage in runs:
                r = await scenario(port, hub_proc, streams, args.seconds, codec, cut, args.plaintext, outage)
                print(row(r), flush=True)
        finally:
            hub.terminate()
            hub.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each run (default 15)")
    parser.add_argument(
        "--streams", type=int, nargs="+", default=[1, 4, 8], help="pairs per run (default 1 4 8)"
    )
    parser.add_argument("--cut-every", type=float, default=3.0, help="relay cut period, seconds (default 3)")
    parser.add_argument(
        "--outage", type=float, default=1.0, help="in the second cut run, seconds each cut lasts (default 1)"
    )
    default_codec = "opus" if "opus" in codecs.available() else codecs.PCM16
    parser.add_argument("--codec", default=default_codec, help=f"codec (default {default_codec})")
    parser.add_argument("--plaintext", action="store_true", help="no TLS between clients and hub")
    args = parser.parse_args()
    print(
        f"# korinet-audio latency, {args.seconds:g} s per run, {os.cpu_count()} CPUs,"
        f" python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f} at start"
    )
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
