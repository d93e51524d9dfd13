"""Bad input: escape sequences, oversize messages, bad names, collisions, unknown rooms,
hostile peers on either side. Nothing a peer sends may crash the hub or a client, or
reach the terminal as a control character."""

from __future__ import annotations

import asyncio

import pytest
from chat_helpers import WAIT, fresh_plugins, has_line, lines_of, rig, room_texts
from korinet_chat import protocol
from korinet_chat.client import ChatClient
from korinet_chat.sanitize import is_clean
from korinet_chat.ui import plain
from testutil import TIMEOUT_FACTOR

from korinet import Client, MessageRejected, Server

pytestmark = pytest.mark.timeout(30 * TIMEOUT_FACTOR)

EVIL = "\x1b[2J\x1b[H\x1b]0;pwned\x07\x9b31m\u202eevil\x08\x08\r\nnext"


async def test_escape_sequences_from_another_user_are_neutralised() -> None:
    async with rig() as r:
        bob = await r.client("bob")
        mallory = Client("127.0.0.1", r.server.port, plugins=r.plugins)
        mallory.start()
        await mallory.wait_connected(WAIT)
        rid = iter(range(1, 100))
        await mallory.send({"rid": next(rid), "op": "hello", "nick": "mallory"}, protocol.REQUEST)
        await mallory.send({"rid": next(rid), "op": "join", "room": "general"}, protocol.REQUEST)
        await mallory.send({"rid": next(rid), "op": "say", "room": "general", "text": EVIL, "mid": "m1"},
                           protocol.REQUEST)  # fmt: skip
        await mallory.send({"rid": next(rid), "op": "away", "message": EVIL}, protocol.REQUEST)
        await bob.wait_for(lambda c: len(room_texts(c)) == 1, WAIT)
        await bob.wait_for(has_line("event", "mallory is away"), WAIT)
        line = next(x for x in bob.lines if x.kind == "msg")
        for text in (line.text, plain(line, "general"), lines_of(bob, "event")[-1].text):
            assert is_clean(text), repr(text)
            assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
        assert line.text.startswith("^[[2J^[[H^[]0;pwned^G<U+009B>31m<U+202E>evil^H^H⏎⏎next")
        # a nick with controls never gets in
        with pytest.raises(MessageRejected, match="invalid nick"):
            await mallory.send({"rid": next(rid), "op": "nick", "nick": "\x1b[31mbob"}, protocol.REQUEST)
        await mallory.close()


async def test_a_hostile_hub_cannot_reach_the_terminal_either() -> None:
    plugins = fresh_plugins()

    async def evil_hub(peer):  # type: ignore[no-untyped-def]
        async for request in peer:
            rid = request["rid"]
            if request["op"] == "hello":
                await peer.send({"rid": rid, "ok": True, "nick": request["nick"]}, protocol.RESULT)
            elif request["op"] == "join":
                await peer.send({"rid": rid, "ok": True, "room": "general", "head": 0, "history": [],
                                 "members": [{"nick": EVIL}]}, protocol.RESULT)  # fmt: skip
                await peer.send(
                    {"room": "general", "seq": 1, "ts": 0, "nick": EVIL, "text": EVIL}, protocol.MSG
                )
                await peer.send({"kind": "nick", "nick": EVIL, "new": EVIL}, protocol.EVENT)
                await peer.send({"from": EVIL, "to": "bob", "text": EVIL}, protocol.DM)
                await peer.send({"kind": "notice", "text": EVIL}, protocol.EVENT)
                # a malformed message is refused by validation, not shown, not fatal
                with pytest.raises(MessageRejected):
                    await peer.send({"room": "general", "seq": "x", "nick": 1}, protocol.MSG)

    async with Server("127.0.0.1", 0, handler=evil_hub, plugins=plugins) as server:
        bob = ChatClient("127.0.0.1", server.port, "bob", plugins=plugins)
        await bob.start(open_timeout=WAIT)
        await bob.wait_for(
            lambda c: any(x.kind == "event" and x.text.startswith("hub:") for x in c.lines), WAIT
        )
        shown = [plain(x, "general") for x in bob.lines]
        assert len(shown) >= 5
        for text in shown:
            assert is_clean(text), repr(text)
        await bob.close()


async def test_oversize_messages_get_a_clear_error_on_both_sides() -> None:
    async with rig() as r:
        alice = await r.client("alice")
        await alice.handle_input("x" * (protocol.MAX_TEXT + 1))
        assert lines_of(alice, "error")[-1].text == (
            f"message too long ({protocol.MAX_TEXT + 1} > {protocol.MAX_TEXT} characters): not sent"
        )
        assert not alice.pending
        raw = Client("127.0.0.1", r.server.port, plugins=r.plugins)
        raw.start()
        await raw.wait_connected(WAIT)
        with pytest.raises(MessageRejected, match="message too long"):
            await raw.send({"rid": 1, "op": "say", "room": "general", "text": "y" * 5000, "mid": "z"},
                           protocol.REQUEST)  # fmt: skip
        await raw.close()
        alice.say("x" * protocol.MAX_TEXT)  # the limit itself is fine
        await alice.wait_for(lambda c: len(room_texts(c)) == 1, WAIT)


async def test_nick_collisions_and_unknown_rooms_get_clear_answers() -> None:
    async with rig() as r:
        await r.client("alice")
        second = await r.client("ALICE")  # nicks collide regardless of case
        assert second.nick == "ALICE_"
        assert has_line("info", "the nick ALICE is taken: you are ALICE_")(second)
        await second.handle_input("/nick alice")
        await second.wait_for(has_line("error", "the nick 'alice' is taken"), WAIT)
        await second.handle_input("/who #nowhere")
        await second.wait_for(
            has_line("error", "no room #nowhere (rooms: #general; /join creates one)"), WAIT
        )
        await second.handle_input("/part #nowhere")
        await second.wait_for(has_line("error", "you are not in #nowhere"), WAIT)
        await second.handle_input("/join #b@d")
        await second.wait_for(has_line("error", "invalid room name"), WAIT)
        await second.handle_input("/nick bad nick")  # only the first word counts: "bad"
        await second.wait_for(lambda c: c.nick == "bad", WAIT)
        await second.handle_input("/frobnicate")
        assert "unknown command /frobnicate" in lines_of(second, "error")[-1].text
        await second.handle_input("/msg nobody hi")
        await second.wait_for(has_line("error", "nobody called 'nobody' is here"), WAIT)


async def test_garbage_requests_do_not_hurt_the_hub() -> None:
    async with rig() as r:
        alice = await r.client("alice")
        raw = Client("127.0.0.1", r.server.port, plugins=r.plugins)
        raw.start()
        await raw.wait_connected(WAIT)
        bad = [
            "not a map",
            {"rid": 1},
            {"rid": -1, "op": "hello", "nick": "x"},
            {"rid": 1, "op": "nope"},
            {"rid": 1, "op": "join", "room": 7},
            {"rid": 1, "op": "say", "room": "general", "text": None, "mid": "a"},
            {"rid": 1, "op": "search", "query": "q" * 10_000},
        ]
        for payload in bad:
            with pytest.raises(MessageRejected):
                await raw.send(payload, protocol.REQUEST)
        with pytest.raises(MessageRejected, match="only typed messages"):
            await raw.send({"plain": "data"})
        # not registered yet: a clear answer, not a crash
        await raw.send({"rid": 9, "op": "say", "room": "general", "text": "hi", "mid": "b"}, protocol.REQUEST)
        answer = await raw.recv_message(WAIT)
        assert answer.type == protocol.RESULT and answer.data["code"] == "unregistered"
        await raw.close()
        alice.say("still fine")
        await alice.wait_for(lambda c: room_texts(c) == ["still fine"], WAIT)
        await asyncio.sleep(0)


async def test_a_failing_request_costs_one_answer_not_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    async with rig() as r:
        alice = await r.client("alice")

        def broken(member: object, data: object) -> dict[str, object]:
            raise RuntimeError("a bug")

        monkeypatch.setattr(r.hub, "_op_rooms", broken)
        await alice.handle_input("/rooms")
        assert lines_of(alice, "error")[-1].text == "internal error"
        alice.say("still here")
        await alice.wait_for(lambda c: room_texts(c) == ["still here"], WAIT)


def test_a_lagging_members_outbox_is_bounded_and_keeps_answers() -> None:
    from korinet_chat.hub import OUTBOX_LIMIT, ChatHub, Member
    from korinet_chat.limits import TokenBucket

    hub = ChatHub()
    try:
        member = Member(peer=None, bucket=TokenBucket(0, 1, 0))  # type: ignore[arg-type]
        hub._queue(member, protocol.RESULT, {"rid": 1, "ok": True})
        for i in range(OUTBOX_LIMIT + 5):
            hub._queue(member, protocol.EVENT, {"kind": "online", "nick": f"n{i}"})
        assert len(member.outbox) == OUTBOX_LIMIT
        assert member.outbox[0] == (protocol.RESULT, {"rid": 1, "ok": True})
        assert member.outbox[-1][1]["nick"] == f"n{OUTBOX_LIMIT + 4}"
    finally:
        hub.close()
