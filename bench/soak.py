"""Soak: traffic both ways for a long time with a connection cut every few seconds.

    python bench/soak.py [--minutes 30] [--cut-every 3] [--rate 5000] [--png bench/soak.png]

The server runs in its own process. Every 10 s the script samples throughput and
the RSS and open file descriptors of both processes; at the end it checks that
every message arrived exactly once and in order, prints the samples and the
growth after warm-up (first 20% of the run), and draws them (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import struct
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from benchutil import LOOPBACK, spawn_child

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from korinet import Client, Peer, Server, SessionConfig

_LINGER_RST = struct.pack("ii", 1, 0)


def proc_figures(pid: int) -> tuple[int, int]:
    """(RSS KiB, open fds) of a process."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def server_main(conn: Connection) -> None:
    async def main() -> None:
        async def echo_counter(peer: Peer) -> None:
            expected = 0
            async for n in peer:  # check order here too, and answer every message
                if n != expected:
                    raise SystemExit(f"server: got {n}, expected {expected}")
                expected += 1
                peer.post(n)

        server = await Server(
            LOOPBACK, 0, handler=echo_counter, config=SessionConfig(heartbeat_interval=2.0)
        ).start()
        conn.send((server.port, os.getpid()))
        while not conn.poll(0):
            await asyncio.sleep(0.2)
        await server.close()

    asyncio.run(main())


async def run(args: argparse.Namespace) -> tuple[list[dict[str, float]], dict[str, float]]:
    rng = random.Random(7)
    with spawn_child(server_main) as (_, (port, server_pid)):
        client = await Client.connect(LOOPBACK, port, config=SessionConfig(heartbeat_interval=2.0))
        sent = received = cuts = 0
        samples: list[dict[str, float]] = []
        started = time.monotonic()
        stop_at = started + args.minutes * 60

        async def sender() -> None:
            nonlocal sent
            while time.monotonic() < stop_at:
                try:
                    client.post(sent)
                    sent += 1
                except Exception as exc:  # SendBufferFull: wait for acks
                    if type(exc).__name__ != "SendBufferFull":
                        raise
                    await client.wait_acked(client.session.acked + 1)
                if sent % 100 == 0:
                    await asyncio.sleep(100 / args.rate)  # a steady stream, not a flood

        async def receiver() -> None:
            nonlocal received
            while True:
                n = await client.recv()
                if n != received:
                    raise SystemExit(f"client: got {n}, expected {received}")
                received += 1

        async def cutter() -> None:
            nonlocal cuts
            while time.monotonic() < stop_at:
                await asyncio.sleep(rng.uniform(0.5, 1.5) * args.cut_every)
                conn = client.conn
                if conn is not None and conn.transport is not None:
                    conn.transport.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST
                    )
                    conn.transport.abort()
                    cuts += 1

        async def sampler() -> None:
            start = time.monotonic()
            last = received
            while time.monotonic() < stop_at:
                await asyncio.sleep(args.sample_every)
                s_rss, s_fds = proc_figures(server_pid)
                c_rss, c_fds = proc_figures(os.getpid())
                samples.append(
                    {
                        "t": time.monotonic() - start,
                        "rate": (received - last) / args.sample_every,
                        "server_rss": s_rss,
                        "server_fds": s_fds,
                        "client_rss": c_rss,
                        "client_fds": c_fds,
                        "cuts": cuts,
                    }
                )
                last = received
                print(f"\r{samples[-1]['t']:.0f}s {received:,} echoed, {cuts} cuts", end="", file=sys.stderr)

        recv_task = asyncio.create_task(receiver())
        await asyncio.gather(sender(), cutter(), sampler())
        deadline = time.monotonic() + 60
        while received < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        recv_task.cancel()
        print(file=sys.stderr)
        elapsed = time.monotonic() - started
        print(
            f"sent {sent:,}, echoed back {received:,} exactly once in order, {cuts} cuts",
            file=sys.stderr if args.json else sys.stdout,
        )
        assert received == sent, f"{sent - received} messages missing"
        await client.close()
    totals = {"sent": float(sent), "echoed": float(received), "cuts": float(cuts)}
    totals["rate"] = received / elapsed
    return samples, totals


def growth(samples: list[dict[str, float]], key: str) -> float:
    """Percent change of a sampled figure from the end of warm-up (first 20%) to the end."""
    warm = samples[max(1, len(samples) // 5) - 1]
    return (samples[-1][key] - warm[key]) / warm[key] * 100 if warm[key] else 0.0


def report(samples: list[dict[str, float]], png: Path) -> None:
    warm = samples[max(1, len(samples) // 5) - 1]
    last = samples[-1]
    print("\n| t (s) | msgs/s | server RSS KiB | server fds | client RSS KiB | client fds | cuts |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for s in samples:
        print(
            f"| {s['t']:.0f} | {s['rate']:,.0f} | {s['server_rss']:,.0f} | {s['server_fds']:.0f} "
            f"| {s['client_rss']:,.0f} | {s['client_fds']:.0f} | {s['cuts']:.0f} |"
        )
    for key in ("server_rss", "server_fds", "client_rss", "client_fds"):
        print(
            f"{key}: {warm[key]:,.0f} after warm-up -> {last[key]:,.0f} at the end "
            f"({growth(samples, key):+.1f}%)"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [s["rate"] for s in samples])
    axes[0].set_ylabel("echoed msgs/s")
    axes[1].plot(t, [s["server_rss"] / 1024 for s in samples], label="server")
    axes[1].plot(t, [s["client_rss"] / 1024 for s in samples], label="client")
    axes[1].set_ylabel("RSS (MiB)")
    axes[1].legend()
    axes[2].plot(t, [s["server_fds"] for s in samples], label="server")
    axes[2].plot(t, [s["client_fds"] for s in samples], label="client")
    axes[2].set_ylabel("open fds")
    axes[2].set_xlabel(f"minutes ({last['cuts']:.0f} connection cuts)")
    axes[2].legend()
    fig.suptitle("KoriNet soak: traffic both ways, a cut every few seconds")
    fig.tight_layout()
    fig.savefig(png)
    print(f"plot: {png}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--cut-every", type=float, default=3.0, help="mean seconds between cuts")
    parser.add_argument("--rate", type=float, default=5000, help="messages per second at most")
    parser.add_argument("--png", type=Path, default=Path(__file__).parent / "results" / "soak.png")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument(
        "--json", action="store_true", help="print only a JSON summary line (a short soak: --minutes 1)"
    )
    args = parser.parse_args()
    samples, totals = asyncio.run(run(args))
    if args.json:
        totals["server_rss_growth_pct"] = growth(samples, "server_rss")
        totals["client_rss_growth_pct"] = growth(samples, "client_rss")
        totals["server_fds_growth"] = samples[-1]["server_fds"] - samples[0]["server_fds"]
        print(json.dumps(totals))
    else:
        report(samples, args.png)


if __name__ == "__main__":
    main()
