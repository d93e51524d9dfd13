"""The chat's pure parts without a network: sanitising, validation, the token bucket,
the SQLite history, rendering and completion; and the UI fed through a pipe."""

from __future__ import annotations

import asyncio

import pytest
from chat_helpers import WAIT, rig, room_texts
from hypothesis import given
from hypothesis import strategies as st
from korinet_chat import protocol
from korinet_chat.client import ChatClient, Line, check_input, describe, paste_lines
from korinet_chat.limits import TokenBucket
from korinet_chat.sanitize import clean, is_clean
from korinet_chat.store import History
from korinet_chat.ui import ChatCompleter, ChatUI, InputCheck, _quit_command, plain, render
from prompt_toolkit.application import create_app_session
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

# ---------------------------------------------------------------------- sanitize


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text, ünïcødé, 日本語, emoji 👍🏽", "plain text, ünïcødé, 日本語, emoji 👍🏽"),
        ("\x1b[2J", "^[[2J"),
        ("\x07bell", "^Gbell"),
        ("a\rb\nc", "a⏎b⏎c"),
        ("tab\there", "tab here"),
        ("\x9b31m", "<U+009B>31m"),
        ("\x7f", "^?"),
        ("abc\u202edcba", "abc<U+202E>dcba"),
        ("\u2066isolate\u2069", "<U+2066>isolate<U+2069>"),
        ("\x00", "^@"),
    ],
)
def test_clean_makes_controls_visible(raw: str, shown: str) -> None:
    assert clean(raw) == shown
    assert is_clean(clean(raw))


@given(st.text())
def test_clean_never_lets_a_control_through(text: str) -> None:
    out = clean(text)
    assert is_clean(out)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out)


def test_clean_takes_anything_and_cuts_long_text() -> None:
    assert clean(42) == "42"
    assert clean(None) == "None"
    assert clean("x" * 50, 10) == "x" * 9 + "…"
    assert is_clean(clean("\ud800 lone surrogate"))


# ---------------------------------------------------------------------- protocol


def test_names_are_checked_and_normalised() -> None:
    assert protocol.normalize_room("#General") == "general"
    assert protocol.normalize_nick("Zoë_2") == "Zoë_2"
    assert protocol.nick_key("ALICE") == protocol.nick_key("alice")
    for bad in ("", "a b", "#x", "x" * 25, "\x1bbob", "-"):
        with pytest.raises(ValueError):
            protocol.normalize_nick(bad)
    for bad in ("", "#", "a b", "x" * 40, "r\x00"):
        with pytest.raises(ValueError):
            protocol.normalize_room(bad)


def test_requests_are_validated() -> None:
    protocol.validate_request({"rid": 1, "op": "say", "room": "g", "text": "hi", "mid": "m"})
    with pytest.raises(ValueError, match="unknown operation"):
        protocol.validate_request({"rid": 1, "op": "shutdown"})
    with pytest.raises(ValueError, match="message too long"):
        protocol.validate_request({"rid": 1, "op": "say", "room": "g", "text": "x" * 2001, "mid": "m"})
    with pytest.raises(ValueError, match="kind"):
        protocol.validate_request(
            {"rid": 1, "op": "say", "room": "g", "text": "x", "mid": "m", "kind": "zap"}
        )
    with pytest.raises(TypeError):
        protocol.validate_msg(["not", "a", "map"])


# ---------------------------------------------------------------------- input


def test_a_paste_is_lines_and_a_single_line_is_not() -> None:
    assert paste_lines("just one line\n") is None
    assert paste_lines("one\r\ntwo\n\n   \nthree\n") == ["one", "two", "three"]
    assert paste_lines("/quit\nnot a command") == ["/quit", "not a command"]


def test_check_input_names_what_is_too_long_and_passes_the_rest() -> None:
    limit = protocol.MAX_TEXT
    assert check_input("x" * limit) is None
    assert check_input("x" * (limit + 1)) == (
        f"too long ({limit + 1} > {limit} characters): shorten or split it; nothing was sent"
    )
    reason = check_input(f"fine\n{'y' * (limit + 5)}\nfine too")
    assert reason is not None and reason.startswith(f"line 2 of 3 is too long ({limit + 5} > {limit}")
    assert check_input(f"/msg bob {'z' * limit}") is None  # the body counts, not the command
    assert check_input(f"/ms bob {'z' * (limit + 1)}") is not None  # a prefix is the command
    assert check_input(f"/me {'z' * (limit + 1)}") is not None
    assert check_input(f"/search {'q' * (protocol.MAX_QUERY + 1)}") is not None
    assert check_input("/join #anything") is None


def test_errors_are_told_in_words() -> None:
    from korinet import ConnectionClosedError, ConnectionClosedOK, MessageRejected

    assert describe(ConnectionClosedOK(1000, "bye")) == "the session ended (bye)"
    assert describe(ConnectionClosedError(1013, "")) == "link lost"
    assert describe(ConnectionClosedOK(1001, "")) == "the hub shut down"
    assert describe(ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")) == (
        "connection refused"
    )
    assert describe(TimeoutError()) == "no answer in time"
    assert describe(MessageRejected("'text' too long", message_type="chat.request")) == (
        "refused: 'text' too long"
    )


def test_text_typed_outside_any_room_stays_in_the_input() -> None:
    from prompt_toolkit.validation import ValidationError

    class _NoRoom:
        current = None

    check = InputCheck(_NoRoom())  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="you are in no room"):
        check.validate(Document("hello?"))
    with pytest.raises(ValidationError, match="you are in no room"):
        check.validate(Document("one\ntwo"))
    check.validate(Document("/join #general"))  # a command goes through


def test_quit_commands() -> None:
    assert _quit_command("/quit") is False
    assert _quit_command("/qu") is False
    assert _quit_command("/quit --force") is True
    assert _quit_command("/q") is False  # an unambiguous prefix
    assert _quit_command("/quit\nsecond line") is None  # a paste is text
    assert _quit_command("hello") is None


# ---------------------------------------------------------------------- limits


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.delay(0.0) == pytest.approx(0.5)
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.delay(1.0) == 0.0  # one token back after the wait was paid
    assert bucket.take(1.0) == 0.0
    assert TokenBucket(rate=0, burst=1, now=0).take(0) == 0.0  # disabled


# ---------------------------------------------------------------------- store


def test_history_numbers_messages_per_room_and_survives_a_reopen(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "h.sqlite3"
    db = History(path)
    db.create_room("a", 0)
    db.create_room("b", 0)
    assert db.append("a", "x", "one", "say", "m1", 1.0)[0]["seq"] == 1
    assert db.append("b", "x", "other room", "say", "m2", 2.0)[0]["seq"] == 1
    assert db.append("a", "x", "two 100%_", "say", "m3", 3.0)[0]["seq"] == 2
    again, duplicate = db.append("a", "x", "one", "say", "m1", 9.0)
    assert duplicate and again["seq"] == 1 and db.head("a") == 2
    db.close()
    db = History(path)
    assert db.rooms() == {"a": 2, "b": 1}
    assert [m["text"] for m in db.since("a", 0, 10)] == ["one", "two 100%_"]
    assert [m["text"] for m in db.last("a", 1)] == ["two 100%_"]
    assert [m["text"] for m in db.search("100%", ["a", "b"], 10)] == ["two 100%_"]
    assert db.search("%", ["a"], 10)[0]["seq"] == 2  # wildcards are literal
    assert db.search("o", ["a", "b"], 10)[-1]["text"] == "two 100%_"
    assert db.append("a", "x", "three", "me", None, 4.0)[0]["seq"] == 3
    db.close()


# ---------------------------------------------------------------------- rendering


def test_render_marks_rooms_mentions_and_actions() -> None:
    msg = Line("msg", "hi alice", room="dev", nick="bob", ts=0, mention=True)
    frags = render(msg, current="general")
    assert ("class:room", "[#dev] ") in frags
    assert ("class:mention", "hi alice") in frags
    assert plain(Line("msg", "waves", room="general", nick="bob", ts=0, me=True), "general").endswith(
        "* bob waves"
    )
    assert plain(Line("error", "oops"), None) == "! oops"
    assert plain(Line("marker", "— 3 new while away —"), None) == "— 3 new while away —"


class _FakeClient:
    nick = "alice"
    current = "general"
    rooms = {"general": None, "dev": None}
    members = {"general": {"alice", "bob", "Bea"}, "dev": {"carol"}}
    known_rooms = {"design", "general"}  # rooms the hub named, joined or not


def _complete(text: str) -> list[str]:
    completer = ChatCompleter(_FakeClient())  # type: ignore[arg-type]
    return [
        c.text for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))
    ]


def test_completion_of_commands_nicks_and_rooms() -> None:
    assert _complete("/jo") == ["/join "]
    assert set(_complete("/")) >= {"/join ", "/quit ", "/search "}
    assert _complete("b") == ["Bea: ", "bob: "]
    assert _complete("hello c") == ["carol "]
    assert _complete("/join #d") == ["#design", "#dev"]
    assert _complete("a") == []  # not oneself


# ---------------------------------------------------------------------- the UI, through a pipe


async def test_the_prompt_sends_lines_and_quits() -> None:
    async with rig() as r:
        bob = await r.client("bob")
        with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
            alice = ChatClient("127.0.0.1", r.server.port, "alice", plugins=r.plugins)
            ui = ChatUI(alice, input=pipe, output=DummyOutput())
            await alice.start(open_timeout=WAIT)
            running = asyncio.create_task(ui.run())
            pipe.send_text("hello from the prompt\r")
            await bob.wait_for(lambda c: room_texts(c) == ["hello from the prompt"], WAIT)
            assert ui.toolbar()[-1][1].strip() == "#general · alice · connected"
            pipe.send_text("/quit\r")
            await asyncio.wait_for(running, WAIT)
            await alice.close()
