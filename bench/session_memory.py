"""Where an idle session's server memory goes: Python allocations per session, by site.

    python bench/session_memory.py [--sessions 500] [--top 12] [--echoes 0] [--repo PATH]

The server runs in a child process with tracemalloc on; this process opens N idle
plaintext sessions; the child compares snapshots from before and after and prints
bytes and blocks per session for the busiest allocation sites (3 frames each).
``--echoes K``: each client first sends K messages, each echoed by the server and
awaited both ways, so the sessions are idle again after some traffic (as a chat's).
``--repo`` imports korinet from another checkout (to compare two commits). It
counts what Python allocates, not RSS (bench/scale.py reports RSS per session).
Set KORINET_DISABLE_PLUGINS to leave plugins out.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import tracemalloc
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


def _server_main(conn: Connection, repo: str, n: int, top: int) -> None:
    sys.path.insert(0, repo)
    from korinet import Server, SessionConfig

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def idle(peer: Any) -> None:
            async for data in peer:
                await peer.send(data)  # only with --echoes

        kw: dict[str, Any] = {"handler": idle, "config": SessionConfig(heartbeat_interval=30)}
        try:
            server = Server(LOOPBACK, 0, max_sessions=100_000, max_connections_per_address=100_000, **kw)
        except TypeError:  # a checkout from before per-address limits
            server = Server(LOOPBACK, 0, max_sessions=100_000, **kw)
        await server.start()
        tracemalloc.start(3)
        conn.send(server.port)
        await loop.run_in_executor(None, conn.recv)
        before = tracemalloc.take_snapshot()
        conn.send("snapshot taken")
        await loop.run_in_executor(None, conn.recv)  # the sessions are open
        await asyncio.sleep(0.5)
        after = tracemalloc.take_snapshot()
        sessions = len(server.hub.sessions)
        stats = after.compare_to(before, "traceback")
        lines = [f"{sessions} sessions: {sum(s.size_diff for s in stats) / sessions:,.0f} B per session"]
        for stat in stats[:top]:
            frames = reversed(stat.traceback)  # the allocating line first, then its callers
            where = " <- ".join(
                f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}" for f in frames
            )
            per = f"{stat.size_diff / sessions:7,.0f} B {stat.count_diff / sessions:5.1f} blocks"
            lines.append(f"  {per}  {where}")
        conn.send("\n".join(lines))
        await server.close()

    asyncio.run(main())


async def _open(port: int, n: int, echoes: int) -> list[Any]:
    from korinet import Client

    clients = [await Client.connect(LOOPBACK, port) for _ in range(n)]
    for client in clients:
        for i in range(echoes):
            await client.send(i)
            assert await client.recv(timeout=30) == i
    return clients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=500)
    ap.add_argument("--top", type=int, default=12, help="allocation sites to list")
    ap.add_argument("--echoes", type=int, default=0, help="messages each session echoes first")
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent), help="checkout to import")
    args = ap.parse_args()
    sys.path.insert(0, args.repo)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_server_main, args=(child, args.repo, args.sessions, args.top), daemon=True)
    proc.start()
    port = parent.recv()

    async def run() -> None:
        parent.send("go")
        parent.recv()
        clients = await _open(port, args.sessions, args.echoes)
        parent.send("open")
        print(await asyncio.get_running_loop().run_in_executor(None, parent.recv))
        for client in clients:
            await client.close()

    asyncio.run(run())
    proc.join(30)


if __name__ == "__main__":
    main()
