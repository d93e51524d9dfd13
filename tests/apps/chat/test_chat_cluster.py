"""Chat rooms shared by several hubs through the cluster bus (apps/chat/cluster.py):
first with hubs sharing one in-process LocalBus, then with hubs each on its own
connection to a real nats-server (skipped when it is not installed, unless CI=1)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from chat_helpers import WAIT, come_back, fresh_plugins, go_down, has_line, lines_of, room_texts
from korinet_chat.client import ChatClient, Pending
from korinet_chat.cluster import NICK_SPACE, nick_name, owner_of, room_log
from korinet_chat.hub import ChatHub, HubSettings
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Server
from korinet.cluster import Appended, BusError, ClusterBus, LocalBus
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
        # held with a hash of alice's nick key (a secret of her client), not the key itself
        assert (await space.get(nick_name("alice"))) == owner_of(alice._nick_key)
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


async def test_a_live_hub_renews_its_nicks_before_the_ttl() -> None:
    now = [0.0]
    bus = LocalBus(clock=lambda: now[0])
    space = await bus.key_space(NICK_SPACE, 0.3)
    renewed = asyncio.Event()
    renew = space.renew

    async def counting(key: str, value: bytes) -> bool:
        held = await renew(key, value)
        renewed.set()
        return held

    space.renew = counting  # type: ignore[method-assign]
    c = Cluster(fresh_plugins(), lambda: bus)
    try:
        hub = ChatHub(settings=HubSettings(rate=0), bus=bus, hub_id="hub0", nick_ttl=0.3)
        await hub.start()
        server = hub.server("127.0.0.1", 0, plugins=c.plugins)
        await server.start()
        c.hubs.append(hub)
        c.servers.append(server)
        await c.client("alice", hub=0)
        now[0] = 0.25  # nearly expired...
        renewed.clear()
        await asyncio.wait_for(renewed.wait(), WAIT)  # ...renewed (every TTL / 3)
        now[0] = 0.5  # past the first expiry, within the renewed one
        assert await space.get(nick_name("alice")) is not None
        hub.close()  # now it dies: nobody renews
        now[0] = 10.0
        assert await space.get(nick_name("alice")) is None
    finally:
        await c.close()


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


async def test_a_hub_restarted_on_its_database_follows_on_and_a_foreign_one_is_refused(
    tmp_path: Path,
) -> None:
    bus = LocalBus()
    plugins = fresh_plugins()
    alone = tmp_path / "alone.sqlite3"
    solo = ChatHub(alone)  # a database kept without the bus numbers its own lines
    solo.history.create_room("general", 0.0)
    solo.history.append("general", "zed", "said alone", "say", "z-1", 0.0)
    solo.close()
    async with cluster(lambda: bus) as c:
        alice = await c.client("alice", hub=0)
        alice.say("on the bus")
        await alice.wait_for(lambda cl: not cl.pending, WAIT)
        kept = tmp_path / "kept.sqlite3"
        hub = ChatHub(kept, settings=HubSettings(rate=0), bus=bus, hub_id="kept")
        await hub.start()
        server = hub.server("127.0.0.1", 0, plugins=plugins)
        await server.start()
        c.hubs.append(hub)
        c.servers.append(server)
        bob = await c.client("bob", hub=2)
        await server.close()
        await hub.aclose()  # stops; its database keeps entry 1
        alice.say("while the kept hub was down")
        await alice.wait_for(lambda cl: not cl.pending, WAIT)
        for db, index in ((kept, 3), (alone, 4)):
            hub = ChatHub(db, settings=HubSettings(rate=0), bus=bus, hub_id=f"again{index}")
            await hub.start()
            server = hub.server("127.0.0.1", 0, plugins=plugins)
            await server.start()
            c.hubs.append(hub)
            c.servers.append(server)
        carol = await c.client("carol", hub=3)  # on the restarted hub: follows on from 1
        assert [line.text for line in carol.lines if line.kind == "history"] == [
            "on the bus",
            "while the kept hub was down",
        ]
        assert c.hubs[3].history.head("general") == 2
        dave = await c.client("dave", hub=4, room=None)  # the foreign database: refused
        await dave.handle_input("/join #general")
        await dave.wait_for(has_line("error", "this hub's history of #general is not the cluster's"), WAIT)
        assert c.hubs[4].history.head("general") == 1  # untouched
        assert bob.nick == "bob"


async def test_a_gap_is_filled_from_history_since_n() -> None:
    # a client that misses a line asks "history since N": it must get the lines after
    # N (the hub answered the last ones instead, and the client held all that followed)
    async with cluster(local()) as c:
        alice = await c.client("alice", hub=0)
        for i in range(6):
            alice.say(f"line {i}")
        await alice.wait_for(lambda cl: len(room_texts(cl)) == 6 and not cl.pending, WAIT)
        answer = await alice._ask("history", room="general", since=2, limit=2)
        assert [(m["seq"], m["text"]) for m in answer["messages"]] == [(3, "line 2"), (4, "line 3")]
        answer = await alice._ask("history", room="general", limit=2)  # no "since": the last ones
        assert [m["seq"] for m in answer["messages"]] == [5, 6]


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


class FlakyBus(LocalBus):
    """A LocalBus that can be unreachable (every log call raises BusError)."""

    down = False

    def _check_up(self) -> None:
        if self.down:
            raise BusError("cannot reach the cluster bus at local: down for the test")

    async def append(self, log: str, data: bytes, *, msg_id: str) -> Appended:
        self._check_up()
        return await super().append(log, data, msg_id=msg_id)

    async def head(self, log: str) -> int:
        self._check_up()
        return await super().head(log)


async def test_an_unreachable_bus_is_an_answer_not_a_bug() -> None:
    bus = FlakyBus()
    async with cluster(lambda: bus) as c:
        alice = await c.client("alice", hub=0)
        bus.down = True
        alice.say("lost?")
        await alice.wait_for(has_line("error", "not sent (the cluster bus failed: cannot reach"), WAIT)
        assert not alice.pending
        await alice.handle_input("/join #other")
        await alice.wait_for(has_line("error", "the cluster bus failed: cannot reach"), WAIT)
        assert not any("internal error" in line.text for line in alice.lines)
        bus.down = False
        alice.say("back")
        await alice.wait_for(lambda cl: room_texts(cl) == ["back"] and not cl.pending, WAIT)


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
            nick = client.nick
            for i in range(per_client):
                # while it says hello again to another hub, the client is in no room
                await client.wait_for(lambda cl: "general" in cl.rooms, WAIT)
                client.say(f"{nick} {i}")
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
            assert moved.nick == f"u{i:02d}"  # the same nick key: their nicks passed with them


# ---------------------------------------------------------------------- korinet-chat serve --cluster


def _serve(*extra: str) -> list[str]:
    return ["serve", "--host", "127.0.0.1", "--port", "0", "--db", ":memory:", "--no-announce",
            "--insecure-plaintext", *extra]  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("local", "--cluster takes a nats://HOST:PORT address, not 'local'"),
        ("nats://127.0.0.1:{port}", "cannot reach the cluster bus at nats://127.0.0.1:{port}"),
    ],
)
def test_serve_cluster_mistakes_get_one_line(
    address: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from korinet_chat.cli import main

    monkeypatch.setenv("KORINET_HOME", str(tmp_path))
    port = _free_port()
    assert main(_serve("--cluster", address.format(port=port))) == 1
    err = capsys.readouterr().err
    assert f"korinet-chat serve: {message.format(port=port)}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2  # the plaintext warning, then it


def test_serve_cluster_without_korinet_nats_says_what_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from korinet_chat.cli import main

    import korinet.plugins

    monkeypatch.setenv("KORINET_HOME", str(tmp_path))
    monkeypatch.setattr(korinet.plugins, "default_manager", lambda: PluginManager.load(entry_points=False))
    assert main(_serve("--cluster", "nats://127.0.0.1:4222")) == 1
    err = capsys.readouterr().err
    assert (
        "no installed plugin serves the cluster bus 'nats://127.0.0.1:4222' (pip install korinet-nats)" in err
    )
    assert "Traceback" not in err


async def _hub_process(url: str, home: Path) -> tuple[asyncio.subprocess.Process, int]:
    command = [sys.executable, "-c", "from korinet_chat.cli import main; raise SystemExit(main())",
               *_serve("--cluster", url)]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "KORINET_HOME": str(home)},
    )
    assert proc.stdout is not None
    first = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode()
    assert first.startswith("korinet-chat hub on 127.0.0.1:"), first
    second = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode()
    assert second.startswith(f"sharing rooms and nicks through {url}"), second
    return proc, int(first.split(":")[1].split(",")[0])


async def test_a_killed_hub_process_loses_nothing_its_clients_move_on(
    nats: NatsServer, tmp_path: Path
) -> None:
    per_client = 20
    plugins = fresh_plugins()
    procs = []
    relays: dict[str, Relay] = {}
    clients: list[ChatClient] = []
    try:
        for _ in range(2):
            procs.append(await _hub_process(nats.url, tmp_path))
        for nick, hub in (("alice", 0), ("bob", 1), ("carol", 0)):
            relay = relays[nick] = await Relay("127.0.0.1", procs[hub][1]).start()
            client = ChatClient("127.0.0.1", relay.port, nick, plugins=plugins)
            await client.start(open_timeout=WAIT)
            clients.append(client)
        said = [0]
        progressed = asyncio.Event()

        async def killer() -> None:
            while said[0] < 25:
                progressed.clear()
                await progressed.wait()
            procs[0][0].kill()  # kill -9: no goodbye, nicks left held on the bus
            await procs[0][0].wait()
            for nick in ("alice", "carol"):
                relays[nick].target = ("127.0.0.1", procs[1][1])
                relays[nick].cut()

        async def talk(client: ChatClient, nick: str) -> None:
            for i in range(per_client):
                await client.wait_for(lambda cl: "general" in cl.rooms, WAIT)  # see above
                client.say(f"{nick} {i}")
                said[0] += 1
                progressed.set()
                await asyncio.sleep(0.01)

        killing = asyncio.create_task(killer())
        await asyncio.gather(*(talk(cl, n) for cl, n in zip(clients, ("alice", "bob", "carol"), strict=True)))
        await asyncio.wait_for(killing, WAIT)
        total = 3 * per_client
        for client in clients:
            await client.wait_for(lambda cl: len(room_texts(cl)) >= total and not cl.pending, WAIT * 3)
        reference = room_texts(clients[1])
        assert len(reference) == len(set(reference)) == total
        for client in clients:
            assert room_texts(client) == reference
            assert seqs(client) == list(range(1, total + 1))
        for nick in ("alice", "bob", "carol"):
            mine = [t for t in reference if t.startswith(nick + " ")]
            assert mine == [f"{nick} {i}" for i in range(per_client)]
        # the dead hub still holds their nicks on the bus (until the TTL), with the hash of
        # their clients' nick keys: their new sessions present the keys and keep the nicks
        assert clients[0].nick == "alice" and clients[2].nick == "carol"
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        for relay in relays.values():
            await relay.close()
        for proc, _ in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(proc.wait(), WAIT)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
