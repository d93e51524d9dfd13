"""The real ``korinet-chat`` program in a real terminal (tmux): type a message, see
another client's message appear, change nick, join a room, and survive an escape
sequence injection. The hub runs in the test (TLS, 127.0.0.1, a random port); the
other client is a scripted ChatClient."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from chat_helpers import WAIT, Pane, come_back, fresh_plugins, go_down, has_line, program, room_texts
from korinet_chat.client import ChatClient
from korinet_chat.hub import ChatHub
from testutil import TIMEOUT_FACTOR

from korinet.security import ClientTLS, Identity, ServerTLS

pytestmark = [
    pytest.mark.timeout(60 * TIMEOUT_FACTOR),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian package tmux)"),
]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "korinet-home"
    monkeypatch.setenv("KORINET_HOME", str(path))
    yield path


async def test_the_real_program_in_tmux(home: Path, tmp_path: Path) -> None:
    plugins = fresh_plugins()
    identity = Identity.load_or_create()
    hub = ChatHub(tmp_path / "chat.sqlite3")
    server = hub.server("127.0.0.1", 0, tls=ServerTLS(identity), plugins=plugins)
    await server.start()
    bob = ChatClient(
        "127.0.0.1", server.port, "bob", plugins=plugins, tls=ClientTLS(fingerprint=identity.fingerprint)
    )
    await bob.start(open_timeout=WAIT)
    env = {"KORINET_HOME": str(home), "TERM": "xterm-256color", "LANG": "C.UTF-8"}
    pane = Pane(f"{program()} 127.0.0.1:{server.port} --nick alice --no-bell", env)
    try:
        screen = await pane.shows("joined #general (2 here)")
        # TOFU, said out loud (compared without spaces: the notice wraps at the pane's width)
        assert f"itskey{identity.fingerprint}isnowpinned" in "".join(screen.split())
        await pane.shows("#general · alice · connected")
        # type a message: bob gets it, and it shows in alice's terminal from the hub
        pane.type("hello from a real terminal")
        await bob.wait_for(lambda c: room_texts(c) == ["hello from a real terminal"], WAIT)
        await pane.shows("<alice> hello from a real terminal")
        # another client's message appears above the prompt
        bob.say("hi alice, bob here")
        await pane.shows("<bob> hi alice, bob here")
        # an escape sequence from a peer cannot clear the screen or retitle the window
        bob.say("\x1b[2J\x1b[H\x1b]0;pwned\x07gotcha")
        screen = await pane.shows("gotcha")
        assert "^[[2J^[[H^[]0;pwned^Ggotcha" in screen
        assert "hello from a real terminal" in screen  # still there: nothing was cleared
        # change nick
        pane.type("/nick alicia")
        await pane.shows("you are now known as alicia")
        await bob.wait_for(has_line("event", "alice is now known as alicia"), WAIT)
        await pane.shows("#general · alicia · connected")
        # join a room
        pane.type("/join #dev")
        await pane.shows("#dev · alicia · connected")
        await pane.shows("created #dev (1 here)")
        await bob.handle_input("/join #dev")
        await pane.shows("bob joined #dev")
        bob.say("welcome to dev")
        await pane.shows("<bob> welcome to dev")
        pane.type("/who")
        await pane.shows("#dev: alicia, bob")
        pane.type("/quit")
        assert await pane.exited() == 0
        await bob.wait_for(has_line("event", "alicia left"), WAIT)
    finally:
        pane.kill()
        await bob.close()
        await server.close()
        hub.close()


async def test_offline_typing_in_a_real_terminal(home: Path, tmp_path: Path) -> None:
    """The link drops (a relay in between stops listening): the line typed meanwhile shows as
    pending with "reconnecting… 1 queued", then arrives once, after the away marker."""
    from testutil.relay import Relay

    plugins = fresh_plugins()
    hub = ChatHub(":memory:")
    server = hub.server("127.0.0.1", 0, plugins=plugins)
    await server.start()
    relay = await Relay("127.0.0.1", server.port).start()
    bob = ChatClient("127.0.0.1", server.port, "bob", plugins=plugins)
    await bob.start(open_timeout=WAIT)
    env = {"KORINET_HOME": str(home), "TERM": "xterm-256color", "LANG": "C.UTF-8"}
    pane = Pane(f"{program()} 127.0.0.1:{relay.port} --nick alice --insecure-plaintext --no-bell", env)
    try:
        await pane.shows("#general · alice · connected")
        port = await go_down(relay)
        await pane.shows("reconnecting…")
        await bob.wait_for(has_line("event", "alice is reconnecting"), WAIT)
        pane.type("typed while the link is down")
        await pane.shows("⧗ #general typed while the link is down")
        await pane.shows("#general · alice · reconnecting… 1 queued")
        bob.say("you missed this")
        await come_back(relay, port)
        screen = await pane.shows("<alice> typed while the link is down")
        assert screen.index("— 1 new while away —") < screen.index("<bob> you missed this")
        await pane.shows("#general · alice · connected")
        await bob.wait_for(
            lambda c: room_texts(c) == ["you missed this", "typed while the link is down"], WAIT
        )
        assert "⧗" not in pane.screen()
    finally:
        pane.kill()
        await bob.close()
        await relay.close()
        await server.close()
        hub.close()
