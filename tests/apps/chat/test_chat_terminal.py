"""The real ``korinet-chat`` program in a real terminal (tmux): type a message, see
another client's message appear, change nick, join a room, and survive an escape
sequence injection. The hub runs in the test (TLS, 127.0.0.1, a random port); the
other client is a scripted ChatClient."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chat_helpers import WAIT, come_back, fresh_plugins, go_down, has_line, room_texts
from korinet_chat.client import ChatClient
from korinet_chat.hub import ChatHub
from testutil import TIMEOUT_FACTOR

from korinet.security import ClientTLS, Identity, ServerTLS

pytestmark = [
    pytest.mark.timeout(60 * TIMEOUT_FACTOR),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian package tmux)"),
]


class Pane:
    """One tmux session on a private server socket."""

    def __init__(self, command: str, env: dict[str, str]) -> None:
        self.socket = f"korinet-chat-test-{uuid.uuid4().hex[:8]}"
        self.name = "chat"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        self._tmux("new-session", "-d", "-s", self.name, "-x", "110", "-y", "30", f"env {exports} {command}")
        self._tmux("set-option", "-t", self.name, "remain-on-exit", "on")

    def _tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10
        )
        if result.returncode != 0:
            raise RuntimeError(f"tmux {args[0]} failed: {result.stderr.strip()}")
        return result.stdout

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.name, *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", self.name, "-l", text)
        self.send("Enter")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.name)

    def dead(self) -> bool:
        return self._tmux("display-message", "-p", "-t", self.name, "#{pane_dead}").strip() == "1"

    async def wait(self, predicate: Callable[[str], bool], what: str) -> str:
        """Poll the screen (there is no event to await from a terminal) until it shows ``what``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if loop.time() > deadline:
                raise AssertionError(f"the terminal never showed {what}; it shows:\n{screen}")
            await asyncio.sleep(0.1)

    async def shows(self, text: str) -> str:
        return await self.wait(lambda s: text in s, repr(text))

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


def _program() -> str:
    found = shutil.which("korinet-chat") or str(Path(sys.executable).parent / "korinet-chat")
    if os.path.exists(found):
        return found
    return f"{sys.executable} -c 'from korinet_chat.cli import main; raise SystemExit(main())'"


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
    pane = Pane(f"{_program()} 127.0.0.1:{server.port} --nick alice --no-bell", env)
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
        await pane.wait(lambda s: pane.dead(), "the program exiting")
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
    pane = Pane(f"{_program()} 127.0.0.1:{relay.port} --nick alice --insecure-plaintext --no-bell", env)
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
