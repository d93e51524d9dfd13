"""Chat rooms on a three-node NATS JetStream cluster (replicas 3): one node is killed
(-9) mid-conversation while clients are cut and come back, and every member still
sees every line once, in the log's order. Skipped without nats-server (unless CI=1)."""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

import pytest
from chat_helpers import WAIT, room_texts
from korinet_chat.client import ChatClient
from korinet_chat.cluster import decode_message, room_log
from test_chat_cluster import cluster, seqs
from testutil import TIMEOUT_FACTOR

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "plugins" / "nats" / "tests"))
from nats_server import nats_cluster, stream_leader

pytestmark = pytest.mark.timeout(180 * TIMEOUT_FACTOR)


async def test_three_hubs_lose_nothing_when_a_nats_node_dies(tmp_path: Path) -> None:
    from korinet_nats import NatsBus

    per_client = 10
    rng = random.Random(1515)
    async with nats_cluster(tmp_path) as nats:
        address = nats.urls + "?replicas=3"
        async with cluster(lambda: NatsBus(address), hubs=3) as c:
            clients = [await c.client(f"u{i:02d}", hub=i % 3) for i in range(30)]
            total = per_client * len(clients)
            said = [0]
            progressed = asyncio.Event()
            killed: list[str] = []

            async def reached(count: int) -> None:
                while said[0] < count:
                    progressed.clear()
                    await progressed.wait()

            async def cutter() -> None:
                # on progress, not on the clock: every cut and the kill land mid-conversation
                for milestone in range(20, 300, 30):
                    await reached(milestone)
                    relay = rng.choice(list(c.relays.values()))
                    await relay.wait_linked()
                    relay.cut()
                    if milestone >= 110 and not killed:  # about a third of the way
                        leader = await stream_leader(nats, f"KORINET_{room_log('general')}")
                        leader.kill()
                        killed.append(leader.workdir.name)

            async def talk(client: ChatClient) -> None:
                nick = client.nick
                for i in range(per_client):
                    # a cut client is in no room until it said hello again
                    await client.wait_for(lambda cl: "general" in cl.rooms, WAIT)
                    client.say(f"{nick} {i}")
                    said[0] += 1
                    progressed.set()
                    await asyncio.sleep(rng.uniform(0.005, 0.03))

            cutting = asyncio.create_task(cutter())
            await asyncio.gather(*(talk(cl) for cl in clients))
            await asyncio.wait_for(cutting, WAIT * 3)
            for client in clients:
                await client.wait_for(lambda cl: len(room_texts(cl)) >= total and not cl.pending, WAIT * 6)
            assert killed, "the node was never killed"
            reference = room_texts(clients[0])
            assert len(reference) == len(set(reference)) == total  # 0 lost, 0 duplicated
            for client in clients:
                assert room_texts(client) == reference, f"{client.nick} saw another order"
                assert seqs(client) == list(range(1, total + 1))
                mine = [t for t in reference if t.startswith(client.nick + " ")]
                assert mine == [f"{client.nick} {i}" for i in range(per_client)]
            # every member's view is the stream itself, as the two nodes left hold it
            bus = c.hubs[0].cluster.bus  # type: ignore[union-attr]
            entries = await bus.read(room_log("general"), 0, limit=total + 10)
            assert [e.seq for e in entries] == list(range(1, total + 1))
            assert [decode_message(e.data)["text"] for e in entries] == reference
            for hub in c.hubs:
                assert hub.history.head("general") == total
            assert sum(relay.cuts for relay in c.relays.values()) >= 9
