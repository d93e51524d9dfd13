"""The chat's promises through real connection cuts: a hub, scripted ChatClients,
one relay per client (tests/testutil/relay.py)."""

from __future__ import annotations

import asyncio
import random

import pytest
from chat_helpers import WAIT, come_back, go_down, has_line, lines_of, rig, room_texts
from korinet_chat.hub import HubSettings
from testutil import TIMEOUT_FACTOR

from korinet import SessionConfig

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)


async def test_three_clients_see_every_message_once_in_order_through_cuts() -> None:
    per_client = 40
    rng = random.Random(5)
    async with rig() as r:
        clients = [await r.client(n) for n in ("alice", "bob", "carol")]
        said = [0]
        progressed = asyncio.Event()
        delivered = asyncio.Event()  # every member has every line

        async def cutter() -> None:
            # Cut on progress (every 10 lines said), not on the clock: all 12 cuts land
            # while the conversation goes on, however fast the machine is.
            for milestone in range(10, 10 * 13, 10):
                while said[0] < milestone:
                    progressed.clear()
                    await progressed.wait()
                relay = rng.choice(list(r.relays.values()))
                await relay.wait_linked()
                if rng.random() < 0.5:
                    relay.cut()
                else:
                    await relay.cut_within(rng.randint(1, 400), delivered)  # usually mid-frame

        async def talk(index: int) -> None:
            client = clients[index]
            for i in range(per_client):
                client.say(f"{client.nick} {i}")
                said[0] += 1
                progressed.set()
                await asyncio.sleep(rng.uniform(0.01, 0.03))

        cutting = asyncio.create_task(cutter())
        await asyncio.gather(*(talk(i) for i in range(3)))
        total = 3 * per_client
        for client in clients:
            await client.wait_for(lambda c: len(room_texts(c)) >= total and not c.pending, WAIT * 2)
        delivered.set()
        await asyncio.wait_for(cutting, WAIT)
        assert sum(relay.cuts for relay in r.relays.values()) == 12
        reference = room_texts(clients[0])
        for client in clients:
            seen = room_texts(client)
            assert seen == reference, f"{client.nick} saw another order"
            assert len(seen) == len(set(seen)) == total  # each exactly once
            seqs = [line.seq for line in client.lines if line.kind == "msg"]
            assert seqs == list(range(1, total + 1))
            for sender in ("alice", "bob", "carol"):  # every sender's order kept
                mine = [t for t in seen if t.startswith(sender + " ")]
                assert mine == [f"{sender} {i}" for i in range(per_client)]
        assert r.hub.history.head("general") == total


async def test_offline_typing_is_delivered_once_in_order_with_a_marker() -> None:
    async with rig() as r:
        alice = await r.client("alice")
        bob = await r.client("bob")
        relay = r.relays["alice"]
        port = await go_down(relay)  # the hub looks down from alice's side
        await alice.wait_for(lambda c: c.state == "reconnecting", WAIT)
        await bob.wait_for(has_line("event", "alice is reconnecting"), WAIT)
        bob.say("while you were out 1")
        bob.say("while you were out 2")
        for i in range(3):
            alice.say(f"typed offline {i}")
        assert alice.queued == 3
        assert "reconnecting… 3 queued" in alice.status
        await come_back(relay, port)
        await bob.wait_for(lambda c: len(room_texts(c)) >= 5, WAIT)
        await alice.wait_for(lambda c: len(room_texts(c)) >= 5 and not c.pending, WAIT)
        await bob.wait_for(has_line("event", "alice is back"), WAIT)
        expected_offline = [f"typed offline {i}" for i in range(3)]
        for client in (alice, bob):
            texts = room_texts(client)
            assert [t for t in texts if t.startswith("typed offline")] == expected_offline
            assert len(texts) == len(set(texts)) == 5
        assert alice.status.endswith("connected")
        markers = lines_of(alice, "marker")
        assert [m.text for m in markers] == ["— 2 new while away —"]
        # the marker comes before what was missed
        kinds = [(line.kind, line.text) for line in alice.lines]
        assert kinds.index(("marker", "— 2 new while away —")) < kinds.index(("msg", "while you were out 1"))


async def test_the_nick_survives_a_reconnect_and_is_freed_when_the_session_ends() -> None:
    async with rig(session_ttl=1.0 * TIMEOUT_FACTOR) as r:
        alice = await r.client("alice")
        bob = await r.client("bob")
        carol = await r.client("carol")
        relay = r.relays["alice"]
        port = await go_down(relay)
        await carol.wait_for(has_line("event", "alice is reconnecting"), WAIT)
        await bob.handle_input("/nick alice")
        await bob.wait_for(has_line("error", "taken"), WAIT)
        assert "reconnecting" in lines_of(bob, "error")[-1].text
        assert bob.nick == "bob"
        await come_back(relay, port)
        await carol.wait_for(has_line("event", "alice is back"), WAIT)
        assert alice.nick == "alice"
        assert not any("left" in line.text for line in lines_of(carol, "event"))  # no quit/join spam
        # the session ends for good (the client vanishes; its TTL passes): the nick is free
        await alice.peer.abort()  # type: ignore[union-attr]
        await carol.wait_for(has_line("event", "alice left"), WAIT)
        await bob.handle_input("/nick alice")
        await bob.wait_for(lambda c: c.nick == "alice", WAIT)


async def test_a_hub_restart_loses_nothing_and_the_client_catches_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "chat.sqlite3"
    async with rig(db=db) as r:
        alice = await r.client("alice")
        bob = await r.client("bob")
        alice.say("before")
        await bob.wait_for(lambda c: room_texts(c) == ["before"], WAIT)
        port = await go_down(r.relays["alice"])
        await r.restart_hub()  # every session is gone; history stays in SQLite
        alice.say("typed while the hub restarts")
        await bob.wait_for(has_line("info", "lost our session"), WAIT)
        bob.say("after restart")
        await come_back(r.relays["alice"], port)
        await alice.wait_for(lambda c: len(room_texts(c)) >= 3 and not c.pending, WAIT)
        await bob.wait_for(lambda c: len(room_texts(c)) >= 3, WAIT)
        for client in (alice, bob):
            texts = room_texts(client)
            assert sorted(texts) == sorted(["before", "typed while the hub restarts", "after restart"])
            assert texts[0] == "before"
        assert alice.nick == "alice" and bob.nick == "bob"
        assert r.hub.history.head("general") == 3
        # rejoining after the restart is not announced as a join: no join spam
        assert [x.text for x in lines_of(alice, "event") if "joined" in x.text] == ["bob joined #general"]
        assert [x.text for x in lines_of(alice, "marker")] == ["— 1 new while away —"]  # bob's


async def test_a_detached_member_is_caught_up_from_history_when_its_buffer_is_full() -> None:
    # a tiny window: the hub's non-blocking post fills it at once and falls back to history
    async with rig(hub_config=SessionConfig(window=8, heartbeat_interval=5.0)) as r:
        alice = await r.client("alice")
        bob = await r.client("bob")
        r.relays["bob"].black_hole = True  # bob's link is silent, not closed: the hub keeps posting
        for i in range(60):
            alice.say(f"m{i}")
        await alice.wait_for(lambda c: len(room_texts(c)) == 60, WAIT)
        member = next(m for m in r.hub.members.values() if m.nick == "bob")
        assert member.lagging  # the fan-out did not wait for bob
        r.relays["bob"].black_hole = False
        r.relays["bob"].cut()  # bob reconnects, resumes, and the drain feeds him
        await bob.wait_for(lambda c: len(room_texts(c)) == 60, WAIT)
        assert room_texts(bob) == [f"m{i}" for i in range(60)]
        await asyncio.sleep(0)
        assert not member.lagging


async def test_flooding_is_slowed_not_lost() -> None:
    async with rig(settings=HubSettings(rate=20, burst=5)) as r:
        alice = await r.client("alice")
        bob = await r.client("bob")
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(25):
            alice.say(f"flood {i}")
        await bob.wait_for(lambda c: len(room_texts(c)) == 25, WAIT)
        assert room_texts(bob) == [f"flood {i}" for i in range(25)]
        assert loop.time() - started >= 0.7  # ~20 of 25 waited for tokens at 20/s
        assert any("slow down" in line.text for line in lines_of(alice, "event"))
