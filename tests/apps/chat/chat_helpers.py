"""Shared pieces of the chat tests: a hub on loopback, scripted clients behind relays."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from korinet_chat.client import ChatClient, Line
from korinet_chat.hub import ChatHub, HubSettings, chat_plugins
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Server, SessionConfig
from korinet.plugins import PluginManager

#: Every wait in the chat tests is bounded by this many seconds (scaled).
WAIT = 10.0 * TIMEOUT_FACTOR


def fresh_plugins() -> PluginManager:
    return chat_plugins(PluginManager.load(entry_points=False))


@dataclass
class Rig:
    """A hub and the clients a test made, each behind its own relay."""

    plugins: PluginManager
    hub: ChatHub
    server: Server
    db: str | Path = ":memory:"
    settings: HubSettings = field(default_factory=HubSettings)
    hub_config: SessionConfig | None = None
    relays: dict[str, Relay] = field(default_factory=dict)
    clients: dict[str, ChatClient] = field(default_factory=dict)

    async def client(self, nick: str, room: str | None = "general", **kwargs: object) -> ChatClient:
        relay = await Relay("127.0.0.1", self.server.port).start()
        client = ChatClient("127.0.0.1", relay.port, nick, room=room, plugins=self.plugins, **kwargs)  # type: ignore[arg-type]
        await client.start(open_timeout=WAIT)
        self.relays[client.nick] = relay
        self.clients[client.nick] = client
        return client

    async def restart_hub(self) -> None:
        """Stop the hub (every session is forgotten, as in a crash) and start a new one
        on the same database; the relays are pointed at it."""
        await self.server.close()
        self.hub.close()
        self.hub = ChatHub(self.db, settings=self.settings)
        self.server = self.hub.server("127.0.0.1", 0, plugins=self.plugins, config=self.hub_config)
        await self.server.start()
        for relay in self.relays.values():
            relay.target = ("127.0.0.1", self.server.port)
            relay.cut()

    async def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        for relay in self.relays.values():
            await relay.close()
        await self.server.close()
        self.hub.close()


@contextlib.asynccontextmanager
async def rig(
    db: str | Path = ":memory:",
    settings: HubSettings | None = None,
    hub_config: SessionConfig | None = None,
    session_ttl: float = 120.0,
) -> AsyncIterator[Rig]:
    plugins = fresh_plugins()
    settings = settings or HubSettings(rate=0)
    hub = ChatHub(db, settings=settings)
    server = hub.server("127.0.0.1", 0, plugins=plugins, config=hub_config, session_ttl=session_ttl)
    await server.start()
    r = Rig(plugins, hub, server, db, settings, hub_config)
    try:
        yield r
    finally:
        await r.close()


async def go_down(relay: Relay) -> int:
    """Make the hub unreachable through ``relay``: cut its links and stop listening, so
    that reconnection attempts are refused by the kernel.

    (``relay.refuse`` accepts and resets at once instead; a reset that lands before the
    client attaches the new connection is never noticed by the runtime's Client, which
    then waits forever: see the chat report. Refusing at the TCP level avoids that race.)
    """
    assert relay._server is not None
    port = relay.port
    relay._server.close()
    await relay._server.wait_closed()
    relay.cut()
    return port


async def come_back(relay: Relay, port: int) -> None:
    """Listen again on ``port``, the relay's own (undo :func:`go_down`)."""
    relay._server = await asyncio.start_server(relay._accept, "127.0.0.1", port)


def room_texts(client: ChatClient, room: str = "general") -> list[str]:
    """The live messages a client showed in ``room``, in order."""
    return [line.text for line in client.lines if line.kind == "msg" and line.room == room]


def lines_of(client: ChatClient, kind: str) -> list[Line]:
    return [line for line in client.lines if line.kind == kind]


def has_line(kind: str, text: str) -> Callable[[ChatClient], bool]:
    return lambda c: any(line.kind == kind and text in line.text for line in c.lines)


# ---------------------------------------------------------------------- a real terminal


_EXIT = re.compile(r"\[exit status (\d+)\]")


class Pane:
    """One tmux session on a private server socket."""

    def __init__(self, command: str, env: dict[str, str]) -> None:
        self.socket = f"korinet-chat-test-{uuid.uuid4().hex[:8]}"
        self.name = "chat"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # The shell says how the program ended: tmux may take its time to reap it.
        wrapped = shlex.quote(f'{command}; echo "[exit status $?]"')
        self._tmux(
            "new-session", "-d", "-s", self.name, "-x", "110", "-y", "30", f"env {exports} sh -c {wrapped}"
        )
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

    def scrollback(self) -> str:
        """Everything the terminal holds: the scrollback, then the screen."""
        return self._tmux("capture-pane", "-p", "-S", "-", "-t", self.name)

    def paste(self, text: str) -> None:
        """Paste as a terminal does (bracketed: the program sees one paste, not keys)."""
        subprocess.run(
            ["tmux", "-L", self.socket, "load-buffer", "-"], input=text, text=True, check=True, timeout=10
        )
        self._tmux("paste-buffer", "-p", "-t", self.name)

    async def exited(self) -> int:
        """Wait for the program to end; its exit status."""
        screen = await self.wait(lambda s: _EXIT.search(s) is not None, "the program exiting")
        found = _EXIT.search(screen)
        assert found is not None
        return int(found.group(1))

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


def program() -> str:
    """The korinet-chat command of this tree."""
    found = shutil.which("korinet-chat") or str(Path(sys.executable).parent / "korinet-chat")
    if os.path.exists(found):
        return found
    return f"{sys.executable} -c 'from korinet_chat.cli import main; raise SystemExit(main())'"
