"""korinet-chat through the cluster bus: messages/s of one room, one hub alone
against the same hub on NATS and three hubs sharing the room through one NATS.

    python bench/chat_cluster.py [--clients 30] [--senders 10] [--messages 100]

Each hub is a ``korinet-chat serve`` process (flood control off, history in
memory); NATS is a ``nats-server -js`` on a loopback port (Debian package
nats-server); the clients (headless ``ChatClient``s) share this process, spread
evenly over the hubs, all in one room. ``senders`` of them send ``messages`` each,
all at once; the time until every member has every message gives messages/s
through the room and deliveries/s (messages x members).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from korinet_chat.client import ChatClient
from korinet_chat.hub import chat_plugins

from korinet.plugins import PluginManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "nats" / "tests"))
from nats_server import NatsServer


async def hub_process(cluster: str | None, home: str) -> tuple[asyncio.subprocess.Process, int]:
    command = [sys.executable, "-c", "from korinet_chat.cli import main; raise SystemExit(main())",
               "serve", "--host", "127.0.0.1", "--port", "0", "--db", ":memory:", "--no-announce",
               "--insecure-plaintext", "--rate", "0"]  # fmt: skip
    if cluster:
        command += ["--cluster", cluster]
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "KORINET_HOME": home},
    )
    assert proc.stdout is not None
    first = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    if not first.startswith("korinet-chat hub on"):
        raise RuntimeError(f"the hub did not start: {first!r}")
    return proc, int(first.split(":")[1].split(",")[0])


async def run_once(ports: list[int], args: argparse.Namespace, room: str) -> tuple[float, int]:
    plugins = chat_plugins(PluginManager.load(entry_points=False))
    clients = []
    for i in range(args.clients):
        client = ChatClient("127.0.0.1", ports[i % len(ports)], f"c{i}", room=room, plugins=plugins)
        await client.start(open_timeout=30)
        clients.append(client)
    total = args.senders * args.messages
    counts = [0] * len(clients)
    done = asyncio.Event()
    finished = [0]

    def listener(index: int):  # type: ignore[no-untyped-def]
        def on_line(line) -> None:  # type: ignore[no-untyped-def]
            if line.kind == "msg" and line.room == room:
                counts[index] += 1
                if counts[index] == total:
                    finished[0] += 1
                    if finished[0] == len(clients):
                        done.set()

        return on_line

    for index, client in enumerate(clients):
        client.listeners.append(listener(index))
    started = time.perf_counter()
    for s in range(args.senders):
        for m in range(args.messages):
            clients[s * len(clients) // args.senders].say(f"s{s} m{m}")
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.close()
    return elapsed, total


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServer(Path(tmp) / "nats").start()
        try:
            setups = [
                ("1 hub, no bus", 1, None),
                ("1 hub on NATS", 1, nats.url),
                ("3 hubs on NATS", 3, nats.url),
            ]
            print(f"{args.clients} clients in one room, {args.senders} senders x {args.messages} messages")
            print("| set-up | messages/s | deliveries/s |")
            print("|---|---|---|")
            for n, (name, hubs, cluster) in enumerate(setups):
                procs = [await hub_process(cluster, tmp) for _ in range(hubs)]
                try:
                    elapsed, total = await run_once([port for _, port in procs], args, f"bench{n}")
                finally:
                    for proc, _ in procs:
                        proc.terminate()
                        await proc.wait()
                print(
                    f"| {name} | {total / elapsed:,.0f} | {total * args.clients / elapsed:,.0f} |", flush=True
                )
        finally:
            nats.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=30)
    p.add_argument("--senders", type=int, default=10)
    p.add_argument("--messages", type=int, default=100, help="per sender")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
