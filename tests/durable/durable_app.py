"""A KoriNet application with a durable store, run as a process that tests kill -9.

    python durable_app.py server PORT STORE RECORD N
    python durable_app.py client PORT STORE RECORD N

Each side sends the numbers 1..N to the other ({"n": i}) and records every number it
receives twice:

* in a table of its store (``app_received``), written in the loop turn in which
  ``recv()`` returned the message, so it commits atomically with the delivery: this
  record must hold 1..N exactly once, in order, whatever the kills;
* appended to the file RECORD (an application that keeps its own file): no loss and
  in order, but a kill between the append and the commit may replay a few.

After a restart, a side resumes sending at ``peer.last_seq + 1``: every message it
had accepted is in the store, and the store knows the last seq. The client exits 0
once it has received N and all its N are acknowledged; the server runs until killed.
Sending is paced (bursts, then a short sleep) so that a kill lands mid-stream.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

from korinet import Client, Peer, Server
from korinet.plugins import PluginManager

BURST = 25
PAUSE = 0.002
MAX_RUN_S = 60.0  # no process of ours outlives a lost test


async def receive_all(peer: Peer, record_path: str, n: int) -> None:
    store = peer.store
    assert store is not None
    db = store.db
    db.execute("CREATE TABLE IF NOT EXISTS app_received (n INTEGER NOT NULL)")
    db.commit()
    have = db.execute("SELECT count(*) FROM app_received").fetchone()[0]
    fd = os.open(record_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while have < n:
            msg = await peer.recv_message()
            # Same loop turn as recv(): this row commits with the delivery.
            db.execute("INSERT INTO app_received (n) VALUES (?)", (msg.data["n"],))
            os.write(fd, b"%d\n" % msg.data["n"])
            have += 1
    finally:
        os.close(fd)


async def send_all(peer: Peer, n: int, sent_path: str) -> None:
    first = peer.last_seq + 1  # everything up to last_seq was accepted (and is stored)
    print(f"{type(peer).__name__} sends from {first}", flush=True)
    # What post() accepted, as the application saw it: the test checks that a
    # restarted process never starts below a number logged here.
    fd = os.open(sent_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(fd, b"start %d\n" % first)
    last = peer.last_seq
    try:
        for i in range(first, n + 1):
            if i - peer.session.acked > 512:
                await peer.wait_acked(i - 256)
            last = peer.post({"n": i})
            os.write(fd, b"%d\n" % i)
            assert last == i, (last, i)  # one seq per number: the session never expired
            if i % BURST == 0:
                await asyncio.sleep(PAUSE)
    finally:
        os.close(fd)
    await peer.wait_acked(last)


async def run_server(port: int, store: str, record: str, n: int) -> None:
    async def handler(peer: Peer) -> None:
        PEER["peer"] = peer
        sender = asyncio.create_task(send_all(peer, n, record + ".sent"))
        try:
            await receive_all(peer, record, n)
            await sender
            await peer.closed  # the client closes the session
        finally:
            sender.cancel()

    dump_on_sigusr1(PEER)
    plugins = PluginManager.load(entry_points=False)
    server = await Server("127.0.0.1", port, handler=handler, plugins=plugins, store=store).start()
    print(f"server up with {len(server.hub.sessions)} restored session(s)", flush=True)
    await asyncio.sleep(MAX_RUN_S)
    await server.close()


async def run_client(port: int, store: str, record: str, n: int) -> None:
    plugins = PluginManager.load(entry_points=False)
    dump_on_sigusr1(PEER)
    client = Client("127.0.0.1", port, plugins=plugins, store=store, backoff_cap=0.2)
    PEER["peer"] = client
    client.start()
    await client.wait_connected(20)
    print(f"client session {client.session_id} last_seq {client.last_seq}", flush=True)
    await asyncio.gather(send_all(client, n, record + ".sent"), receive_all(client, record, n))
    await client.close()
    print("client done", flush=True)


def dump_on_sigusr1(peer_holder: dict[str, Any]) -> None:
    """SIGUSR1 prints every task's stack and the peer's state (a test that times out
    asks for it before killing us)."""

    def dump() -> None:
        peer = peer_holder.get("peer")
        if peer is not None:
            print(f"DUMP {peer!r} conn={peer.conn!r} closed={peer.is_closed}", flush=True)
            print(f"DUMP session {peer.session.snapshot(messages=False)}", flush=True)
        for task in asyncio.all_tasks():
            print(f"DUMP task {task!r}", flush=True)
            task.print_stack(file=sys.stdout)
        sys.stdout.flush()

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)


PEER: dict[str, Any] = {}


def main() -> None:
    if os.environ.get("DURABLE_APP_LOG"):
        import logging

        logging.basicConfig(level=os.environ["DURABLE_APP_LOG"], format="%(asctime)s %(name)s %(message)s")
    role, port, store, record, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    run = run_server if role == "server" else run_client
    started = time.monotonic()
    asyncio.run(asyncio.wait_for(run(port, store, record, n), MAX_RUN_S + 5))
    print(f"{role} exits after {time.monotonic() - started:.1f}s", flush=True)


if __name__ == "__main__":
    main()
