"""Clients that fail over between the hubs of a cluster, direct messages on the bus,
and /who and /rooms across hubs (docs/CHAT.md, "Failover").

A hub "dies" here as a crash looks from outside: the address its clients use stops
accepting connections and drops every link at once (the relay in front of it goes
down), and the hub stops without a word to the bus (its nicks stay held until their
TTL). The last test kills a real `korinet-chat serve --cluster` process (kill -9) on a
real nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from chat_helpers import (
    WAIT,
    Pane,
    come_back,
    fresh_plugins,
    go_down,
    has_line,
    lines_of,
    program,
    room_texts,
)
from korinet_chat.client import ChatClient
from korinet_chat.cluster import NICK_SPACE, decode_message, nick_name, owner_of, room_log
from korinet_chat.hub import ChatHub, HubSettings
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Server, SessionConfig
from korinet.cluster import ClusterBus, LocalBus
from korinet.plugins import PluginManager

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "plugins" / "nats" / "tests"))
from nats_server import NatsServer

pytestmark = pytest.mark.timeout(150 * TIMEOUT_FACTOR)


@dataclass
class Hubs:
    """Hubs on one bus, each behind one relay: the address its clients know it by."""

    plugins: PluginManager
    make_bus: Callable[[], ClusterBus]
    hubs: list[ChatHub] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)
    relays: list[Relay] = field(default_factory=list)
    clients: dict[str, ChatClient] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)  # each hub's address (its relay's port)

    async def add_hub(self, session_ttl: float = 120.0, config: SessionConfig | None = None) -> None:
        hub = ChatHub(settings=HubSettings(rate=0), bus=self.make_bus(), hub_id=f"hub{len(self.hubs)}")
        await hub.start()
        server = hub.server("127.0.0.1", 0, plugins=self.plugins, session_ttl=session_ttl, config=config)
        await server.start()
        self.hubs.append(hub)
        self.servers.append(server)
        self.relays.append(await Relay("127.0.0.1", server.port).start())
        self.ports.append(self.relays[-1].port)

    def address(self, index: int) -> tuple[str, int]:
        return ("127.0.0.1", self.ports[index])

    async def client(self, nick: str, first: int, room: str | None = "general") -> ChatClient:
        """A client that knows every hub, ``first`` first (the others in turn)."""
        order = [(first + i) % len(self.hubs) for i in range(len(self.hubs))]
        hubs = [self.address(i) for i in order]
        client = ChatClient(*hubs[0], nick, room=room, plugins=self.plugins, hubs=hubs)
        await client.start(open_timeout=WAIT)
        self.clients[nick] = client
        return client

    async def kill(self, index: int) -> None:
        """The hub dies: its address refuses, its links drop, nothing is said to the bus."""
        await go_down(self.relays[index])
        self.hubs[index].close()  # no release: its nicks stay held until their TTL
        await self.servers[index].close()

    async def stop(self, index: int) -> None:
        """The hub is stopped (an upgrade, say), as `korinet-chat serve` stops on SIGINT."""
        self.hubs[index].stopping()
        await go_down(self.relays[index])  # its port closes
        await self.servers[index].close()
        await self.hubs[index].aclose()

    async def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        for relay in self.relays:
            await relay.close()
        for server, hub in zip(self.servers, self.hubs, strict=True):
            await server.close()
            if not hub.closing:
                await hub.aclose()


@contextlib.asynccontextmanager
async def hubs(make_bus: Callable[[], ClusterBus], count: int = 3) -> AsyncIterator[Hubs]:
    h = Hubs(fresh_plugins(), make_bus)
    try:
        for _ in range(count):
            await h.add_hub()
        yield h
    finally:
        await h.close()


def local() -> Callable[[], ClusterBus]:
    bus = LocalBus()
    return lambda: bus


def seqs(client: ChatClient, room: str = "general") -> list[int | None]:
    return [line.seq for line in client.lines if line.kind == "msg" and line.room == room]


def dm_texts(client: ChatClient) -> list[str]:
    return [line.text for line in lines_of(client, "dm") if not line.own]


class Progress:
    """Lines said so far, and a way to wait for a count (cuts land on progress, not
    on the clock)."""

    def __init__(self) -> None:
        self.said = 0
        self._changed = asyncio.Event()

    def step(self) -> None:
        self.said += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def reach(self, count: int) -> None:
        async with asyncio.timeout(WAIT * 3):
            while self.said < count:
                await self._changed.wait()


async def assert_one_view(clients: list[ChatClient], per_client: int, bus: ClusterBus) -> None:
    """Every member's view equals the room's log on the bus: all lines, once, in one
    order, each sender's in the order typed."""
    total = per_client * len(clients)
    log = [decode_message(e.data)["text"] for e in await bus.read(room_log("general"), 0, total + 10)]
    reference = room_texts(clients[-1])
    assert reference == log
    assert len(reference) == len(set(reference)) == total  # 0 lost, 0 doubled
    for client in clients:
        assert room_texts(client) == reference, f"{client.nick} saw another order"
        assert seqs(client) == list(range(1, total + 1))
        mine = [t for t in reference if t.startswith(client.nick + " ")]
        assert mine == [f"{client.nick} {i}" for i in range(per_client)]


# ---------------------------------------------------------------------- LocalBus


async def test_a_hub_dies_mid_conversation_its_clients_fail_over_and_nothing_is_lost() -> None:
    per_client = 12
    progress = Progress()
    async with hubs(local()) as h:
        clients = [await h.client(f"u{i:02d}", first=i % 3) for i in range(12)]  # 3 x 4 clients
        total = per_client * len(clients)

        async def talk(client: ChatClient) -> None:
            for i in range(per_client):
                client.say(f"{client.nick} {i}")  # typing goes on through the failover
                progress.step()
                await asyncio.sleep(0.01)

        async def killer() -> None:
            await progress.reach(total // 3)
            await h.kill(0)

        killing = asyncio.create_task(killer())
        await asyncio.gather(*(talk(client) for client in clients))
        await asyncio.wait_for(killing, WAIT)
        for client in clients:
            await client.wait_for(lambda cl: len(room_texts(cl)) >= total and not cl.pending, WAIT * 3)
        await assert_one_view(clients, per_client, h.hubs[1].cluster.bus)  # type: ignore[union-attr]
        gone = f"hub 127.0.0.1:{h.ports[0]} gone; now on hub 127.0.0.1:{h.ports[1]}"
        for i, client in enumerate(clients):
            assert client.nick == f"u{i:02d}"  # the nick passed with the client
            moved = any(line.text == gone for line in lines_of(client, "info"))
            assert moved == (i % 3 == 0), f"{client.nick}: moved={moved}"
            if i % 3 == 0:
                assert client.port == h.ports[1]
        assert h.hubs[1].history.head("general") == h.hubs[2].history.head("general") == total


async def test_a_hub_stopped_for_an_upgrade_its_clients_move_on_nicks_and_all() -> None:
    per_client = 10
    progress = Progress()
    async with hubs(local()) as h:
        clients = [await h.client(f"u{i}", first=i % 3) for i in range(6)]
        total = per_client * len(clients)
        rival: list[ChatClient] = []

        async def talk(client: ChatClient) -> None:
            for i in range(per_client):
                client.say(f"{client.nick} {i}")
                progress.step()
                await asyncio.sleep(0.01)

        async def stopper() -> None:
            await progress.reach(total // 3)
            await h.stop(0)
            rival.append(await h.client("u0", first=1))  # asks for u0's nick at once

        stopping = asyncio.create_task(stopper())
        await asyncio.gather(*(talk(client) for client in clients))
        await asyncio.wait_for(stopping, WAIT)
        for client in clients:
            await client.wait_for(lambda cl: len(room_texts(cl)) >= total and not cl.pending, WAIT * 3)
        await assert_one_view(clients, per_client, h.hubs[1].cluster.bus)  # type: ignore[union-attr]
        assert [client.nick for client in clients] == [f"u{i}" for i in range(6)]
        assert rival[0].nick == "u0_"
        for client in clients[1:]:  # nobody was told u0 or u3 left: they moved
            assert not any(line.text in ("u0 left", "u3 left") for line in client.lines)


async def test_the_nick_cannot_be_taken_in_the_gap_and_the_bus_value_is_no_key() -> None:
    async with hubs(local()) as h:
        alice = await h.client("alice", first=0)
        bus = h.hubs[1].cluster.bus  # type: ignore[union-attr]
        space = await bus.key_space(NICK_SPACE, 30)
        held = await space.get(nick_name("alice"))
        assert held == owner_of(alice._nick_key) and alice._nick_key.encode() not in held
        await h.kill(0)
        # someone on another hub asks for the nick while alice's hub is dead, with the
        # value read on the bus as its key: still alice's
        mallory = ChatClient(*h.address(1), "alice", plugins=h.plugins)
        mallory._nick_key = held.decode()
        await mallory.start(open_timeout=WAIT)
        h.clients["mallory"] = mallory
        assert mallory.nick == "alice_"
        await alice.wait_for(has_line("info", "gone; now on hub"), WAIT)
        await alice.wait_for(lambda cl: cl.state == "connected" and "general" in cl.rooms, WAIT)
        assert alice.nick == "alice"
        await mallory.handle_input("/nick alice")
        await mallory.wait_for(has_line("error", "the nick 'alice' is taken"), WAIT)


async def test_lines_said_while_no_hub_took_us_come_under_the_away_marker() -> None:
    async with hubs(local()) as h:
        alice = ChatClient(*h.address(0), "alice", plugins=h.plugins, hubs=[h.address(0), h.address(2)])
        await alice.start(open_timeout=WAIT)
        h.clients["alice"] = alice
        bob = await h.client("bob", first=1)
        bob.say("one")
        await alice.wait_for(lambda cl: room_texts(cl) == ["one"], WAIT)
        spare = await go_down(h.relays[2])  # alice's other hub does not answer for now
        await h.kill(0)
        alice.say("typed while away")
        for text in ("two", "three"):
            bob.say(text)
        await bob.wait_for(lambda cl: len(room_texts(cl)) == 3 and not cl.pending, WAIT)
        await come_back(h.relays[2], spare)
        await alice.wait_for(lambda cl: len(room_texts(cl)) == 4 and not cl.pending, WAIT * 2)
        assert room_texts(alice) == ["one", "two", "three", "typed while away"]
        texts = [line.text for line in alice.lines]
        moved = texts.index(f"hub 127.0.0.1:{h.ports[0]} gone; now on hub 127.0.0.1:{h.ports[2]}")
        assert texts[moved + 1 :][:2] == ["— 2 new while away —", "two"]
        assert alice.nick == "alice"
        await bob.wait_for(has_line("event", "alice is back"), WAIT)


async def test_a_client_that_moved_is_not_said_to_have_left_when_its_old_session_ends() -> None:
    ttl = WAIT  # hub 0 forgets a dropped session after this (alice moves well before)
    h = Hubs(fresh_plugins(), local())
    try:
        await h.add_hub(session_ttl=ttl)
        await h.add_hub()
        bob = await h.client("bob", first=0)
        alice = await h.client("alice", first=0)
        relay = await Relay("127.0.0.1", h.servers[0].port).start()  # carol's own way in
        carol = ChatClient("127.0.0.1", relay.port, "carol", plugins=h.plugins)
        await carol.start(open_timeout=WAIT)
        h.clients["carol"] = carol
        await go_down(h.relays[0])  # hub 0 lives on, but neither alice nor bob reaches it
        await go_down(relay)  # nor carol, who knows no other hub
        await alice.wait_for(has_line("info", "gone; now on hub"), WAIT)
        await bob.wait_for(has_line("info", "gone; now on hub"), WAIT)
        await come_back(h.relays[0], h.ports[0])
        assert {alice.port, bob.port} == {h.ports[1]}
        hub0 = h.hubs[0]
        async with asyncio.timeout(ttl + WAIT):  # hub 0 ends the three sessions at its TTL
            while hub0.members:
                await asyncio.sleep(0.05)
        # carol's end is news on hub 1 (she is nowhere); alice's and bob's is not
        await alice.wait_for(has_line("event", "carol left"), WAIT)
        await bob.wait_for(has_line("event", "carol left"), WAIT)
        assert not any(line.text in ("alice left", "bob left") for line in alice.lines + bob.lines)
        assert (alice.nick, bob.nick) == ("alice", "bob")
        await alice.handle_input("/who")
        await alice.wait_for(has_line("info", "#general: alice, bob"), WAIT)
    finally:
        await h.close()


async def test_back_to_a_hub_that_still_holds_our_old_session() -> None:
    async with hubs(local(), count=2) as h:
        alice = await h.client("alice", first=0)
        relay = await Relay("127.0.0.1", h.servers[0].port).start()  # carol's own way in to hub 0
        carol = ChatClient("127.0.0.1", relay.port, "carol", plugins=h.plugins)
        await carol.start(open_timeout=WAIT)
        h.clients["carol"] = carol
        await go_down(h.relays[0])  # hub 0 lives on (alice's session there waits for her)
        await alice.wait_for(has_line("info", f"now on hub 127.0.0.1:{h.ports[1]}"), WAIT)
        await come_back(h.relays[0], h.ports[0])
        await h.kill(1)  # back to hub 0, where the old session still holds "alice"
        await alice.wait_for(has_line("info", f"now on hub 127.0.0.1:{h.ports[0]}"), WAIT)
        await alice.wait_for(lambda cl: cl.state == "connected" and "general" in cl.rooms, WAIT)
        assert alice.nick == "alice"
        alice.say("home again")
        await carol.wait_for(lambda cl: room_texts(cl) == ["home again"], WAIT)
        assert [m.nick for m in h.hubs[0].members.values()].count("alice") == 1  # the old one is gone
        assert not any(line.text == "alice left" for line in carol.lines)


async def test_the_goodbye_of_a_client_that_moves_frees_nothing() -> None:
    async with hubs(local(), count=2) as h:
        alice = await h.client("alice", first=0)
        bob = await h.client("bob", first=0)
        # alice leaves hub 0 for hub 1 while hub 0 still hears her (her old session is
        # closed with a word, as every move does)
        assert await alice._move(*h.address(1), None, "moving on")
        await alice.wait_for(lambda cl: cl.state == "connected" and "general" in cl.rooms, WAIT)
        async with asyncio.timeout(WAIT):  # hub 0 has ended her old session
            while any(m.nick == "alice" for m in h.hubs[0].members.values()):
                await asyncio.sleep(0.02)
        await bob.wait_for(has_line("event", "alice is back"), WAIT)
        space = await h.hubs[0].cluster.bus.key_space(NICK_SPACE, 30)  # type: ignore[union-attr]
        assert await space.get(nick_name("alice")) == owner_of(alice._nick_key)  # still hers
        assert not any(line.text == "alice left" for line in bob.lines)
        mallory = await h.client("alice", first=0)
        assert mallory.nick == "alice_"


async def test_the_hubs_of_one_bus_agree_on_the_clusters_name() -> None:
    async with hubs(local()) as h:
        names = {await hub.cluster.cluster_id() for hub in h.hubs}  # type: ignore[union-attr]
        assert len(names) == 1 and len(next(iter(names))) == 16
    async with hubs(local(), count=1) as other:  # another bus: another cluster
        assert await other.hubs[0].cluster.cluster_id() not in names  # type: ignore[union-attr]


async def test_a_client_starts_on_the_first_hub_that_answers() -> None:
    async with hubs(local()) as h:
        await h.kill(0)
        client = await h.client("bob", first=0)
        assert client.port == h.ports[1]
        client.say("here")
        await client.wait_for(lambda cl: room_texts(cl) == ["here"] and not cl.pending, WAIT)


async def test_dms_cross_hubs_once_in_order_through_two_hub_deaths() -> None:
    count = 30
    progress = Progress()
    async with hubs(local()) as h:
        alice = await h.client("alice", first=0)
        bob = await h.client("bob", first=1)
        answers: list[asyncio.Future[dict[str, object]]] = []

        async def send() -> None:
            for i in range(count):
                answers.append(alice.dm("bob", f"dm {i}"))
                progress.step()
                await asyncio.sleep(0.01)

        async def killer() -> None:
            await progress.reach(10)
            await h.kill(0)  # the sender's hub: alice moves to hub 1
            await alice.wait_for(has_line("info", "gone; now on hub"), WAIT)
            await progress.reach(20)
            await h.kill(1)  # the recipient's hub (alice's too now): both move to hub 2
            await bob.wait_for(has_line("info", "gone; now on hub"), WAIT)

        killing = asyncio.create_task(killer())
        await send()
        await asyncio.wait_for(killing, WAIT * 3)
        await bob.wait_for(lambda cl: len(dm_texts(cl)) >= count, WAIT * 3)
        results = await asyncio.wait_for(asyncio.gather(*answers), WAIT)
        assert all(r.get("ok") for r in results), results
        await alice.wait_for(lambda cl: not cl.pending, WAIT)
        assert dm_texts(bob) == [f"dm {i}" for i in range(count)]  # 0 lost, 0 doubled, in order
        assert bob.dm_seen == count  # one entry per DM in bob's log
        assert alice.port == bob.port == h.ports[2]
        assert (alice.nick, bob.nick) == ("alice", "bob")


async def test_a_dm_sent_while_the_recipient_moves_is_delivered_once() -> None:
    async with hubs(local()) as h:
        alice = await h.client("alice", first=2)
        bob = await h.client("bob", first=0)
        await alice.dm("bob", "before")
        await bob.wait_for(lambda cl: dm_texts(cl) == ["before"], WAIT)
        await h.kill(0)
        # while bob is without a hub: the hubs keep it in bob's log
        for i in range(5):
            result = await alice.dm("bob", f"away {i}")
            assert result.get("ok"), result
        await bob.wait_for(lambda cl: len(dm_texts(cl)) >= 6, WAIT * 2)
        assert dm_texts(bob) == ["before"] + [f"away {i}" for i in range(5)]
        await alice.dm("bob", "after")
        await bob.wait_for(lambda cl: dm_texts(cl)[-1:] == ["after"], WAIT)
        assert dm_texts(bob).count("after") == 1


async def test_dms_to_a_member_that_lags_wait_on_the_bus_none_is_dropped() -> None:
    count = 1200  # more than a lagging member's outbox keeps (OUTBOX_LIMIT)
    h = Hubs(fresh_plugins(), local())
    try:
        await h.add_hub(config=SessionConfig(window=8, heartbeat_interval=5.0))
        alice = await h.client("alice", first=0)
        relay = await Relay("127.0.0.1", h.servers[0].port).start()
        bob = ChatClient("127.0.0.1", relay.port, "bob", plugins=h.plugins)
        await bob.start(open_timeout=WAIT)
        h.clients["bob"] = bob
        relay.black_hole = True  # bob's link is silent: the hub's posts to him pile up
        answers = [alice.dm("bob", f"dm {i}") for i in range(count)]
        results = await asyncio.wait_for(asyncio.gather(*answers), WAIT * 3)
        assert all(r.get("ok") for r in results)
        assert next(m for m in h.hubs[0].members.values() if m.nick == "bob").lagging
        relay.black_hole = False
        relay.cut()  # bob is back: the drain, then the DMs waiting on the bus
        await bob.wait_for(lambda cl: len(dm_texts(cl)) >= count, WAIT * 3)
        assert dm_texts(bob) == [f"dm {i}" for i in range(count)]
        await relay.close()
    finally:
        await h.close()


async def test_a_dm_to_nobody_in_the_cluster_is_refused() -> None:
    async with hubs(local(), count=2) as h:
        alice = await h.client("alice", first=0)
        result = await alice.dm("nobody", "hi")
        assert not result.get("ok") and "nobody called 'nobody' is here" in str(result.get("error"))
        assert not alice.pending


async def test_who_and_rooms_answer_for_every_hub() -> None:
    async with hubs(local()) as h:
        alice = await h.client("alice", first=0)
        bob = await h.client("bob", first=1)
        await bob.join("dev")
        carol = await h.client("carol", first=2)
        await bob.set_away("lunch")

        async def who(client: ChatClient, room: str) -> dict[str, str]:
            members = await client.who(room)
            return {str(m["nick"]): str(m["state"]) for m in members}

        want = {"alice": "online", "bob": "away", "carol": "online"}
        async with asyncio.timeout(WAIT):
            while await who(carol, "general") != want:  # the hubs say so on the bus, then it holds
                await asyncio.sleep(0.05)
        assert await who(alice, "general") == want
        assert await who(alice, "dev") == {"bob": "away"}  # a room hub 0 never followed
        rooms = {str(r["room"]): r for r in await alice.list_rooms()}
        assert set(rooms) == {"general", "dev"}
        assert rooms["general"]["members"] == 3 and rooms["dev"]["members"] == 1
        bob.say("in dev", room="dev")
        await bob.wait_for(lambda cl: not cl.pending, WAIT)
        async with asyncio.timeout(WAIT):
            while {str(r["room"]): r["head"] for r in await alice.list_rooms()}["dev"] != 1:
                await asyncio.sleep(0.05)
        # a member who leaves is gone from /who everywhere
        await bob.close()
        async with asyncio.timeout(WAIT):
            while "bob" in await who(carol, "general"):
                await asyncio.sleep(0.05)


# ---------------------------------------------------------------------- nats-server, kill -9


@pytest.fixture
def nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server  # type: ignore[misc]
    finally:
        server.stop()


async def _hub_process(url: str, home: Path) -> tuple[asyncio.subprocess.Process, int]:
    command = [sys.executable, "-c", "from korinet_chat.cli import main; raise SystemExit(main())",
               "serve", "--host", "127.0.0.1", "--port", "0", "--db", ":memory:", "--no-announce",
               "--insecure-plaintext", "--rate", "0", "--cluster", url]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "KORINET_HOME": str(home)},
    )
    assert proc.stdout is not None
    first = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode()
    assert first.startswith("korinet-chat hub on 127.0.0.1:"), first
    return proc, int(first.split(":")[1].split(",")[0])


async def test_kill_9_of_a_serve_cluster_process_its_clients_fail_over(
    nats: NatsServer, tmp_path: Path
) -> None:
    from korinet_nats import NatsBus

    per_client = 10
    progress = Progress()
    plugins = fresh_plugins()
    procs: list[tuple[asyncio.subprocess.Process, int]] = []
    clients: list[ChatClient] = []
    try:
        for _ in range(3):
            procs.append(await _hub_process(nats.url, tmp_path))
        ports = [port for _, port in procs]
        for i in range(12):  # 3 x 4 clients
            order = [("127.0.0.1", ports[(i + k) % 3]) for k in range(3)]
            client = ChatClient(*order[0], f"u{i}", plugins=plugins, hubs=order)
            await client.start(open_timeout=WAIT)
            clients.append(client)
        total = per_client * len(clients)
        sender, recipient = clients[0], clients[1]  # on the hub killed, and on another
        dms: list[asyncio.Future[dict[str, object]]] = []

        async def talk(client: ChatClient) -> None:
            for i in range(per_client):
                client.say(f"{client.nick} {i}")
                if client is sender:
                    dms.append(sender.dm(recipient.nick, f"dm {i}"))
                progress.step()
                await asyncio.sleep(0.02)

        async def killer() -> None:
            await progress.reach(total // 3)
            procs[0][0].kill()  # kill -9: no goodbye; its nicks stay held on the bus
            await procs[0][0].wait()

        killing = asyncio.create_task(killer())
        await asyncio.gather(*(talk(client) for client in clients))
        await asyncio.wait_for(killing, WAIT)
        for client in clients:
            await client.wait_for(lambda cl: len(room_texts(cl)) >= total and not cl.pending, WAIT * 4)
        reader = NatsBus(nats.url)
        await reader.connect()
        try:
            await assert_one_view(clients, per_client, reader)
        finally:
            await reader.close()
        for i, client in enumerate(clients):
            assert client.nick == f"u{i}"
            moved = any("gone; now on hub" in line.text for line in lines_of(client, "info"))
            assert client.port != ports[0] and moved == (i % 3 == 0), f"{client.nick}: moved={moved}"
        # /who on any hub lists the members of every hub (the moved ones once)
        async with asyncio.timeout(WAIT):
            while sorted(str(m["nick"]) for m in await clients[2].who("general")) != sorted(
                c.nick for c in clients
            ):
                await asyncio.sleep(0.1)
        await recipient.wait_for(lambda cl: len(dm_texts(cl)) >= per_client, WAIT)
        assert dm_texts(recipient) == [f"dm {i}" for i in range(per_client)]
        assert all(r.get("ok") for r in await asyncio.gather(*dms))
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        for proc, _ in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(proc.wait(), WAIT)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


# ---------------------------------------------------------------------- the real program


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian package tmux)")
async def test_the_real_program_given_three_hubs_says_where_it_moved(tmp_path: Path) -> None:
    async with hubs(local()) as h:
        await h.kill(0)  # the first address given does not answer at start
        bob = await h.client("bob", first=2)
        addresses = ",".join(f"127.0.0.1:{port}" for port in h.ports)
        env = {"KORINET_HOME": str(tmp_path / "home"), "TERM": "xterm-256color", "LANG": "C.UTF-8"}
        pane = Pane(f"{program()} {addresses} --nick alice --no-bell --insecure-plaintext", env)
        try:
            await pane.shows("#general (2 here) —")
            await pane.shows("#general · alice · connected")
            await h.kill(1)  # the hub it started on dies
            await pane.shows(f"hub 127.0.0.1:{h.ports[1]} gone; now on hub 127.0.0.1:{h.ports[2]}")
            await bob.wait_for(has_line("event", "alice is back"), WAIT)
            pane.type("still here")
            await bob.wait_for(lambda c: room_texts(c) == ["still here"], WAIT)
            await pane.shows("<alice> still here")
            pane.type("/quit")
            assert await pane.exited() == 0
        finally:
            pane.kill()
