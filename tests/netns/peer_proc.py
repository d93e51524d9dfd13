"""One side of a fault-injection run, started by the test inside a network namespace.

    python peer_proc.py server HOST PORT COUNT HEARTBEAT OUT.json
    python peer_proc.py client HOST PORT COUNT HEARTBEAT OUT.json

Each side sends COUNT numbered messages, paced over a few seconds so that the
faults hit live traffic, and records what it receives, when (CLOCK_MONOTONIC is
shared by every process of the machine), and when its links were lost. The
client exits once it has everything and every message of its own is acknowledged;
the server writes its results as they grow and runs until the test stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from korinet import Client, Server, SessionConfig, hookimpl
from korinet.plugins import PluginManager

PACE_EVERY = 20  # messages between pauses
PACE_SLEEP = 0.02  # seconds: COUNT=3000 spreads over about 3 s of sending


class LinkLog:
    def __init__(self) -> None:
        self.lost: list[float] = []
        self.resumed: list[float] = []

    @hookimpl
    def korinet_session_lost(self, session: Any, error: BaseException) -> None:
        self.lost.append(time.monotonic())

    @hookimpl
    def korinet_session_resumed(self, session: Any, replayed: int) -> None:
        self.resumed.append(time.monotonic())


async def send_all(peer: Any, count: int) -> None:
    last = 0
    for i in range(count):
        while True:
            try:
                last = peer.post({"n": i})
                break
            except Exception as exc:  # SendBufferFull: wait for acks (backpressure)
                if type(exc).__name__ != "SendBufferFull":
                    raise
                await peer.wait_acked(last - peer.session.send_window // 2)
        if i % PACE_EVERY == 0:
            await asyncio.sleep(PACE_SLEEP)
    await peer.wait_acked(last)


async def receive_all(peer: Any, count: int, got: list[int], times: list[float]) -> None:
    while len(got) < count:
        got.append((await peer.recv())["n"])
        times.append(time.monotonic())


def dump(out: Path, **fields: Any) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(fields))
    tmp.replace(out)


async def main(role: str, host: str, port: int, count: int, heartbeat: float, out: Path) -> None:
    log = LinkLog()
    plugins = PluginManager.load(entry_points=False, extra=[log])
    config = SessionConfig(heartbeat_interval=heartbeat)
    got: list[int] = []
    times: list[float] = []

    if role == "server":
        finished = asyncio.Event()

        async def handler(peer: Any) -> None:
            await asyncio.gather(send_all(peer, count), receive_all(peer, count, got, times))
            finished.set()
            await asyncio.sleep(3600)

        server = await Server(host, port, handler=handler, plugins=plugins, config=config).start()
        print("ready", flush=True)
        while not finished.is_set():  # partial results, for a test that times out
            dump(out, got=got, times=times, lost=log.lost, resumed=log.resumed, done=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), 0.2)
        dump(out, got=got, times=times, lost=log.lost, resumed=log.resumed, done=True)
        await asyncio.sleep(3600)  # the test stops us
        await server.close()
    else:
        client = await Client.connect(
            host, port, plugins=plugins, config=config, connect_timeout=0.5, backoff_cap=0.5, open_timeout=10
        )
        print("ready", flush=True)
        await asyncio.gather(send_all(client, count), receive_all(client, count, got, times))
        dump(
            out,
            got=got,
            times=times,
            lost=log.lost,
            resumed=log.resumed,
            session=client.session_id,
            resumes=client.session.stats.resumes,
            done=True,
        )
        await client.close()


if __name__ == "__main__":
    role, host, port, count, heartbeat, out = sys.argv[1:7]
    asyncio.run(main(role, host, int(port), int(count), float(heartbeat), Path(out)))
