"""korinet-chat benchmark: one hub, N clients in one room.

    python bench/chat_bench.py [--clients 200] [--senders 10] [--messages 100] [--tls]

The hub runs in its own process (``ChatHub`` on SQLite, flood control off), the
clients (headless ``ChatClient``s, the same code as the terminal UI) in this one.
Printed:

* hub memory per connected client: the hub's RSS after N clients joined, minus
  its RSS before, divided by N;
* latency: one client sends a message every 50 ms; for each message, the time
  until the *last* member has it (p50/p99 over the messages);
* throughput: ``senders`` clients send ``messages`` each, all at once; the time
  until every member has every message gives messages/s through the hub and
  deliveries/s (messages x members). The hub's CPU time over the same span says
  whether the hub or the (single) client process was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from korinet_chat.client import ChatClient, Line
from korinet_chat.hub import chat_plugins

from korinet import SessionConfig
from korinet.plugins import PluginManager

HUB = """
import asyncio, sys
from korinet_chat.hub import ChatHub, HubSettings
from korinet import SessionConfig
from korinet.plugins import PluginManager
from korinet_chat.hub import chat_plugins

async def main():
    hub = ChatHub(sys.argv[1], settings=HubSettings(rate=0))
    tls = None
    if sys.argv[2] == "tls":
        from korinet.security import Identity, ServerTLS
        tls = ServerTLS(Identity.load_or_create())
    plugins = chat_plugins(PluginManager.load(entry_points=False))
    server = hub.server("127.0.0.1", 0, plugins=plugins, tls=tls)
    await server.start()
    print(server.port, server.fingerprint or "", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


#: One process plays every client, so its loop can lag by seconds under a burst: a
#: long heartbeat keeps that lag from being taken for dead links.
CONFIG = SessionConfig(heartbeat_interval=15.0)


class Arrivals:
    """When each member saw each message (by text), from the client's line callback."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}

    def listener(self) -> Callable[[Line], None]:
        def on_line(line: Line) -> None:
            if line.kind == "msg":
                self.seen.setdefault(line.text, []).append(time.perf_counter())

        return on_line

    def count(self, text: str) -> int:
        return len(self.seen.get(text, ()))


async def wait_until(predicate: object, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise TimeoutError("the benchmark stalled")
        await asyncio.sleep(0.005)


async def run(args: argparse.Namespace) -> None:
    home = tempfile.mkdtemp(prefix="chat-bench-")
    env = {**os.environ, "KORINET_HOME": home}
    db = str(Path(home) / "chat.sqlite3")
    hub_proc = subprocess.Popen(
        [sys.executable, "-c", HUB, db, "tls" if args.tls else "plain"],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert hub_proc.stdout is not None
        port_text, _, fingerprint = hub_proc.stdout.readline().strip().partition(" ")
        port = int(port_text)
        hub = psutil.Process(hub_proc.pid)
        rss_before = hub.memory_info().rss
        plugins = chat_plugins(PluginManager.load(entry_points=False))
        tls = None
        if args.tls:
            os.environ["KORINET_HOME"] = home
            from korinet.security import ClientTLS

            tls = ClientTLS(fingerprint=fingerprint)
        arrivals = Arrivals()
        clients: list[ChatClient] = []
        t0 = time.perf_counter()
        for start in range(0, args.clients, 20):  # connect in waves: no SYN flood
            listener = arrivals.listener()
            wave = [
                ChatClient(
                    "127.0.0.1", port, f"u{i}", plugins=plugins, tls=tls, config=CONFIG, on_line=listener
                )
                for i in range(start, min(start + 20, args.clients))
            ]
            await asyncio.gather(*(c.start(open_timeout=30) for c in wave))
            clients.extend(wave)
        joined_in = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # let the hub settle (acks, allocator)
        rss_after = hub.memory_info().rss
        per_client = (rss_after - rss_before) / args.clients
        n = len(clients)

        # latency: a message every 50 ms, time until the last member has it
        latencies = []
        for i in range(args.latency_messages):
            text = f"lat {i}"
            sent = time.perf_counter()
            clients[i % n].say(text)
            await wait_until(lambda text=text: arrivals.count(text) >= n, 30)
            latencies.append(max(arrivals.seen[text]) - sent)
            await asyncio.sleep(0.05)
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000

        # throughput: senders blast, everyone must get everything
        senders = clients[: args.senders]
        total = args.senders * args.messages
        cpu0 = sum(hub.cpu_times()[:2])
        me = psutil.Process()
        own0 = sum(me.cpu_times()[:2])
        t0 = time.perf_counter()
        for j in range(args.messages):
            for k, sender in enumerate(senders):
                sender.say(f"tp {k} {j}")
        last = [f"tp {k} {args.messages - 1}" for k in range(args.senders)]
        await wait_until(lambda: all(arrivals.count(t) >= n for t in last), 300)
        elapsed = time.perf_counter() - t0
        hub_cpu = sum(hub.cpu_times()[:2]) - cpu0
        own_cpu = sum(me.cpu_times()[:2]) - own0
        got = sum(1 for text, times in arrivals.seen.items() if text.startswith("tp ") for _ in times)
        assert got == total * n, f"lost or duplicated deliveries: {got} != {total * n}"
        dups = sum(c.duplicates_dropped for c in clients)

        link = "TLS 1.3" if args.tls else "plaintext"
        cpus = os.cpu_count()
        print(f"korinet-chat benchmark: 1 hub, {n} clients in one room ({link}), loopback, {cpus} CPUs")
        print()
        print("| metric | value |")
        print("|---|---|")
        print(f"| clients connected and joined | {n} in {joined_in:.1f} s |")
        print(f"| hub RSS before / after | {rss_before / 2**20:.1f} MiB / {rss_after / 2**20:.1f} MiB |")
        print(f"| hub memory per connected client | {per_client / 1024:.1f} KiB |")
        print(f"| latency to reach all {n} members, p50 | {p50:.1f} ms |")
        print(f"| latency to reach all {n} members, p99 | {p99:.1f} ms ({len(latencies)} messages) |")
        print(f"| throughput, messages/s through the hub | {total / elapsed:,.0f} ({args.senders} senders x "
              f"{args.messages}) |")  # fmt: skip
        print(f"| deliveries/s (messages x members) | {total * n / elapsed:,.0f} |")
        share = 100 * hub_cpu / elapsed
        print(f"| hub CPU during the burst | {hub_cpu:.1f} s of {elapsed:.1f} s ({share:.0f}%) |")
        print(f"| client process CPU during the burst | {own_cpu:.1f} s ({100 * own_cpu / elapsed:.0f}%) |")
        print(f"| hub messages per CPU-second | {total / hub_cpu:,.0f} |" if hub_cpu else "| hub CPU | n/a |")
        print(f"| every delivery exactly once | yes ({got:,} deliveries, {dups} duplicates dropped) |")
        for c in clients:
            if c.peer is not None:
                await c.peer.abort()
    finally:
        hub_proc.terminate()
        hub_proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--senders", type=int, default=10)
    p.add_argument("--messages", type=int, default=100, help="per sender, in the throughput run")
    p.add_argument("--latency-messages", type=int, default=100)
    p.add_argument("--tls", action="store_true", help="TLS 1.3 between clients and hub")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
