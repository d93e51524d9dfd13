"""Hub handover: when the process hosting an embedded hub quits, another member's
korinet-chat takes the hub over instead of everyone being stranded (docs/CHAT.md,
"Which hub is the hub, and handover").

* Clients that can host say so in their hello (with the port they would listen on).
  The hub keeps them in the order they said hello, and tells every member that
  ordered list of successors whenever it changes (a member needs it if the hub dies
  without a word).
* A clean quit (:meth:`HubHandover.hand_over`): the hub stops taking requests (a line
  sent now is re-sent to the successor under the same mid), sends the first able
  successor every room with its whole history and head, waits until that member has
  started a hub from it (its "took" request, with the port), then tells every other
  member "moved" (address, port, key) and closes.
* The successor's hub continues the sequence numbers; the others rejoin "since" what
  they showed and re-send what is pending, so nobody sees a gap or a duplicate.

:class:`LocalHost` is the hub of this process (the embedded hub of ``korinet-chat``,
started at first or taken over), what a client uses to take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from korinet import KoriNetError

from . import protocol
from .store import History, StoredMessage

if TYPE_CHECKING:
    from korinet import Server
    from korinet.plugins import PluginManager
    from korinet.security import ServerTLS

    from .discovery import Announcement
    from .hub import ChatHub, HubSettings, Member

__all__ = ["CHUNK", "HubHandover", "LocalHost", "RoomState", "Taker", "export_rooms", "import_rooms"]

logger = logging.getLogger(__name__)

#: Messages per "state" message of a handover (a frame stays well under a megabyte).
CHUNK = 250

#: Seconds a successor has to take the hub over before the next one is asked.
TAKE_TIMEOUT = 10.0


@dataclass
class RoomState:
    """One room as handed over: its head and its messages, oldest first."""

    room: str
    head: int
    messages: list[StoredMessage] = field(default_factory=list)


def export_rooms(history: History) -> Iterator[dict[str, Any]]:
    """Every room of ``history`` as ``chat.hub`` "state" payloads of at most CHUNK
    messages (a room with no message still gets one, for its head)."""
    for room, head in sorted(history.rooms().items()):
        after = 0
        while True:
            rows = history.since(room, after, CHUNK)
            yield {"kind": "state", "room": room, "head": head, "messages": [_wire(r) for r in rows]}
            if len(rows) < CHUNK:
                break
            after = rows[-1]["seq"]


def collect(rooms: dict[str, RoomState], data: dict[str, Any]) -> None:
    """Add one "state" payload (already validated) to ``rooms``."""
    state = rooms.setdefault(data["room"], RoomState(data["room"], data["head"]))
    state.head = max(state.head, data["head"])
    state.messages.extend(stored(state.room, m) for m in data["messages"])


def stored(room: str, m: dict[str, Any]) -> StoredMessage:
    """A validated ``chat.msg`` payload as the store keeps it."""
    return {"room": room, "seq": m["seq"], "ts": m["ts"], "nick": m["nick"], "kind": m.get("kind", "say"),
            "text": m["text"], "mid": m.get("mid")}  # fmt: skip


def import_rooms(history: History, rooms: list[RoomState], now: float | None = None) -> None:
    """Make ``history`` hold the handed-over rooms (their numbers go on from ``head``)."""
    for state in rooms:
        head = max([state.head, *(m["seq"] for m in state.messages)])
        history.import_room(protocol.normalize_room(state.room), head, state.messages, now or time.time())


def _wire(row: StoredMessage) -> dict[str, Any]:
    payload: dict[str, Any] = {k: row[k] for k in ("room", "seq", "ts", "nick", "text", "kind")}
    if row["mid"] is not None:
        payload["mid"] = row["mid"]
    return payload


def _address(member: Member, public: str | None) -> str | None:
    """The member's address as this hub sees it (where its own hub will be reachable).
    A member on this hub's own machine is seen on loopback: to the others it is at this
    machine's ``public`` address (None: the hub itself listens on loopback only)."""
    conn = member.peer.conn
    if conn is None:
        return None
    host, _, _ = conn.peername.rpartition(":")
    host = host.strip("[]")
    if public and (host.startswith("127.") or host == "::1"):
        return public
    return host or None


class HubHandover:
    """The hub's side of a handover (one per :class:`~korinet_chat.hub.ChatHub`)."""

    def __init__(self, hub: ChatHub) -> None:
        self.hub = hub
        #: members able to host, in the order they said hello -> the port they would use
        self.able: dict[Member, int] = {}
        #: the member whose process hosts this hub (its client says so in its hello)
        self.host: Member | None = None
        self.host_nick: str | None = None
        #: True once a handover began: requests wait for the successor (re-sent there)
        self.frozen = False
        #: this machine's address on the LAN, for members seen on loopback (LocalHost sets it)
        self.public: str | None = None
        #: when the chat's hub started (kept through handovers: "which hub is the hub")
        self.started = time.time()
        self._took: dict[Member, asyncio.Future[tuple[int, str | None]]] = {}

    # -- hooks called by the hub

    def hello(self, member: Member, data: dict[str, Any]) -> None:
        if data.get("hosting"):
            self.host, self.host_nick = member, member.nick
        elif data.get("can_host") is not None:
            self.able[member] = int(data["can_host"])
        else:  # nothing changed for the others: only the newcomer needs the list
            self.tell_successors([member])
            return
        self.tell_successors()

    def renamed(self, member: Member) -> None:
        if member in self.able:  # the list names successors by nick: a member finds itself in it
            self.tell_successors()

    def removed(self, member: Member) -> None:
        if self.able.pop(member, None) is not None and not self.hub.closing:
            self.tell_successors()
        if self.host is member:
            self.host = None

    def holds(self, member: Member, data: dict[str, Any]) -> bool:
        """True: the request is left unanswered (a handover is under way; the client
        re-sends what matters to the successor)."""
        return self.frozen and data.get("op") != "took"

    def took(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        future = self._took.get(member)
        if future is not None and not future.done():
            future.set_result((int(data["port"]), data.get("fp")))
        return {}

    # -- the successors list

    def successors(self) -> list[dict[str, Any]]:
        found = []
        for member, port in self.able.items():
            address = _address(member, self.public)
            if member.nick and member.linked and address:
                found.append({"nick": member.nick, "address": address, "port": port})
        return found

    def tell_successors(self, members: list[Member] | None = None) -> None:
        """Tell ``members`` (default: everyone) who may host next, in order."""
        payload: dict[str, Any] = {"kind": "successors", "list": self.successors(), "started": self.started}
        if self.host_nick:
            payload["host"] = self.host_nick
        if members is None:
            members = [m for m in self.hub.members.values() if m.nick]
        self.hub._post_all(members, protocol.HUB, payload)

    # -- the handover

    async def hand_over(self, timeout: float = TAKE_TIMEOUT) -> str | None:
        """Hand the hub to the first member able to take it; the successor's nick, or
        None when nobody could (the hub then just closes)."""
        self.frozen = True
        host = self.host_nick or "the host"
        for member in list(self.able):
            if member.peer.is_closed or not member.linked or member.nick is None:
                continue
            future: asyncio.Future[tuple[int, str | None]] = asyncio.get_running_loop().create_future()
            self._took[member] = future
            try:
                async with asyncio.timeout(timeout):
                    for chunk in export_rooms(self.hub.history):
                        await member.peer.send(chunk, protocol.HUB)
                    take = {"kind": "take", "host": host, "started": self.started}
                    await member.peer.send(take, protocol.HUB)
                    port, fp = await future
            except (KoriNetError, TimeoutError) as exc:
                logger.info("%s could not take the hub over (%s): trying the next", member.nick, exc)
                continue
            address = _address(member, self.public)
            if address is None:
                continue
            moved: dict[str, Any] = {"kind": "moved", "host": host, "nick": member.nick,
                                     "address": address, "port": port}  # fmt: skip
            if fp:
                moved["fp"] = fp
            others = [
                m for m in self.hub.members.values() if m is not member and m is not self.host and m.nick
            ]
            self.hub._post_all(others, protocol.HUB, moved)
            await self._delivered(others, timeout / 2)
            return member.nick
        others = [m for m in self.hub.members.values() if m is not self.host and m.nick]
        self.hub._post_all(others, protocol.HUB, {"kind": "closed", "host": host})
        await self._delivered(others, timeout / 2)
        return None

    async def merge_into(self, host: str, port: int, fingerprint: str | None) -> None:
        """Send every member to the hub at ``host:port``, the chat's hub by the rule; they
        join it afresh (its numbers are not ours) and re-send what is pending."""
        self.frozen = True
        moved: dict[str, Any] = {"kind": "moved", "merge": True, "nick": "", "address": host, "port": port}
        if fingerprint:
            moved["fp"] = fingerprint
        members = [m for m in self.hub.members.values() if m.nick]
        self.hub._post_all(members, protocol.HUB, moved)
        await self._delivered(members, TAKE_TIMEOUT / 2)

    @staticmethod
    async def _delivered(members: list[Member], timeout: float) -> None:
        """Wait (at most ``timeout``) until ``members`` have what was posted to them."""
        with contextlib.suppress(KoriNetError, TimeoutError):
            async with asyncio.timeout(timeout):
                for member in members:
                    if member.last_post and member.linked:
                        await member.peer.wait_acked(member.last_post)


class Taker(Protocol):
    """What a client needs to take a hub over (a :class:`LocalHost`)."""

    #: the port a hub started here would listen on (said in the hello)
    port: int

    async def start(
        self, rooms: list[RoomState] | None = None, started: float | None = None
    ) -> tuple[str, int, str | None]:
        """Start a hub holding ``rooms`` (the chat's hub since ``started``); its address
        for this process, its port and key."""
        ...


def free_port(host: str, wanted: int) -> int:
    """``wanted`` if it can be listened on at ``host`` now, else any free port."""
    for port in (wanted, 0) if wanted else (0,):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    return 0


class LocalHost:
    """The hub of this process: started when no hub answers on the LAN, or taken over
    from a member that quit; handed over when this process quits (:meth:`close`).

    Args:
        listen: address to listen on ("0.0.0.0", or one interface).
        local: the address this process's own client uses to reach it.
        announce: publishes the hub on the LAN (None: not announced, as in tests).
    """

    def __init__(
        self,
        db: str | Path,
        *,
        listen: str = "0.0.0.0",
        local: str = "127.0.0.1",
        port: int = 0,
        tls: Callable[[], ServerTLS | None] | None = None,
        settings: HubSettings | None = None,
        plugins: PluginManager | None = None,
        session_ttl: float = 120.0,
        announce: Callable[[Server, float], Awaitable[Announcement | None]] | None = None,
    ) -> None:
        self.db, self.listen, self.local = db, listen, local
        self.tls, self.settings, self.plugins = tls, settings, plugins
        self.session_ttl = session_ttl
        self.announce = announce
        self.port = free_port(listen, port)
        self.hub: ChatHub | None = None
        self.server: Server | None = None
        self.announcement: Announcement | None = None
        self.started = 0.0
        #: called once a hub is up and announced (korinet-chat watches it for rivals)
        self.on_started: Callable[[], None] | None = None

    async def start(
        self, rooms: list[RoomState] | None = None, started: float | None = None
    ) -> tuple[str, int, str | None]:
        from .hub import ChatHub

        tls = self.tls() if self.tls is not None else None
        hub = ChatHub(self.db, settings=self.settings)
        try:
            if rooms:
                import_rooms(hub.history, rooms)
            server = None
            for port in (self.port, 0):
                server = hub.server(self.listen, port, tls=tls, plugins=self.plugins,
                                    session_ttl=self.session_ttl)  # fmt: skip
                try:
                    await server.start()
                    break
                except OSError:
                    if port == 0:
                        raise
        except BaseException:
            hub.close()
            raise
        assert server is not None
        self.hub, self.server, self.port = hub, server, server.port
        # a hub taken over goes on being the chat's hub: it keeps its start time (the rule)
        self.started = hub.handover.started = started or time.time()
        if not self.listen.startswith("127."):
            from .discovery import lan_address

            hub.handover.public = lan_address() if self.listen in ("0.0.0.0", "") else self.listen
        if self.announce is not None:
            self.announcement = await self.announce(server, self.started)
        if self.on_started is not None:
            self.on_started()
        return self.local, server.port, server.fingerprint

    async def merge_into(self, host: str, port: int, fingerprint: str | None) -> None:
        """Another hub is the chat's hub (two were started at once, and the rule picks
        that one): send every member there, this process's own client included, and
        stop hosting."""
        if self.hub is None:
            return
        if self.announcement is not None:
            with contextlib.suppress(Exception):
                await self.announcement.close()
            self.announcement = None
        await self.hub.handover.merge_into(host, port, fingerprint)
        await self.close(hand_over=False)

    async def close(self, hand_over: bool = True) -> str | None:
        """Withdraw the announcement, hand the hub over (when someone can take it) and
        stop; the successor's nick, or None."""
        successor = None
        if self.announcement is not None:
            with contextlib.suppress(Exception):
                await self.announcement.close()
            self.announcement = None
        if self.hub is not None and hand_over:
            try:
                successor = await self.hub.handover.hand_over()
            except Exception:  # a failed handover must still let the process quit
                logger.exception("the handover failed")
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.close()
        if self.hub is not None:
            self.hub.close()
        self.hub = self.server = None
        return successor
