"""What the durable session store costs: pipelined 64-byte messages, client -> server,
the server in a spawned process consuming with ``async for``, acks meaning "the
application has it" as always. Rows: no store, a store on the client only, on the
server only, on both, and on both with synchronous=FULL (survives power loss).

    python bench/durable_store.py [--messages 20000] [--repeat 3]

Prints a markdown table (median of the repeats). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from benchutil import ACK_EVERY, CHILD_MAX_S, DRAIN_S, LOOPBACK, WINDOW, Deadline, spawn_child

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's korinet

import korinet
from korinet import Client, Server
from korinet.plugins import PluginManager
from korinet.runtime.store import SessionStore

SIZE = 64


async def _serve(conn: Connection, store: str | None, synchronous: str) -> None:
    async def consume(peer: korinet.Peer) -> None:
        async for _ in peer:
            pass

    plugins = PluginManager.load(entry_points=False)
    the_store = SessionStore(store, synchronous=synchronous) if store else None
    server = await Server(LOOPBACK, 0, handler=consume, plugins=plugins, store=the_store).start()
    conn.send(server.port)
    deadline = Deadline(CHILD_MAX_S)
    while not deadline.expired() and not conn.poll(0):
        await asyncio.sleep(0.05)
    await server.close()
    if the_store is not None:
        the_store.close()


def server_main(conn: Connection, store: str | None, synchronous: str) -> None:
    asyncio.run(_serve(conn, store, synchronous))


async def _pipelined(port: int, n: int, store: str | None, synchronous: str, batch: int) -> float:
    plugins = PluginManager.load(entry_points=False)
    the_store = SessionStore(store, synchronous=synchronous) if store else None
    client = await Client.connect(LOOPBACK, port, plugins=plugins, store=the_store)
    payload = os.urandom(SIZE)
    try:
        await client.send(payload)  # warm-up
        last = 0
        t0 = time.perf_counter()
        done = 0
        while done < n:
            if last - client.session.acked >= WINDOW:
                await client.wait_acked(last - WINDOW + ACK_EVERY, timeout=DRAIN_S)
            if batch and the_store is not None:
                with the_store.batch():  # one commit for the group
                    for _ in range(min(batch, n - done)):
                        last = client.post(payload)
                        done += 1
            else:
                last = client.post(payload)
                done += 1
        await client.wait_acked(last, timeout=DRAIN_S)
        return n / (time.perf_counter() - t0)
    finally:
        await client.close()
        if the_store is not None:
            the_store.close()


def run(n: int, client_store: bool, server_store: bool, synchronous: str, batch: int) -> float:
    with tempfile.TemporaryDirectory(prefix="korinet-bench-") as tmp:
        server_db = str(Path(tmp) / "server.db") if server_store else None
        client_db = str(Path(tmp) / "client.db") if client_store else None
        with spawn_child(server_main, server_db, synchronous) as (_, port):
            return asyncio.run(_pipelined(port, n, client_db, synchronous, batch))


ROWS = (  # name, client store, server store, synchronous, posts per store.batch()
    ("no store", False, False, "NORMAL", 0),
    ("client store", True, False, "NORMAL", 0),
    ("server store", False, True, "NORMAL", 0),
    ("both stores", True, True, "NORMAL", 0),
    ("both stores, post() in batches of 64", True, True, "NORMAL", 64),
    ("both stores, synchronous=FULL", True, True, "FULL", 0),
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: list[tuple[str, float]] = []
    for name, client_store, server_store, synchronous, batch in ROWS:
        n = args.messages if synchronous == "NORMAL" else max(args.messages // 10, 500)
        rates = [run(n, client_store, server_store, synchronous, batch) for _ in range(args.repeat)]
        results.append((name, statistics.median(rates)))
        print(f"{name}: {results[-1][1]:,.0f} msg/s", file=sys.stderr, flush=True)
    base = results[0][1]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\n## Durable store: pipelined {SIZE} B client -> server ({when})\n")
    print(f"median of {args.repeat} runs of {args.messages:,} messages (FULL: a tenth); loopback, 2 cores\n")
    print("| setup | msg/s | vs no store |")
    print("|---|---:|---:|")
    for name, rate in results:
        print(f"| {name} | {rate:,.0f} | {rate / base:.0%} |")


if __name__ == "__main__":
    main()
