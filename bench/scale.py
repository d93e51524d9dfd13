"""Scale: many concurrent heartbeating sessions on one server, then a reconnect storm.

    python bench/scale.py [--sessions 10000] [--storm 0.1] [--heartbeat 5]

The server runs in its own process; this process holds the clients. It reports
the time to open every session, the server's RSS per session, then cuts a share
of the connections at once (a reset each, as a switch reboot would) and reports
how long until every cut session resumed, whether any was lost, and the server's
peak accept rate (the reconnect backoff's jitter is what spreads that storm).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import socket
import struct
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from benchutil import LOOPBACK, spawn_child

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from korinet import Client, Server, SessionConfig
from korinet.builtin import ECHO

_LINGER_RST = struct.pack("ii", 1, 0)


def _raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(hard, max(soft, wanted))
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def server_main(conn: Connection, heartbeat: float, sessions: int) -> None:
    _raise_fd_limit(sessions + 1024)

    async def main() -> None:
        server = Server(
            LOOPBACK,
            0,
            config=SessionConfig(heartbeat_interval=heartbeat),
            max_sessions=sessions * 2,
            max_connections=sessions * 2,
            max_handshaking=sessions * 2,  # every client connects at once: none is dropped
            max_connections_per_address=sessions * 2,  # every client is on 127.0.0.1
            backlog=4096,
        )
        accepts: list[float] = []
        accept = server.hub.accept_socket

        def counting_accept(sock, ssl):  # type: ignore[no-untyped-def]
            accepts.append(time.monotonic())
            accept(sock, ssl)

        server.hub.accept_socket = counting_accept  # type: ignore[method-assign]
        await server.start()
        conn.send(server.port)
        while True:
            while not conn.poll(0):
                await asyncio.sleep(0.05)
            request = conn.recv()
            if request == "stats":
                conn.send(
                    {"rss_kib": _rss_kib(), "sessions": len(server.hub.sessions), "accepts": accepts[:]}
                )
            else:
                break
        await server.close()

    asyncio.run(main())


def peak_rate(stamps: list[float], since: float, bucket: float = 0.1) -> float:
    counts = collections.Counter(int((t - since) / bucket) for t in stamps if t >= since)
    return max(counts.values(), default=0) / bucket


async def run(args: argparse.Namespace) -> dict[str, float]:
    _raise_fd_limit(args.sessions + 1024)
    config = SessionConfig(heartbeat_interval=args.heartbeat)
    with spawn_child(server_main, args.heartbeat, args.sessions) as (conn, port):
        conn.send("stats")
        base = conn.recv()
        t0 = time.perf_counter()
        clients: list[Client] = []
        while len(clients) < args.sessions:
            batch = min(args.batch, args.sessions - len(clients))
            clients += await asyncio.gather(
                *(Client.connect(LOOPBACK, port, config=config, open_timeout=60) for _ in range(batch))
            )
            if not args.json:
                print(f"\r{len(clients)}/{args.sessions} sessions open", end="", file=sys.stderr, flush=True)
        open_s = time.perf_counter() - t0
        print(file=sys.stderr)
        await asyncio.sleep(args.heartbeat * 1.5)  # every session heartbeats at least once
        conn.send("stats")
        loaded = conn.recv()
        per_session = (loaded["rss_kib"] - base["rss_kib"]) / args.sessions

        # The storm: reset a share of the connections at the same instant.
        victims = clients[: int(len(clients) * args.storm)]
        ids = [c.session_id for c in victims]
        before = [c.links_opened for c in victims]
        cut_at = time.monotonic()
        for c in victims:
            assert c.conn is not None and c.conn.transport is not None
            sock = c.conn.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            c.conn.transport.abort()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(
            c.links_opened == b for c, b in zip(victims, before, strict=True)
        ):
            await asyncio.sleep(0.05)
        resumed_s = time.monotonic() - cut_at
        not_back = sum(c.links_opened == b for c, b in zip(victims, before, strict=True))
        changed = sum(c.session_id != i for c, i in zip(victims, ids, strict=True))
        replies = await asyncio.gather(
            *(c.request(n, ECHO, timeout=30) for n, c in enumerate(victims)), return_exceptions=True
        )
        wrong = sum(r != n for n, r in enumerate(replies))
        conn.send("stats")
        after = conn.recv()
        peak = peak_rate(after["accepts"], cut_at)
        await asyncio.gather(*(c.abort() for c in clients))

    return {
        "sessions": float(loaded["sessions"]),
        "open_s": open_s,
        "rss_kib_per_session": per_session,
        "storm_cut": float(len(victims)),
        "storm_resume_s": resumed_s,
        "storm_not_back": float(not_back),
        "storm_new_id": float(changed),
        "storm_failed": float(wrong),
        "storm_peak_accepts": peak,
    }


def report(args: argparse.Namespace, f: dict[str, float]) -> None:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"## Scale: {args.sessions:,} sessions, heartbeat {args.heartbeat:g} s ({when})\n")
    print("| figure | value |\n|---|---:|")
    print(f"| sessions open on the server | {f['sessions']:,.0f} |")
    rate = args.sessions / f["open_s"]
    print(f"| time to open them all ({args.batch} at a time) | {f['open_s']:.1f} s ({rate:,.0f}/s) |")
    print(f"| server RSS per session | {f['rss_kib_per_session']:.1f} KiB |")
    print(f"| storm: sessions cut at once | {f['storm_cut']:,.0f} |")
    print(f"| storm: time until every cut session resumed | {f['storm_resume_s']:.2f} s |")
    print(
        "| storm: sessions not back / given a new id / request failed | "
        f"{f['storm_not_back']:.0f} / {f['storm_new_id']:.0f} / {f['storm_failed']:.0f} |"
    )
    print(f"| storm: server peak accept rate (per 100 ms bucket) | {f['storm_peak_accepts']:,.0f}/s |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument(
        "--storm", type=float, default=0.1, help="share of sessions cut at once (default 0.1)"
    )
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=200, help="sessions opened concurrently")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="give up (and fail) after this long")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args()
    # Bounded as a whole: a stalled connect or a session that never resumes fails the run.
    figures = asyncio.run(asyncio.wait_for(run(args), args.max_seconds))
    if args.json:
        print(json.dumps(figures))
    else:
        report(args, figures)


if __name__ == "__main__":
    main()
