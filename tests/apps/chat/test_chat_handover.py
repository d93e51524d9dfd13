"""Hub handover (docs/CHAT.md, "Which hub is the hub, and handover"): when the process
hosting the embedded hub quits, a member's korinet-chat takes the hub over, everyone
moves there, history and sequence numbers go on, and no typed line is lost.

Each "process" is a ChatClient with its own LocalHost (the embedded hub korinet-chat
would run), all on loopback in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from chat_helpers import WAIT, Pane, fresh_plugins, go_down, has_line, program
from korinet_chat.client import ChatClient
from korinet_chat.discovery import FoundHub, HubWatcher, announce, hub_rank
from korinet_chat.handover import LocalHost
from korinet_chat.hub import HubSettings
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet.plugins import PluginManager
from korinet.security import ClientTLS, KnownHosts

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)


@dataclass
class Lan:
    plugins: PluginManager = field(default_factory=fresh_plugins)
    hosts: dict[str, LocalHost] = field(default_factory=dict)
    clients: dict[str, ChatClient] = field(default_factory=dict)
    relays: dict[str, Relay] = field(default_factory=dict)
    address: tuple[str, int] = ("127.0.0.1", 0)

    def host_for(self, nick: str) -> LocalHost:
        host = LocalHost(":memory:", listen="127.0.0.1", plugins=self.plugins, settings=HubSettings(rate=0))
        self.hosts[nick] = host
        return host

    async def start_hub(self, nick: str) -> ChatClient:
        """``nick`` finds no hub: starts one in its process and joins it."""
        host = self.host_for(nick)
        address, port, _ = await host.start()
        self.address = (address, port)
        return await self._join(nick, host, hosting=True)

    async def join(self, nick: str, room: str = "general", *, relay: bool = False) -> ChatClient:
        """``nick`` joins the hub (through a relay of its own: to cut it off as a crash would)."""
        return await self._join(nick, self.host_for(nick), hosting=False, room=room, relay=relay)

    async def _join(
        self, nick: str, host: LocalHost, *, hosting: bool, room: str = "general", relay: bool = False
    ) -> ChatClient:
        address = self.address
        if relay:
            self.relays[nick] = await Relay(*self.address).start()
            address = ("127.0.0.1", self.relays[nick].port)
        client = ChatClient(*address, nick, room=room, plugins=self.plugins, taker=host, hosting=hosting)
        await client.start(open_timeout=WAIT)
        self.clients[nick] = client
        return client

    async def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        for host in self.hosts.values():
            with contextlib.suppress(Exception):
                await host.close(hand_over=False)
        for relay in self.relays.values():
            with contextlib.suppress(Exception):
                await relay.close()


@contextlib.asynccontextmanager
async def lan() -> AsyncIterator[Lan]:
    network = Lan()
    try:
        yield network
    finally:
        await network.close()


def shown(client: ChatClient, room: str = "general") -> list[tuple[int | None, str]]:
    return [(line.seq, line.text) for line in client.lines if line.kind == "msg" and line.room == room]


def assert_continuous(client: ChatClient, room: str, texts: list[str]) -> None:
    """``client`` showed each of ``texts`` in ``room`` exactly once, numbered 1..N with no
    gap, each sender's lines in the order typed (lines of two senders typed at the
    same time may interleave either way, as anywhere)."""
    got = shown(client, room)
    assert sorted(text for _, text in got) == sorted(texts), client.nick
    assert [seq for seq, _ in got] == list(range(1, len(texts) + 1)), client.nick
    for sender in {text.split()[0] for text in texts}:
        mine = [text for text in texts if text.split()[0] == sender]
        assert [text for _, text in got if text.split()[0] == sender] == mine, (client.nick, sender)


async def test_clean_quit_hands_the_hub_to_a_member_and_nothing_is_lost() -> None:
    async with lan() as net:
        ana = await net.start_hub("ana")
        ben = await net.join("ben")
        cat = await net.join("cat")
        await cat.join("#dev")
        await ben.join("#dev")
        general = [f"hello {i}" for i in range(3)]
        for text in general:
            ana.say(text, room="general")
        dev = ["dev 0"]
        cat.say("dev 0", room="dev")
        for client in (ana, ben, cat):
            await client.wait_for(lambda c: len(shown(c)) == 3 and not c.pending, WAIT)
        await ben.wait_for(lambda c: len(shown(c, "dev")) == 1, WAIT)
        old_hub = net.hosts["ana"].hub
        assert old_hub is not None
        # ben said hello first: he is the first able successor, and everyone knows it
        await cat.wait_for(lambda c: [s["nick"] for s in c.successors] == ["ben", "cat"], WAIT)
        assert cat.hub_host == "ana"

        # ana quits: her client leaves, then her process hands the hub over
        await ana.close()
        del net.clients["ana"]
        quitting = asyncio.create_task(net.hosts["ana"].close())
        # lines typed as the handover starts, while cat moves, and after
        for i in range(3):
            cat.say(f"cat early {i}", room="general")
        await cat.wait_for(lambda c: c._moving, WAIT)
        # what the old hub had not stored is not delivered (quitting now would say so)
        assert cat.undelivered == cat.queued
        for i in range(3):
            cat.say(f"cat moving {i}", room="general")
            ben.say(f"ben {i}", room="dev")
        assert await asyncio.wait_for(quitting, WAIT) == "ben"
        await cat.wait_for(lambda c: not c._moving and c.state == "connected", WAIT)
        cat.say("cat after", room="dev")

        general += [f"cat early {i}" for i in range(3)] + [f"cat moving {i}" for i in range(3)]
        dev += [f"ben {i}" for i in range(3)] + ["cat after"]
        for client in (ben, cat):
            await client.wait_for(
                lambda c: (
                    len(shown(c)) >= len(general) and len(shown(c, "dev")) >= len(dev) and not c.pending
                ),
                WAIT,
            )
            assert_continuous(client, "general", general)
            assert_continuous(client, "dev", dev)
            # a "— N new while away —" may truly count a line stored while this one moved;
            # a restart of the numbers would be a lie
            assert not has_line("info", "restarted")(client)
        assert shown(ben, "dev") == shown(cat, "dev") and shown(ben) == shown(cat)
        # the one line that says what happened
        assert has_line("info", "ana's hub closed; now hosted by ben")(cat)
        assert has_line("info", "ana's hub closed; now hosted by you (ben)")(ben)
        for client in (ben, cat):  # ana left; a move is nobody's leave
            left = [line.text for line in client.lines if line.kind == "event" and "left" in line.text]
            assert set(left) <= {"ana left #general", "ana left"}, left
        # ben's process hosts it now: the whole history, the numbers going on
        new_hub = net.hosts["ben"].hub
        assert new_hub is not None and new_hub is not old_hub
        assert new_hub.history.rooms() == {"general": len(general), "dev": len(dev)}
        assert [m["text"] for m in new_hub.history.last("general", 100)] == general
        assert (ben.host, ben.port) == (cat.host, cat.port) == ("127.0.0.1", net.hosts["ben"].port)
        assert ben.hosting and new_hub.handover.host_nick == "ben"
        # and ben's hub is handed on in turn: cat is now its only able member
        await cat.wait_for(
            lambda c: c.hub_host == "ben" and [s["nick"] for s in c.successors] == ["cat"], WAIT
        )


async def test_a_hub_nobody_can_take_just_closes() -> None:
    async with lan() as net:
        ana = await net.start_hub("ana")
        # bob's client cannot host (no taker): he is not offered the hub
        bob = ChatClient(*net.address, "bob", plugins=net.plugins)
        await bob.start(open_timeout=WAIT)
        net.clients["bob"] = bob
        await ana.wait_for(lambda c: "bob" in c.members.get("general", set()) or bool(c.lines), WAIT)
        await ana.close()
        del net.clients["ana"]
        assert await asyncio.wait_for(net.hosts["ana"].close(), WAIT) is None
        await bob.wait_for(has_line("error", "ana's hub closed and nobody here could host it"), WAIT)


async def test_when_the_host_crashes_the_first_successor_takes_over_and_nothing_typed_is_lost() -> None:
    async with lan() as net:
        ana = await net.start_hub("ana")
        ben = await net.join("ben", relay=True)
        cat = await net.join("cat", relay=True)
        before = ["ana 0", "ana 1", "cat 0"]
        ana.say("ana 0")
        ana.say("ana 1")
        await cat.wait_for(lambda c: len(shown(c)) == 2, WAIT)
        cat.say("cat 0")
        for client in (ben, cat):
            await client.wait_for(lambda c: len(shown(c)) == 3 and not c.pending, WAIT)
            await client.wait_for(lambda c: [s["nick"] for s in c.successors] == ["ben", "cat"], WAIT)
        # ana's process dies: her hub's port refuses from now on, no word to anyone
        for relay in net.relays.values():
            await go_down(relay)
        cat.say("cat 1")  # typed after the crash, before anyone noticed
        ben.say("ben 0")
        await cat.wait_for(has_line("info", "ana's hub stopped answering; now hosted by ben"), WAIT * 2)
        await ben.wait_for(has_line("info", "ana's hub stopped answering; now hosted by you (ben)"), WAIT)
        cat.say("cat 2")
        after = ["cat 1", "ben 0", "cat 2"]
        for client in (ben, cat):
            await client.wait_for(lambda c: len(shown(c)) >= 6 and not c.pending, WAIT)
            assert_continuous(client, "general", before + after)
            assert not has_line("info", "restarted")(client)
        assert shown(ben) == shown(cat)
        new_hub = net.hosts["ben"].hub
        assert new_hub is not None and new_hub.history.rooms() == {"general": 6}
        assert net.hosts["cat"].hub is None, "one successor, not two"
        # cat's own line of before the crash is in ben's copy: re-sent, it is not stored twice
        assert [m["text"] for m in new_hub.history.last("general", 10)].count("cat 0") == 1
        await ana.close()


async def test_a_dropped_link_to_a_live_hub_is_not_a_takeover() -> None:
    async with lan() as net:
        await net.start_hub("ana")
        ben = await net.join("ben", relay=True)
        await ben.wait_for(lambda c: c.hub_host == "ana" and bool(c.successors), WAIT)
        net.relays["ben"].cut()  # the link drops; the hub still answers
        await ben.wait_for(lambda c: c._watching, WAIT)
        await ben.wait_for(lambda c: not c._watching and c.state == "connected", WAIT)
        assert net.hosts["ben"].hub is None
        assert not has_line("info", "now hosted by")(ben)


def _program_pid(pane: Pane) -> int:
    """The korinet-chat process in ``pane`` (a child of the pane's shell)."""
    shell = pane._tmux("display-message", "-p", "-t", pane.name, "#{pane_pid}").strip()
    child = subprocess.run(["pgrep", "-P", shell], capture_output=True, text=True, timeout=10)
    return int(child.stdout.split()[0])


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian package tmux)")
@pytest.mark.parametrize("end", ["ctrl-c", "kill -9"])
async def test_the_real_program_hands_its_hub_over(tmp_path: Path, end: str) -> None:
    """ana's korinet-chat starts the hub (no hub found), ben's joins it; a scripted cat
    (who cannot host) is there too. ana presses Ctrl-C (or her process is killed): ben's
    process takes the hub over, cat moves to it (TLS: on a handover the new hub's key
    comes with the move; after a crash it is pinned on first use), and they talk on."""
    homes = {}
    for nick in ("ana", "ben"):
        homes[nick] = tmp_path / nick
        homes[nick].mkdir()
        (homes[nick] / "chat.toml").write_text("port = 0\n")  # any free port: tests share the host

    def run(nick: str, args: str) -> Pane:
        env = {"KORINET_HOME": str(homes[nick]), "TERM": "xterm-256color", "LANG": "C.UTF-8"}
        return Pane(f"{program()} {args} --nick {nick} --interface 127.0.0.1 --no-bell", env)

    ana = run("ana", "--discover-timeout 0")  # finds nobody at once: starts the hub
    ben: Pane | None = None
    cat: ChatClient | None = None
    try:
        screen = await ana.shows("started one here on port")
        found = re.search(r"started one here on port (\d+)", "".join(screen.split("\n")))
        assert found is not None
        port = int(found.group(1))
        await ana.shows("#general · ana · connected")
        ben = run("ben", f"127.0.0.1:{port}")
        await ben.shows("#general · ben · connected")
        cat = ChatClient("127.0.0.1", port, "cat", plugins=fresh_plugins(),
                         tls=ClientTLS(known_hosts=KnownHosts(tmp_path / "cat_known_hosts")))  # fmt: skip
        await cat.start(open_timeout=WAIT)
        ana.type("before the move")
        await cat.wait_for(lambda c: [t for _, t in shown(c)] == ["before the move"], WAIT)
        await cat.wait_for(lambda c: [s["nick"] for s in c.successors] == ["ben"], WAIT)

        if end == "ctrl-c":
            ana.send("C-c")  # Ctrl-C counts as /quit
            assert await ana.exited() == 0
            assert "the hub is now hosted by ben" in ana.scrollback()
            told = "ana's hub closed; now hosted by"
        else:
            os.kill(_program_pid(ana), signal.SIGKILL)
            assert await ana.exited() == 128 + signal.SIGKILL
            told = "ana's hub stopped answering; now hosted by"
        await ben.shows(f"{told} you (ben)")
        await cat.wait_for(has_line("info", f"{told} ben"), WAIT)
        await cat.wait_for(lambda c: c.state == "connected" and c.port != port, WAIT)
        cat.say("cat on ben's hub")
        await ben.shows("<cat> cat on ben's hub")
        ben.type("ben hosts now")
        await cat.wait_for(lambda c: [t for _, t in shown(c)][-1:] == ["ben hosts now"], WAIT)
        assert [seq for seq, _ in shown(cat)] == [1, 2, 3]  # the numbers went on
        assert "before the move" in ben.scrollback()
        # SIGTERM quits as cleanly: ben's hub has nobody able to take it (cat cannot host)
        os.kill(_program_pid(ben), signal.SIGTERM)
        assert await ben.exited() == 0
        await cat.wait_for(has_line("error", "ben's hub closed and nobody here could host it"), WAIT)
    finally:
        ana.kill()
        if ben is not None:
            ben.kill()
        if cat is not None:
            await cat.close()


def test_the_rule_for_which_hub_is_the_hub() -> None:
    def hub(started: float | None, fp: str, standalone: bool = False) -> FoundHub:
        return FoundHub(f"hub {fp}", "127.0.0.1", 1236, True, fp, started=started, standalone=standalone)

    older, newer, same_time = hub(100.0, "SHA256:b"), hub(101.5, "SHA256:a"), hub(100.0, "SHA256:a")
    serve, silent = hub(500.0, "SHA256:z", standalone=True), hub(None, "SHA256:0")
    assert sorted([newer, older, silent], key=hub_rank) == [older, newer, silent]
    assert sorted([older, same_time], key=hub_rank) == [same_time, older]  # a tie: the lower key
    assert sorted([older, serve], key=hub_rank)[0] == serve  # a standalone hub is always the hub


async def test_an_announced_hub_says_when_it_started() -> None:
    announcement = await announce(
        43213, name="ranked hub", addresses=["127.0.0.1"], fingerprint="SHA256:r",
        interfaces=["127.0.0.1"], started=1234.5,
    )  # fmt: skip
    heard: asyncio.Queue[str] = asyncio.Queue()
    watcher = HubWatcher(heard.put_nowait, interfaces=["127.0.0.1"])
    try:
        async with asyncio.timeout(WAIT):
            while not (name := await heard.get()).startswith("ranked hub"):
                pass
        found = await watcher.lookup(name, timeout=WAIT)
        assert found is not None
        assert (found.port, found.started, found.standalone) == (43213, 1234.5, False)
    finally:
        await watcher.close()
        await announcement.close()


async def test_two_hubs_started_at_once_merge_into_the_older_one() -> None:
    async with lan() as net:
        ana = await net.start_hub("ana")  # the older hub
        cat = await net.join("cat")
        ana_address = net.address
        ben = await net.start_hub("ben")  # started a moment later, on its own
        dan = await net.join("dan")
        ben.say("said on the newer hub")
        await dan.wait_for(lambda c: len(shown(c)) == 1, WAIT)
        ben_host = net.hosts["ben"]
        # ben's process learns of ana's hub, older by the rule: its members go there
        merging = asyncio.create_task(ben_host.merge_into(*ana_address, None))
        await dan.wait_for(lambda c: c._moving, WAIT)
        dan.say("typed while merging")
        await asyncio.wait_for(merging, WAIT)
        assert ben_host.hub is None, "ben's process hosts nothing any more"
        for client in (ben, dan):
            await client.wait_for(has_line("info", "two chat hubs were started at once"), WAIT)
            await client.wait_for(lambda c: c.state == "connected" and not c.pending, WAIT)
            assert (client.host, client.port) == ana_address
        assert not ben.hosting
        ana.say("one chat now")
        for client in (ana, ben, cat, dan):
            await client.wait_for(lambda c: [t for _, t in shown(c)][-1:] == ["one chat now"], WAIT)
        assert [t for _, t in shown(cat)] == ["typed while merging", "one chat now"]
        # ana's hub now counts ben among those who may host it next
        await cat.wait_for(lambda c: len(c.successors) == 3, WAIT)
        assert cat.successors[0]["nick"] == "cat"  # there first; ben and dan in the order they came
        assert {s["nick"] for s in cat.successors[1:]} == {"ben", "dan"}


async def test_a_successor_on_the_hosts_own_machine_is_named_by_the_lan_address() -> None:
    """Seen on loopback by the hub, it is at the host machine's LAN address to the others."""
    async with lan() as net:
        await net.start_hub("ana")
        ben = await net.join("ben")
        await ben.wait_for(lambda c: [s["address"] for s in c.successors] == ["127.0.0.1"], WAIT)
        hub = net.hosts["ana"].hub
        assert hub is not None
        hub.handover.public = "192.0.2.7"
        assert [s["address"] for s in hub.handover.successors()] == ["192.0.2.7"]


async def test_a_successor_that_changes_nick_is_listed_under_the_new_one() -> None:
    async with lan() as net:
        ana = await net.start_hub("ana")
        ben = await net.join("ben")
        await ana.wait_for(lambda c: [s["nick"] for s in c.successors] == ["ben"], WAIT)
        await ben.set_nick("benjamin")
        await ana.wait_for(lambda c: [s["nick"] for s in c.successors] == ["benjamin"], WAIT)


async def test_korinet_chat_merges_its_hub_into_an_older_one_it_hears_of() -> None:
    """The mDNS side of the merge (cli._watch_rivals): ben's embedded hub hears of ana's,
    which started first by its announcement, and sends its members there."""
    from korinet_chat.cli import _watch_rivals

    def announcer(started: float) -> Any:
        async def announce_here(server: Any, _: float) -> Any:
            return await announce(server.port, addresses=["127.0.0.1"], interfaces=["127.0.0.1"],
                                  tls=False, started=started, name=f"handover test {started}")  # fmt: skip

        return announce_here

    async with lan() as net:
        ben = await net.start_hub("ben")
        ben_host = net.hosts["ben"]
        # (very old start times: a hub of another test on this host never ranks first)
        ben_host.announce = announcer(2.0)
        ben_host.started = 2.0
        ben_host.announcement = await ben_host.announce(ben_host.server, 2.0)
        watcher = _watch_rivals(ben, ben_host, True, "127.0.0.1")
        assert watcher is not None
        try:
            ana_host = net.host_for("ana")
            ana_host.announce = announcer(1.0)
            _, ana_port, _ = await ana_host.start(started=1.0)
            await ben.wait_for(has_line("info", "two chat hubs were started at once"), WAIT)
            await ben.wait_for(lambda c: c.state == "connected" and c.port == ana_port, WAIT)
            assert ben_host.hub is None and ben_host.announcement is None
        finally:
            await watcher.close()
