"""korinet-chat as people meet it (issue 17), most of it in a real terminal (tmux):
no dead end on a stale announcement, a paste arrives whole and fast, nothing typed is
thrown away, quitting says things in words and asks before dropping lines, Tab knows
every room, the scrollback holds only chat lines, and a hub that is back is used again
at once."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from chat_helpers import WAIT, Pane, come_back, fresh_plugins, go_down, has_line, program, rig, room_texts
from korinet_chat.client import ChatClient
from korinet_chat.hub import ChatHub
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Server
from korinet.plugins import PluginManager

pytestmark = pytest.mark.timeout(90 * TIMEOUT_FACTOR)

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian package tmux)")

LOOPBACK = ["127.0.0.1"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "korinet-home"
    path.mkdir()
    monkeypatch.setenv("KORINET_HOME", str(path))
    yield path


def env(home: Path) -> dict[str, str]:
    return {"KORINET_HOME": str(home), "TERM": "xterm-256color", "LANG": "C.UTF-8"}


@contextlib.asynccontextmanager
async def hub_on_loopback() -> AsyncIterator[tuple[Server, PluginManager]]:
    """A plaintext hub with the default settings (flood control on), on a free port."""
    plugins = fresh_plugins()
    hub = ChatHub(":memory:")
    server = hub.server("127.0.0.1", 0, plugins=plugins)
    await server.start()
    try:
        yield server, plugins
    finally:
        await server.close()
        hub.close()


@contextlib.asynccontextmanager
async def member(nick: str, port: int, plugins: PluginManager) -> AsyncIterator[ChatClient]:
    client = ChatClient("127.0.0.1", port, nick, plugins=plugins)
    await client.start(open_timeout=WAIT)
    try:
        yield client
    finally:
        await client.close()


@contextlib.contextmanager
def chat_pane(home: Path, args: str) -> Iterator[Pane]:
    pane = Pane(f"{program()} {args} --no-bell", env(home))
    try:
        yield pane
    finally:
        pane.kill()


def free_port() -> int:
    """A port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- 1. no dead end


@needs_tmux
async def test_a_stale_announcement_is_passed_over_and_a_hub_starts_here(home: Path) -> None:
    from korinet_chat.discovery import announce

    # the embedded hub stays on loopback (mDNS and its listener), on any free port
    (home / "chat.toml").write_text('interface = "127.0.0.1"\nport = 0\n')
    dead_port = free_port()
    stale = await announce(
        dead_port, name=f"stale hub {uuid.uuid4().hex[:6]}", addresses=LOOPBACK, interfaces=LOOPBACK
    )
    try:
        with chat_pane(home, f"--nick alice --discover-timeout {3 * TIMEOUT_FACTOR:g}") as pane:
            await pane.shows(f"the hub announced at 127.0.0.1:{dead_port} does not answer; starting one here")
            await pane.shows("started one here on port")
            await pane.shows("#general · alice · connected")
            pane.type("/quit")
            assert await pane.exited() == 0
            assert "cannot join" not in pane.scrollback()
    finally:
        await stale.close()


# ---------------------------------------------------------------------- 3. nothing typed is lost


@needs_tmux
async def test_a_500_line_paste_arrives_whole_in_order_at_every_member_in_seconds(home: Path) -> None:
    loop = asyncio.get_running_loop()
    lines = [f"pasted line {i:03d}" for i in range(1, 501)]
    async with hub_on_loopback() as (server, plugins):
        async with member("bob", server.port, plugins) as bob, member("carol", server.port, plugins) as carol:
            with chat_pane(home, f"127.0.0.1:{server.port} --nick alice --insecure-plaintext") as pane:
                await pane.shows("#general · alice · connected")
                pane.paste("\n".join(lines) + "\n")
                await pane.shows("pasted line 500")  # in the input, waiting for Enter
                started = loop.time()
                pane.send("Enter")
                for client in (bob, carol):
                    await client.wait_for(lambda c: len(room_texts(c)) >= len(lines), WAIT)
                    assert room_texts(client) == lines
                # a paste is not a flood: no waiting on flood control (it took 96 s)
                assert loop.time() - started < 5 * TIMEOUT_FACTOR
                assert not any("slow down" in line.text for line in bob.lines)
                await pane.shows("<alice> pasted line 500")
                await pane.shows("#general · alice · connected")
                # a clean quit says nothing in Python
                pane.type("/quit")
                assert await pane.exited() == 0
                text = pane.scrollback()
                assert "ConnectionClosed" not in text and "disconnected" not in text


@needs_tmux
async def test_a_line_over_the_limit_stays_in_the_input_with_the_reason(home: Path) -> None:
    long_line = "x" * 99_990 + "END-MARKER"  # 100 000 characters
    async with hub_on_loopback() as (server, plugins), member("bob", server.port, plugins) as bob:
        with chat_pane(home, f"127.0.0.1:{server.port} --nick alice --insecure-plaintext") as pane:
            await pane.shows("#general · alice · connected")
            pane.paste(long_line)
            await pane.shows("END-MARKER")
            pane.send("Enter")
            reason = "too long (100000 > 2000 characters): shorten or split it; nothing was sent"
            screen = await pane.shows(reason)
            assert screen.index("END-MARKER") < screen.index(reason)  # still in the input
            pane.send("C-u")  # the user clears it (it was theirs to edit)
            await pane.wait(lambda s: "END-MARKER" not in s, "the input cleared")
            pane.type("a short one")
            await bob.wait_for(lambda c: room_texts(c) == ["a short one"], WAIT)


# ---------------------------------------------------------------------- 4. quitting


@needs_tmux
async def test_quit_with_undelivered_lines_asks_once_and_waiting_delivers_them(home: Path) -> None:
    async with hub_on_loopback() as (server, plugins), member("bob", server.port, plugins) as bob:
        relay = await Relay("127.0.0.1", server.port).start()
        try:
            with chat_pane(home, f"127.0.0.1:{relay.port} --nick alice --insecure-plaintext") as pane:
                await pane.shows("#general · alice · connected")
                port = await go_down(relay)
                await pane.shows("reconnecting…")
                pane.type("first while down")
                pane.type("second while down")
                await pane.shows("reconnecting… 2 queued")
                pane.type("/quit")
                await pane.shows("2 lines not yet delivered; /quit again to drop them, or wait")
                assert not pane.dead()
                await come_back(relay, port)  # the user waits...
                await pane.shows("everything you typed is delivered")
                await bob.wait_for(lambda c: room_texts(c) == ["first while down", "second while down"], WAIT)
                pane.type("/quit")  # ...and leaves cleanly
                assert await pane.exited() == 0
                text = pane.scrollback()
                assert "dropped" not in text and "ConnectionClosed" not in text
        finally:
            await relay.close()


@needs_tmux
@pytest.mark.parametrize("quits", [["/quit", "/quit"], ["/quit --force"]], ids=["twice", "force"])
async def test_dropping_undelivered_lines_says_how_many_and_fails(home: Path, quits: list[str]) -> None:
    async with hub_on_loopback() as (server, _):
        relay = await Relay("127.0.0.1", server.port).start()
        try:
            with chat_pane(home, f"127.0.0.1:{relay.port} --nick alice --insecure-plaintext") as pane:
                await pane.shows("#general · alice · connected")
                await go_down(relay)
                await pane.shows("reconnecting…")
                for i in range(3):
                    pane.type(f"lost line {i}")
                await pane.shows("reconnecting… 3 queued")
                for command in quits:
                    pane.type(command)
                assert await pane.exited() == 1
                text = pane.scrollback()
                assert "3 lines you typed had not reached the hub; dropped" in text
                assert "ConnectionClosed" not in text
        finally:
            await relay.close()


# ---------------------------------------------------------------------- 5. Tab, reconnect, scrollback


@needs_tmux
async def test_tab_completes_a_room_you_are_not_in(home: Path) -> None:
    async with hub_on_loopback() as (server, plugins), member("bob", server.port, plugins) as bob:
        with chat_pane(home, f"127.0.0.1:{server.port} --nick alice --insecure-plaintext") as pane:
            await pane.shows("#general · alice · connected")
            await bob.handle_input("/join #design")  # made after alice arrived; she is not in it
            await bob.wait_for(lambda c: "design" in c.rooms, WAIT)
            pane.send("-l", "/join #des")
            pane.send("Tab")
            await pane.shows("/join #design")
            pane.send("Enter")
            await pane.shows("#design · alice · connected")


CHAT_ROW = re.compile(
    r"^(\d\d:\d\d <[\w\-\[\]{}|^`]+> "  # a message
    r"|-- "  # an event
    r"|— (joined|created) #\w+ \(\d+ here\) —$"  # the first join
    r"|korinet-chat client: WARNING: --insecure-plaintext)"  # said before the prompt starts
)


@needs_tmux
async def test_the_scrollback_holds_only_chat_lines(home: Path) -> None:
    """Keys typed while lines arrive, and a paste taller than the terminal, leave no copies
    of the input, the prompt or the toolbar behind."""
    typed = [f"typed {i}" for i in range(20)]
    pasted = [f"pasted {i}" for i in range(45)]  # the pane is 30 rows
    async with hub_on_loopback() as (server, plugins), member("bob", server.port, plugins) as bob:
        with chat_pane(home, f"127.0.0.1:{server.port} --nick alice --insecure-plaintext") as pane:
            await pane.shows("#general · alice · connected")

            async def chatter() -> None:
                for i in range(40):
                    bob.say(f"bob says {i}")
                    await asyncio.sleep(0)

            talking = asyncio.create_task(chatter())
            for line in typed:
                pane.type(line)
            await talking
            pane.paste("\n".join(pasted))
            await pane.shows("pasted 44")
            pane.send("Enter")
            await bob.wait_for(lambda c: len(room_texts(c)) == 40 + len(typed) + len(pasted), WAIT)
            await pane.shows("<alice> pasted 44")
            await pane.wait(lambda s: "<bob> bob says 39" in pane.scrollback(), "bob's last line")
            rows = [row for row in pane.scrollback().splitlines() if row.strip()]
            assert rows[-2].startswith("#general>") and rows[-1].strip() == "#general · alice · connected"
            stray = [row for row in rows[:-2] if not CHAT_ROW.match(row)]
            assert stray == []
            shown = [row.split("> ", 1)[1] for row in rows if "<alice> " in row]
            assert shown == typed + pasted


async def test_the_client_retries_at_least_every_second() -> None:
    """Without mDNS, a hub that is back is used again within about a second: the chat
    client caps its reconnection backoff at 1 s (the runtime's default is 5 s)."""
    async with rig() as r:
        alice = await r.client("alice")
        assert alice.peer is not None and alice.peer.backoff_cap <= 1.0
        port = await go_down(r.relays["alice"])
        await alice.wait_for(lambda c: c.state == "reconnecting", WAIT)
        # long enough down for the backoff to reach its cap (0, 25 ms, 50 ms... doubling)
        loop = asyncio.get_running_loop()
        while alice.peer.attempts < 9:
            await asyncio.sleep(0.01)
        seen = alice.peer.attempts
        while alice.peer.attempts == seen:  # come back just after a refused attempt
            await asyncio.sleep(0.005)
        await come_back(r.relays["alice"], port)
        back = loop.time()
        await alice.wait_for(lambda c: c.state == "connected", WAIT)
        assert loop.time() - back < 1.0 + 0.5 * TIMEOUT_FACTOR


async def test_a_hub_announced_again_is_reconnected_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client found its hub by mDNS: when the hub announces itself again, the client
    reconnects then, not at its next backoff attempt (here: never, an hour away)."""
    from korinet_chat.cli import _follow_hub
    from korinet_chat.discovery import announce

    from korinet import reconnect as reconnect_module

    def hour_waits(**kwargs: Any) -> Iterator[float]:
        yield 0.0
        while True:
            yield 3600.0

    monkeypatch.setattr(reconnect_module, "backoff", hour_waits)
    name = f"restarting hub {uuid.uuid4().hex[:6]}"
    async with rig() as r:
        alice = await r.client("alice")
        watcher = _follow_hub(alice, name, "127.0.0.1")
        assert watcher is not None
        try:
            relay = r.relays["alice"]
            port = await go_down(relay)
            await alice.wait_for(lambda c: c.state == "reconnecting", WAIT)
            assert alice.peer is not None
            while not isinstance(alice.peer.last_error, ConnectionRefusedError):
                await asyncio.sleep(0.01)  # the immediate retry failed: the hour starts
            await come_back(relay, port)
            announcement = await announce(port, name=name, addresses=LOOPBACK, interfaces=LOOPBACK)
            try:
                await alice.wait_for(lambda c: c.state == "connected", WAIT)
                alice.say("back")
                await alice.wait_for(lambda c: room_texts(c) == ["back"], WAIT)
            finally:
                await announcement.close()
        finally:
            await watcher.close()


async def test_a_session_ended_by_the_hub_is_said_in_words() -> None:
    """The hub ends the session (it shuts down for good): the line says so in words."""
    async with rig() as r:
        alice = await r.client("alice")
        member_peer = next(p for p, m in r.hub.members.items() if m.nick == "alice")
        await member_peer.close("hub stopping")
        await alice.wait_for(has_line("error", "disconnected from the hub"), WAIT)
        line = next(x.text for x in alice.lines if "disconnected" in x.text)
        assert line == "disconnected from the hub: the session ended (hub stopping)"
