"""Chat rooms shared by several hubs through the cluster bus (apps/chat/cluster.py):
first with hubs sharing one in-process LocalBus, then with hubs each on its own
connection to a real nats-server (skipped when it is not installed, unless CI=1)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from chat_helpers import WAIT, come_back, fresh_plugins, go_down, has_line, lines_of, room_texts
from korinet_chat.client import ChatClient, Pending
from korinet_chat.cluster import NICK_SPACE, nick_name, room_log
from korinet_chat.hub import ChatHub, HubSettings
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Server
from korinet.cluster import ClusterBus, LocalBus
from korinet.plugins import PluginManager

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "plugins" / "nats" / "tests"))
from nats_server import NatsServer

pytestmark = pytest.mark.timeout(120 * TIMEOUT_FACTOR)


@dataclass
class Cluster:
    """Hubs on one bus, and clients each behind a relay to one of them."""

    plugins: PluginManager
    make_bus: Callable[[], ClusterBus]
    hubs: list[ChatHub] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)
    relays: dict[str, Relay] = field(default_factory=dict)
    clients: dict[str, ChatClient] = field(default_factory=dict)

    async def add_hub(self) -> int:
        hub = ChatHub(settings=HubSettings(rate=0), bus=self.make_bus(), hub_id=f"hub{len(self.hubs)}")
        await hub.start()
        server = hub.server("127.0.0.1", 0, plugins=self.plugins)
        await server.start()
        self.hubs.append(hub)
        self.servers.append(server)
        return len(self.hubs) - 1

    async def client(self, nick: str, hub: int, room: str | None = "general") -> ChatClient:
        relay = await Relay("127.0.0.1", self.servers[hub].port).start()
        client = ChatClient("127.0.0.1", relay.port, nick, room=room, plugins=self.plugins)
        await client.start(open_timeout=WAIT)
        self.relays[nick] = relay
        self.clients[nick] = client
        return client

    async def close_hub(self, index: int) -> None:
        """Stop a hub mid-conversation (its sessions end, its nicks are freed)."""
        await self.servers[index].close()
        await self.hubs[index].aclose()

    def move(self, nick: str, hub: int) -> None:
        """Point a client's relay at another hub and cut its link: the client finds its
        session unknown there, says hello again and re-sends what is unacknowledged."""
        relay = self.relays[nick]
        relay.target = ("127.0.0.1", self.servers[hub].port)
        relay.cut()

    async def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        for relay in self.relays.values():
            await relay.close()
        for server, hub in zip(self.servers, self.hubs, strict=True):
            await server.close()
            if not hub.closing:
                await hub.aclose()


@contextlib.asynccontextmanager
async def cluster(make_bus: Callable[[], ClusterBus], hubs: int = 2) -> AsyncIterator[Cluster]:
    c = Cluster(fresh_plugins(), make_bus)
    try:
        for _ in range(hubs):
            await c.add_hub()
        yield c
    finally:
        await c.close()


def local() -> Callable[[], ClusterBus]:
    bus = LocalBus()
    return lambda: bus


def seqs(client: ChatClient, room: str = "general") -> list[int | None]:
    return [line.seq for line in client.lines if line.kind == "msg" and line.room == room]


# ---------------------------------------------------------------------- LocalBus


async def test_members_of_three_hubs_see_every_message_once_in_one_order() -> None:
    per_client = 15
    async with cluster(local(), hubs=3) as c:
        clients = [await c.client(f"u{i}", hub=i % 3) for i in range(6)]
        for i in range(per_client):
            for client in clients:
                client.say(f"{client.nick} {i}")
        total = per_client * len(clients)
        for client in clients:
            await client.wait_for(lambda cl: len(room_texts(cl)) >= total and not cl.pending, WAIT)
        reference = room_texts(clients[0])
        assert len(reference) == len(set(reference)) == total
        for client in clients:
            assert room_texts(client) == reference, f"{client.nick} saw another order"
            assert seqs(client) == list(range(1, total + 1))
            mine = [t for t in reference if t.startswith(client.nick + " ")]
            assert mine == [f"{client.nick} {i}" for i in range(per_client)]  # each sender's order kept
        for hub in c.hubs:  # every hub stored the room under the log's numbers
            assert hub.history.head("general") == total
            assert [r["text"] for r in hub.history.since("general", 0, total)] == reference


async def test_a_room_a_hub_never_followed_is_fetched_from_the_log_on_first_join() -> None:
    async with cluster(local()) as c:
        alice = await c.client("alice", hub=0)
        for i in range(30):
            alice.say(f"early {i}")
        await alice.wait_for(lambda cl: len(room_texts(cl)) == 30 and not cl.pending, WAIT)
        assert c.hubs[1].history.head("general") is None  # nobody on hub 1 yet
        bob = await c.client("bob", hub=1)
        shown = [line.text for line in bob.lines if line.kind == "history"]
        assert shown == [f"early {i}" for i in range(10, 30)]  # the last 20, as from one hub
        assert c.hubs[1].history.head("general") == 30
        bob.say("hello")
        await alice.wait_for(lambda cl: room_texts(cl)[-1:] == ["hello"], WAIT)
        await bob.wait_for(lambda cl: room_texts(cl) == ["hello"] and not cl.pending, WAIT)
        assert seqs(bob) == [31]
        await bob.handle_input("/search early 2")  # from hub 1's own History
        await bob.wait_for(has_line("info", "11 found for 'early 2'"), WAIT)


async def test_a_nick_held_on_one_hub_is_refused_on_another_then_freed() -> None:
    async with cluster(local()) as c:
        alice = await c.client("Alice", hub=0)
        other = await c.client("alice", hub=1)  # the same nick, another case, another hub
        assert other.nick == "alice_"
        assert any("the nick alice is taken" in line.text for line in other.lines)
        await other.handle_input("/nick ALICE")
        await other.wait_for(has_line("error", "the nick 'ALICE' is taken"), WAIT)
        bus = c.hubs[0].cluster.bus  # type: ignore[union-attr]
        space = await bus.key_space(NICK_SPACE, 30)
        assert (await space.get(nick_name("alice"))) == f"hub0/{alice.peer.session_id}".encode()  # type: ignore[union-attr]
        # a nick change frees the old nick everywhere
        await alice.handle_input("/nick carol")
        await alice.wait_for(lambda cl: cl.nick == "carol", WAIT)
        await other.handle_input("/nick alice")
        await other.wait_for(lambda cl: cl.nick == "alice", WAIT)
        await other.handle_input("/nick carol")
        await other.wait_for(has_line("error", "the nick 'carol' is taken"), WAIT)
        # the session ends: its nick is free on every hub
        await alice.close()
        await asyncio.wait_for(_free(space, "carol"), WAIT)
        await other.handle_input("/nick carol")
        await other.wait_for(lambda cl: cl.nick == "carol", WAIT)


async def _free(space: object, nick: str) -> None:
    while await space.get(nick_name(nick)) is not None:  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)


async def test_a_dead_hubs_nicks_expire_after_the_ttl() -> None:
    now = [0.0]
    bus = LocalBus(clock=lambda: now[0])
    async with cluster(lambda: bus) as c:
        await c.client("alice", hub=0)
        c.hubs[0].close()  # dies: no release, no renewal
        late = await c.client("alice", hub=1)
        assert late.nick == "alice_"
        now[0] += 31.0  # the TTL (30 s) passes with no renewal
        await late.handle_input("/nick alice")
        await late.wait_for(lambda cl: cl.nick == "alice", WAIT)


async def test_a_re_sent_mid_is_stored_once_whichever_hub_takes_it() -> None:
    async with cluster(local()) as c:
        alice = await c.client("alice", hub=0)
        bob = await c.client("bob", hub=1)
        sent = alice.say("only once")
        await alice.wait_for(lambda cl: not cl.pending, WAIT)
        await bob.wait_for(lambda cl: room_texts(cl) == ["only once"], WAIT)
        # the same mid reaches hub 1 (a client that moved and re-sent it)
        bob.pending[sent.mid] = Pending(sent.mid, "only once", "general")
        answer = await bob._request("say", mid=sent.mid, room="general", text="only once")
        assert answer["ok"] and answer["duplicate"] and answer["seq"] == 1
        # and the bus itself refuses a second entry for it (a hub that never stored it)
        bus = c.hubs[1].cluster.bus  # type: ignore[union-attr]
        again = await bus.append(room_log("general"), b"{}", msg_id=sent.mid)
        assert again.duplicate and again.seq == 1
        bob.say("next")
        await alice.wait_for(lambda cl: room_texts(cl) == ["only once", "next"], WAIT)
        assert seqs(alice) == [1, 2]
        for hub in c.hubs:
            assert hub.history.head("general") == 2


async def test_presence_crosses_hubs() -> None:
    async with cluster(local()) as c:
        bob = await c.client("bob", hub=1)
        alice = await c.client("alice", hub=0)
        await bob.wait_for(has_line("event", "alice joined #general"), WAIT)
        await alice.handle_input("/away lunch")
        await bob.wait_for(has_line("event", "alice is away: lunch"), WAIT)
        await alice.handle_input("/away")
        await bob.wait_for(has_line("event", "alice is back"), WAIT)
        await alice.handle_input("/nick alicia")
        await bob.wait_for(has_line("event", "alice is now known as alicia"), WAIT)
        port = await go_down(c.relays["alice"])
        await bob.wait_for(has_line("event", "alicia is reconnecting"), WAIT)
        await come_back(c.relays["alice"], port)
        await bob.wait_for(has_line("event", "alicia is back"), WAIT)
        await alice.close()
        await bob.wait_for(has_line("event", "alicia left"), WAIT)


async def test_without_a_bus_the_hub_numbers_rooms_itself() -> None:
    hub = ChatHub()
    assert hub.cluster is None
    await hub.start()  # nothing to connect to: a no-op
    hub.close()


# ---------------------------------------------------------------------- nats-server


@pytest.fixture
def nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server  # type: ignore[misc]
    finally:
        server.stop()


async def test_three_hubs_on_nats_thirty_clients_cuts_and_a_hub_closed(nats: NatsServer) -> None:
    from korinet_nats import NatsBus

    per_client = 10
    rng = random.Random(15)
    async with cluster(lambda: NatsBus(nats.url), hubs=3) as c:
        clients = [await c.client(f"u{i:02d}", hub=i % 3) for i in range(30)]
        total = per_client * len(clients)
        said = [0]
        progressed = asyncio.Event()

        async def cutter() -> None:
            # on progress, not on the clock: every cut lands mid-conversation
            for milestone in range(20, 200, 20):
                while said[0] < milestone:
                    progressed.clear()
                    await progressed.wait()
                relay = rng.choice(list(c.relays.values()))
                await relay.wait_linked()
                relay.cut()
            while said[0] < 150:  # half-way: hub 0 goes away; its clients move to hub 1
                progressed.clear()
                await progressed.wait()
            await c.close_hub(0)
            for i in range(0, 30, 3):
                c.move(f"u{i:02d}", 1)

        async def talk(client: ChatClient) -> None:
            for i in range(per_client):
                client.say(f"{client.nick} {i}")
                said[0] += 1
                progressed.set()
                await asyncio.sleep(rng.uniform(0.005, 0.03))

        cutting = asyncio.create_task(cutter())
        await asyncio.gather(*(talk(cl) for cl in clients))
        await asyncio.wait_for(cutting, WAIT * 3)
        for client in clients:
            await client.wait_for(lambda cl: len(room_texts(cl)) >= total and not cl.pending, WAIT * 3)
        reference = room_texts(clients[1])
        assert len(reference) == len(set(reference)) == total  # 0 lost, 0 duplicated
        for client in clients:
            assert room_texts(client) == reference, f"{client.nick} saw another order"
            assert seqs(client) == list(range(1, total + 1))
            mine = [t for t in reference if t.startswith(client.nick + " ")]
            assert mine == [f"{client.nick} {i}" for i in range(per_client)]
        for hub in c.hubs[1:]:
            assert hub.history.head("general") == total
        assert sum(relay.cuts for relay in c.relays.values()) >= 9
        for i in range(0, 30, 3):  # the moved clients: on hub 1 now, under their own nicks
            moved = c.clients[f"u{i:02d}"]
            assert any("lost our session" in line.text for line in lines_of(moved, "info"))
            assert moved.nick == f"u{i:02d}"  # hub 0 gave its nicks up as it closed
