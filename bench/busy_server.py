"""Stop-and-wait against a server whose event loop is busy with other work.

    python bench/busy_server.py [--spinners 0,20] [--runs 3] [-n 4000]

bench/core.py measures servers that do nothing else. A real server's loop also runs
other sessions' tasks: here K tasks stay always ready (each spins briefly, then
``await asyncio.sleep(0)``), so every loop turn runs all K. One client then sends
64 B messages stop-and-wait, ``await send()`` (KoriNet, the server's application
taking each with ``async for``) beside the raw asyncio echo of bench/peer_asyncio.py
(which answers from ``data_received``, with no application task at all). Any step
that waits for a later loop turn costs a pass over the K tasks per message.

The two alternate within each run; each cell is the median of the runs (min-max).
Set KORINET_DISABLE_PLUGINS to leave plugins out, as bench/core.py's tables do.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Awaitable, Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any

import peer_asyncio
import peer_korinet
from benchutil import spawn_child

SIZE = 64
BUDGET_S = 10.0


async def _with_spinners(k: int, serve: Awaitable[None]) -> None:
    async def spin() -> None:
        while True:
            for _ in range(50):  # a little work per turn, as a session's step would do
                pass
            await asyncio.sleep(0)

    spinners = [asyncio.ensure_future(spin()) for _ in range(k)]
    try:
        await serve
    finally:
        for task in spinners:
            task.cancel()


def korinet_server(conn: Connection, k: int) -> None:
    asyncio.run(_with_spinners(k, peer_korinet._serve(conn, 5.0, "consume")))


def raw_server(conn: Connection, k: int) -> None:
    asyncio.run(_with_spinners(k, peer_asyncio._serve(conn, "echo")))


Client = Callable[[int, int, int, float], Coroutine[Any, Any, tuple[int, float]]]


def _rate(server: Callable[[Connection, int], None], client: Client, k: int, n: int) -> float:
    with spawn_child(server, k) as (_, port):
        done, seconds = asyncio.run(client(port, n, SIZE, BUDGET_S))
    return done / seconds


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--spinners", default="0,20", help="comma-separated K: always-ready tasks on the server's loop"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("-n", type=int, default=4000, help="messages per measurement (at most 10 s each)")
    args = parser.parse_args()
    ks = [int(k) for k in args.spinners.split(",")]
    print(
        "| always-ready tasks on the server's loop | KoriNet `await send()`, msg/s"
        " | raw asyncio echo, round trips/s | ratio |"
    )
    print("|---:|---:|---:|---:|")
    for k in ks:
        ours: list[float] = []
        raw: list[float] = []
        for run in range(args.runs):
            ours.append(_rate(korinet_server, peer_korinet._stop_and_wait, k, args.n))
            raw.append(_rate(raw_server, peer_asyncio._echo_round_trips, k, args.n))
            print(f"  K={k} run {run + 1}: {ours[-1]:,.0f} / {raw[-1]:,.0f}", file=sys.stderr)
        ratio = statistics.median(ours) / statistics.median(raw)
        print(f"| {k} | {_cell(ours)} | {_cell(raw)} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
