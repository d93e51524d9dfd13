"""The chat hub: nicks, rooms, presence, fan-out, history and flood control.

Theory of operation (docs/CHAT.md):

* A **member** is a KoriNet session, not a socket. When its link drops, the
  runtime keeps the session (``session_ttl``) and the hub tells the others "bob is
  reconnecting"; the nick stays bob's. Only when the session ends does the hub say
  "bob left" and free the nick.
* Every room message gets the room's next sequence number and is stored (SQLite)
  before it is fanned out. Fan-out never waits: each member's session gets a
  non-blocking ``post()``. A member whose bounded send buffer is full (slow, or
  detached for long) is marked *lagging*: it gets nothing more live, and a drain
  task feeds it from history, in order, as its acknowledgements free space, until
  it is level with the room again.
* Requests from one member are taken one at a time, at most ``rate`` per second
  after a ``burst``: a flooder is slowed down, by backpressure on its own session,
  and nobody else waits for it. The burst is sized for a paste (hundreds of lines
  at once, then quiet), the rate for typing: what tells a flood from a paste is
  that it goes on. A lagging member's requests wait until it drains.
* An embedded hub can be handed over to a member when its process quits
  (handover.py: the hub's side is :class:`~korinet_chat.handover.HubHandover`).
* With a **cluster bus** (``bus=``, cluster.py), the numbering moves to the bus: a
  message is appended to the room's log and the hub answers once its own follower
  of that log has stored and fanned it out; every hub follows the rooms its
  members are in and fans out what any hub appended, in the log's order. Nicks are
  claimed on the bus too (held with the hash of the client's nick key, so that the
  client's next session, on any hub, keeps the nick: docs/CHAT.md, "Failover"); DMs
  go to the recipient's log and are delivered by number; who is where is kept on the
  bus for /who and /rooms. Without a bus, nothing of this runs.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from korinet import ConnectionClosedOK, KoriNetError, SendBufferFull, Server, SessionConfig, post_many
from korinet.cluster import BusError, ClusterBus, LogEntry
from korinet.plugins import PluginManager, default_manager

from . import plugin, protocol, watch
from .cluster import NICK_TTL, RoomCluster, decode_message, nick_name, owner_of
from .handover import HubHandover
from .limits import TokenBucket
from .store import History, StoredMessage

if TYPE_CHECKING:
    from korinet.runtime.peer import Peer
    from korinet.security import ServerTLS

__all__ = ["DEFAULT_PORT", "ChatHub", "HubSettings", "chat_plugins"]

logger = logging.getLogger(__name__)

#: The chat's port (KoriNet's own default is 1235).
DEFAULT_PORT = 1236

#: Hub sessions: a modest window bounds the memory a detached member can pin
#: (messages beyond it come from history when the member is back).
HUB_CONFIG = SessionConfig(window=1024, heartbeat_interval=2.0)


#: Lines one member may send at once (a paste) before the hub's rate applies.
PASTE_BURST = 500.0

#: Most answers and events kept for one lagging member (room messages come from history).
OUTBOX_LIMIT = 1000


def chat_plugins(plugins: PluginManager | None = None) -> PluginManager:
    """``plugins`` (default: the installed ones) with the chat plugin registered."""
    plugins = plugins or default_manager()
    if not plugins.pm.is_registered(plugin):
        plugins.register(plugin, name="chat")
    return plugins


@dataclass
class HubSettings:
    """Tunables of a hub.

    Attributes:
        rate, burst: requests per second per member after a burst (0: no limit). The
            burst lets a paste of PASTE_BURST lines through at once; the rate is more
            than anyone types, so only a sustained flood waits.
        history_on_join: messages shown to someone joining a room afresh.
        max_catchup: most missed messages sent on a rejoin ("since N"); older ones
            are counted, not sent.
        max_rooms: rooms the hub keeps; joining a new one beyond is refused.
        batch: messages a drain posts before waiting for acknowledgements.
    """

    rate: float = 5.0
    burst: float = PASTE_BURST
    history_on_join: int = 20
    max_catchup: int = protocol.MAX_HISTORY
    max_rooms: int = 1000
    batch: int = 256


@dataclass(eq=False)
class Member:
    """One session on the hub (registered once it said hello)."""

    peer: Peer
    bucket: TokenBucket
    nick: str | None = None
    linked: bool = True
    away: str | None = None
    #: room -> the last sequence number this member was sent
    rooms: dict[str, int] = field(default_factory=dict)
    lagging: bool = False
    last_post: int = 0
    outbox: deque[tuple[str, dict[str, Any]]] = field(default_factory=deque)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    throttled: bool = False
    #: what its nick is held with on the cluster bus (owner_of its nick key)
    owner: bytes = b""
    #: its client has a nick key: another session of it may take the nick over
    keyed: bool = False
    #: the follower of its DM log (cluster bus)
    dms: asyncio.Task[None] | None = None
    #: it came from another session of the same client (a hub that died, or left):
    #: its rejoins say "bob is back" to the rooms
    moved_in: bool = False

    @property
    def state(self) -> str:
        if not self.linked:
            return "reconnecting"
        return "away" if self.away else "online"


class RequestError(Exception):
    """A request the hub refuses; the text is for the user."""

    def __init__(self, text: str, code: str = "refused") -> None:
        super().__init__(text)
        self.code = code


#: Requests that talk to the cluster bus (when there is one): the member's next
#: request waits until the bus answered this one, which keeps its lines in the
#: order typed.
CLUSTER_OPS = frozenset({"hello", "nick", "join", "say", "dm", "who", "rooms"})


class ChatHub:
    """The chat's server-side application. Run it with :meth:`server` (a KoriNet
    ``Server`` whose session handler is :meth:`session`), or hand :meth:`session`
    to a ``Hub`` you build yourself. With ``bus``, call :meth:`start` first (it
    connects to the bus)."""

    def __init__(
        self,
        db: str | Path = ":memory:",
        *,
        settings: HubSettings | None = None,
        clock: Any = time.time,
        bus: ClusterBus | None = None,
        hub_id: str | None = None,
        nick_ttl: float | None = None,
    ) -> None:
        self.settings = settings or HubSettings()
        self.cluster = None if bus is None else RoomCluster(bus, hub_id, nick_ttl=nick_ttl or NICK_TTL)
        self.history = History(db)
        self.clock = clock
        self.members: dict[Peer, Member] = {}
        self.nicks: dict[str, Member] = {}
        #: room -> members in it (rooms nobody is in still exist in history)
        self.rooms: dict[str, set[Member]] = {}
        self._dm_mids: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False
        self.handover = HubHandover(self)
        watch.add(self)

    def server(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        tls: ServerTLS | None = None,
        plugins: PluginManager | None = None,
        config: SessionConfig | None = None,
        session_ttl: float = 120.0,
        **kwargs: Any,
    ) -> Server:
        """A KoriNet Server running this hub (start it with ``await server.start()``)."""
        return Server(
            host,
            port,
            tls=tls,
            plugins=chat_plugins(plugins),
            config=config or HUB_CONFIG,
            handler=self.session,
            accept_plain=False,
            legacy=False,
            session_ttl=session_ttl,
            **kwargs,
        )

    async def start(self) -> None:
        """Connect to the cluster bus, if the hub has one (nothing to do otherwise).

        Raises:
            BusError: the bus is unreachable.
        """
        if self.cluster is not None:
            await self.cluster.start(self._remote_presence)

    def close(self) -> None:
        """Stop taking part (the Server closes the sessions) and close the database.
        A cluster link stops without a word: nicks held on the bus expire after their
        TTL (:meth:`aclose` frees them at once)."""
        self.closing = True
        watch.remove(self)
        for task in self._tasks:
            task.cancel()
        if self.cluster is not None:
            self.cluster.stop()
        self.history.close()

    def stopping(self) -> None:
        """The hub is about to stop (call before closing its Server): its members'
        sessions end without a word to anyone (they go on through other hubs of the
        cluster, or vanish from /who at the TTL), and the nicks of korinet-chat clients
        stay held for them to take over elsewhere."""
        self.closing = True

    async def aclose(self) -> None:
        """:meth:`close`, after giving the nicks held on the cluster bus up (except
        those kept for members that may go on elsewhere: :meth:`stopping`)."""
        if self.cluster is not None:
            await self.cluster.close()
        self.close()

    # ------------------------------------------------------------------ sessions

    async def session(self, peer: Peer) -> None:
        """The KoriNet session handler: take this session's requests until it ends."""
        loop = asyncio.get_running_loop()
        member = Member(peer, TokenBucket(self.settings.rate, self.settings.burst, loop.time()))
        self.members[peer] = member
        try:
            while not peer.is_closed:
                if member.lagging:
                    await _first(member.drained.wait(), peer.closed)
                    continue
                await self._pace(member)
                msg = await peer.recv_message()
                member.bucket.take(loop.time())
                if msg.type == protocol.REQUEST:
                    if self.cluster is not None and msg.data["op"] in CLUSTER_OPS:
                        await self._cluster_request(member, msg.data)
                    else:
                        self._request(member, msg.data)
                # other chat types travel hub -> client: a client sending one is ignored
        except KoriNetError:
            pass  # the session ended: already logged by the runtime
        finally:
            self._remove(member)

    async def _pace(self, member: Member) -> None:
        """Wait for the member's next token before taking its next request."""
        loop = asyncio.get_running_loop()
        bucket = member.bucket
        if bucket.rate <= 0:
            return
        wait = bucket.delay(loop.time())
        if wait <= 0:
            member.throttled = False
            return
        session = member.peer.session
        if not member.throttled and session.received > session.delivered:
            member.throttled = True
            self._post(member, protocol.EVENT, {
                "kind": "notice",
                "text": f"slow down: {self.settings.rate:g} messages per second at most here "
                "(what you sent is queued, not lost)",
            })  # fmt: skip
        await asyncio.sleep(wait)  # the flood control itself: this member's requests wait

    def session_event(self, event: str, session: Any) -> None:
        """From the plugin's hooks (watch.py): links of our members drop and return."""
        member = self.members.get(session)
        if member is None or self.closing:
            return
        if event == "lost":
            member.linked = False
            if not self.handover.frozen:  # handing over: everyone is about to move
                self._presence(member, "reconnecting")
        elif event in ("resumed", "opened"):
            if not member.linked:
                member.linked = True
                self._presence(member, member.state)
        elif event == "closed":
            self._remove(member)

    def _remove(self, member: Member) -> None:
        if self.members.pop(member.peer, None) is None:
            return
        member.drained.set()
        end = _how_it_ended(member)
        if member.nick is not None and not self.closing and not self.handover.frozen:
            if self.cluster is None or end == "bye":
                self._presence(member, "left")  # (handing over: everyone moves, nobody left)
            elif end == "gone":
                # it vanished: perhaps to another hub of the cluster (not news, then)
                self._spawn(self._left_unless_moved(member, member.nick, list(member.rooms)))
            # "moved": its client said it is going to another hub: it will be back there
        for room in member.rooms:
            self.rooms.get(room, set()).discard(member)
        self.handover.removed(member)
        if member.dms is not None:
            member.dms.cancel()
        if member.nick is not None and self.nicks.get(protocol.nick_key(member.nick)) is member:
            del self.nicks[protocol.nick_key(member.nick)]
            if self.cluster is not None and self.closing and member.keyed:
                # the hub stops: its client may go on through another hub (the nick
                # is then its own there); not released, it expires unless renewed
                self.cluster.forget(member.nick, member.owner)
            elif self.cluster is not None and not self.closing:  # (a hub stopping frees all at once)
                self.cluster.show(member.nick, None)
                if end == "bye":
                    self.cluster.release(member.nick, member.owner)
                else:
                    # It vanished (its session expired): it may be on another hub of the
                    # cluster now, holding the nick with the same key. Not released:
                    # no longer renewed here, so it expires unless that hub renews it.
                    self.cluster.forget(member.nick, member.owner)

    # ------------------------------------------------------------------ sending

    def _post(self, member: Member, type_: str, data: dict[str, Any]) -> None:
        """Queue a message for a member without ever waiting (see the module docstring)."""
        if member.lagging:
            self._queue(member, type_, data)
            return
        try:
            member.last_post = member.peer.post(data, type_)
        except SendBufferFull:
            self._queue(member, type_, data)
            self._start_lagging(member)
        except KoriNetError:
            pass  # the session ended; _remove follows from its handler

    def _post_all(self, members: Iterable[Member], type_: str, data: dict[str, Any]) -> None:
        """:meth:`_post` to many members, the payload encoded once (korinet.post_many)."""
        live: list[Member] = []
        for member in members:
            if member.lagging:
                self._queue(member, type_, data)
            else:
                live.append(member)
        result = post_many([m.peer for m in live], data, type_)
        for member in live:
            seq = result.queued.get(member.peer)
            if seq is not None:
                member.last_post = seq
            elif isinstance(result.failed.get(member.peer), SendBufferFull):
                self._queue(member, type_, data)
                self._start_lagging(member)
            # any other failure: the session ended; _remove follows from its handler

    def _queue(self, member: Member, type_: str, data: dict[str, Any]) -> None:
        """Keep a message for a lagging member, within OUTBOX_LIMIT: beyond it the oldest
        presence event goes (a stale "bob is back" is worth less than an answer)."""
        outbox = member.outbox
        outbox.append((type_, data))
        if len(outbox) > OUTBOX_LIMIT:
            for index, (kind, _) in enumerate(outbox):
                if kind == protocol.EVENT:
                    del outbox[index]
                    break
            else:
                outbox.popleft()

    def _fan_out(self, room: str, stored: StoredMessage) -> None:
        seq = stored["seq"]
        # a lagging member's drain reads this one from history
        live = [member for member in self.rooms.get(room, ()) if not member.lagging]
        result = post_many([m.peer for m in live], _msg_payload(stored), protocol.MSG)
        for member in live:
            posted = result.queued.get(member.peer)
            if posted is not None:
                member.last_post = posted
                member.rooms[room] = seq
            elif isinstance(result.failed.get(member.peer), SendBufferFull):
                self._start_lagging(member)
            # any other failure: the session ended; _remove follows from its handler

    def _start_lagging(self, member: Member) -> None:
        logger.info("%s lags behind: catching it up from history", member.nick)
        member.lagging = True
        member.drained.clear()
        task = asyncio.get_running_loop().create_task(self._drain(member))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, member: Member) -> None:
        peer = member.peer
        batch = max(1, min(self.settings.batch, self.config_window(peer) // 2))
        try:
            while member.lagging and not peer.is_closed:
                if member.last_post:
                    await peer.wait_acked(member.last_post)  # the buffer is empty now
                budget = batch
                while member.outbox and budget > 0:
                    type_, data = member.outbox[0]
                    member.last_post = peer.post(data, type_)
                    member.outbox.popleft()
                    budget -= 1
                for room, through in list(member.rooms.items()):
                    if budget <= 0:
                        break
                    for row in self.history.since(room, through, budget):
                        member.last_post = peer.post(_msg_payload(row), protocol.MSG)
                        member.rooms[room] = row["seq"]
                        budget -= 1
                if budget > 0 and not member.outbox and self._level(member):
                    member.lagging = False
                    member.drained.set()
                    logger.info("%s caught up", member.nick)
        except SendBufferFull:
            member.lagging = False  # cannot happen with an empty buffer; retry via a new drain
            self._start_lagging(member)
        except KoriNetError:
            member.drained.set()  # the session ended

    @staticmethod
    def config_window(peer: Peer) -> int:
        return int(peer.session.config.window)

    def _level(self, member: Member) -> bool:
        return all(through >= (self.history.head(room) or 0) for room, through in member.rooms.items())

    def _companions(self, member: Member) -> set[Member]:
        """Members sharing a room with ``member`` (not itself)."""
        found: set[Member] = set()
        for room in member.rooms:
            found |= self.rooms.get(room, set())
        found.discard(member)
        return found

    def _presence(self, member: Member, kind: str, **extra: Any) -> None:
        event = {"kind": kind, "nick": member.nick, **extra}
        if kind == "away" and member.away:
            event["text"] = member.away
        self._post_all(self._companions(member), protocol.EVENT, event)
        if self.cluster is not None:
            self.cluster.announce(event, list(member.rooms))
            if kind != "left":
                self._publish(member)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _left_unless_moved(self, member: Member, nick: str, rooms: list[str]) -> None:
        """Say "bob left" for a member whose session expired here, unless another hub
        of the cluster says it has bob now (the client failed over)."""
        assert self.cluster is not None
        try:
            elsewhere = any(
                e["hub"] != self.cluster.hub_id and protocol.nick_key(e["nick"]) == protocol.nick_key(nick)
                for e in await self.cluster.everyone()
            )
        except BusError:
            elsewhere = False
        if elsewhere or self.closing:
            return
        event = {"kind": "left", "nick": nick}
        targets: set[Member] = set()
        for room in rooms:
            targets |= self.rooms.get(room, set())
        self._post_all(targets - {member}, protocol.EVENT, event)
        self.cluster.announce(event, rooms)

    def _publish(self, member: Member) -> None:
        """Tell the cluster who this member is now, where (for /who on other hubs)."""
        if self.cluster is not None and member.nick is not None and self.members.get(member.peer) is member:
            self.cluster.show(member.nick, {"nick": member.nick, "state": member.state, "away": member.away,
                                            "rooms": sorted(member.rooms)})  # fmt: skip

    def _remote_presence(self, signal: dict[str, Any]) -> None:
        """A presence event from another hub: to our members in its rooms."""
        if self.closing:
            return
        targets: set[Member] = set()
        for room in signal["rooms"]:
            targets |= self.rooms.get(room, set())
        self._post_all(targets, protocol.EVENT, signal["event"])

    def _room_event(self, member: Member, room: str, kind: str) -> None:
        """joined/left ``room``: to the others in it, here and on the other hubs."""
        event = {"kind": kind, "room": room, "nick": member.nick}
        self._post_all(self.rooms.get(room, set()) - {member}, protocol.EVENT, event)
        if self.cluster is not None:
            self.cluster.announce(event, [room])
            self._publish(member)

    # ------------------------------------------------------------------ the cluster bus

    def _apply(self, room: str, entry: LogEntry) -> None:
        """An entry of a room's log (from any hub), in order: store it, fan it out."""
        message = decode_message(entry.data)
        stored = self.history.put(
            room, entry.seq, message["nick"], message["text"], message["kind"], message["mid"], message["ts"]
        )
        if stored is not None and not self.closing:
            self._fan_out(room, stored)

    async def _cluster_request(self, member: Member, data: dict[str, Any]) -> None:
        """:meth:`_request` for the operations that wait for the bus."""
        assert self.cluster is not None
        rid = data["rid"]
        op = data["op"]
        try:
            if member.nick is None and op != "hello":
                raise RequestError("say hello first (the hub does not know this session)", "unregistered")
            await self.cluster.ready()
            answer = await getattr(self, f"_bus_{op}")(member, data)
        except BusError as exc:
            logger.warning("cluster bus: %s", exc)
            self._refuse(member, rid, RequestError(f"the cluster bus failed: {exc}", "bus"))
            return
        except Exception as exc:
            self._refuse(member, rid, exc, op)
            return
        if op == "say":
            # Answer once our own follower stored and fanned the line out (the sender
            # sees it before the answer, as with a lone hub), without holding the
            # member's next line back: the next append may go while this one travels.
            task = asyncio.get_running_loop().create_task(self._answer_stored(member, rid, answer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._post(member, protocol.RESULT, {"rid": rid, "ok": True, **answer})

    async def _answer_stored(self, member: Member, rid: int, answer: dict[str, Any]) -> None:
        assert self.cluster is not None
        await self.cluster.caught_up(answer["room"], answer["seq"])
        self._post(member, protocol.RESULT, {"rid": rid, "ok": True, **answer})

    async def _bus_hello(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        assert self.cluster is not None
        nick = protocol.normalize_nick(data["nick"])
        if member.nick is not None:
            raise RequestError(f"already here as {member.nick}; use /nick to change", "registered")
        # A client without a nick key gets one of its own session's: its nick can then
        # pass to no other session (as before nick keys).
        member.owner = owner_of(data.get("key") or secrets.token_hex(16))
        member.keyed = bool(data.get("key"))
        await self._bus_claim(member, nick)
        answer = self._op_hello(member, data)
        answer["dm_since"] = await self._follow_dms(member, data.get("dm_since"))
        self._publish(member)
        return answer

    async def _follow_dms(self, member: Member, since: int | None) -> int:
        """Deliver the member's DMs from its log above ``since`` (None: from now on);
        returns where delivery starts."""
        assert self.cluster is not None and member.nick is not None
        if member.dms is not None:
            member.dms.cancel()
        head = await self.cluster.dm_head(member.nick)
        start = head if since is None else min(max(since, 0), head)
        member.dms = self.cluster.follow_dms(member.nick, start, lambda dm: self._deliver_dm(member, dm))
        return start

    async def _deliver_dm(self, member: Member, dm: dict[str, Any]) -> None:
        """A DM from the member's log: while it lags, the next ones wait on the bus, not
        in its outbox (where the oldest would go when it is full)."""
        while member.lagging and not member.peer.is_closed:
            await member.drained.wait()
        self._post(member, protocol.DM, dm)

    async def _bus_nick(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        nick = protocol.normalize_nick(data["nick"])
        old = member.nick
        if old is not None and protocol.nick_key(old) != protocol.nick_key(nick):
            await self._bus_claim(member, nick)
        answer = self._op_nick(member, data)
        if old is not None and protocol.nick_key(old) != protocol.nick_key(nick):
            assert self.cluster is not None
            self.cluster.release(old, member.owner)
            self.cluster.show(old, None)
            answer["dm_since"] = await self._follow_dms(member, None)
        return answer

    async def _bus_claim(self, member: Member, nick: str) -> None:
        """Claim ``nick`` on the bus for this session; refused in the local words
        (its owner reconnecting here) or today's words (held on another hub)."""
        assert self.cluster is not None
        holder = self.nicks.get(protocol.nick_key(nick))
        if holder is not None and holder is not member:
            if holder.owner != member.owner:
                self._claim(member, nick)  # raises, with the local reason
            self._supersede(holder)
        owner = member.owner
        got = await self.cluster.claim(nick, owner)
        if not got:
            raise RequestError(f"the nick {nick!r} is taken", "nick_taken")
        member.moved_in = got == "ours" and member.nick is None  # (its own nick again: no news)
        if self.members.get(member.peer) is not member:  # the session ended meanwhile
            self.cluster.release(nick, owner)
            raise RequestError("the session ended", "closed")

    def _supersede(self, old: Member) -> None:
        """The same client (same nick key) says hello in a new session while its old
        one lingers here (it left for another hub, and came back): the old session
        goes quietly, its nick passes to the new one."""
        assert old.nick is not None
        del self.nicks[protocol.nick_key(old.nick)]
        old.nick = None  # no "left", no release: the nick stays held, by the new session
        if old.dms is not None:
            old.dms.cancel()
        self._spawn(old.peer.close("superseded by a new session"))

    async def _bus_dm(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        """A DM goes to the recipient's log on the bus: stored once (the bus drops a
        re-sent mid), delivered by whichever hub the recipient is on, by its number."""
        assert self.cluster is not None and member.nick is not None
        to = protocol.normalize_nick(data["to"])
        target = self.nicks.get(protocol.nick_key(to))
        if target is None:
            nicks = await self.cluster.ready()
            if await nicks.get(nick_name(to)) is None:
                raise RequestError(f"nobody called {to!r} is here", "unknown_nick")
        appended = await self.cluster.append_dm(
            member.nick, to if target is None else str(target.nick), data["text"], data.get("kind", "say"),
            data["mid"], self.clock(),
        )  # fmt: skip
        answer: dict[str, Any] = {
            "to": to if target is None else target.nick,
            "duplicate": appended.duplicate,
        }
        if target is not None:
            answer["state"] = target.state
        return answer

    async def _bus_who(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        room = protocol.normalize_room(data["room"])
        if self.history.head(room) is None and room not in await self._cluster_rooms():
            self._known_room(room)  # raises, with the rooms this hub knows
        return {"room": room, "members": await self._cluster_who(room)}

    async def _cluster_who(self, room: str) -> list[dict[str, Any]]:
        """Members of ``room`` on every hub: ours as we know them, the others' as their
        hubs last said on the bus."""
        assert self.cluster is not None
        found = {protocol.nick_key(str(m["nick"])): m for m in self._who(room)}
        for entry in await self.cluster.everyone():
            key = protocol.nick_key(entry["nick"])
            if entry["hub"] == self.cluster.hub_id or room not in entry["rooms"]:
                continue
            # on two hubs at once (it moved; its old session lingers on one): the live one
            if key not in found or found[key]["state"] == "reconnecting":
                found[key] = {"nick": entry["nick"], "state": entry["state"], "away": entry["away"]}
        return sorted(found.values(), key=lambda e: str(e["nick"]).casefold())

    async def _cluster_rooms(self) -> set[str]:
        assert self.cluster is not None
        return await self.cluster.all_rooms() | set(self.history.rooms())

    async def _bus_rooms(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        """Every room of the cluster, with its head (the log's, for rooms this hub does
        not follow) and how many are in it on every hub."""
        assert self.cluster is not None
        if data.get("mine"):  # the heads of its own rooms (after a resume): no scan of the bus
            return self._op_rooms(member, data)
        counts: dict[str, int] = {}
        for entry in await self.cluster.everyone():
            for room in entry["rooms"]:
                counts[room] = counts.get(room, 0) + 1
        heads = self.history.rooms()
        rooms = []
        for room in sorted(await self._cluster_rooms())[: self.settings.max_rooms]:
            head = heads.get(room) if self.cluster.following(room) else None
            if head is None:
                head = await self.cluster.head(room)
            # our own members are counted from here (what we said on the bus may lag)
            here = sum(1 for m in self.rooms.get(room, ()) if m.nick)
            rooms.append({"room": room, "head": head, "members": max(counts.get(room, 0), here)})
        return {"rooms": rooms}

    async def _bus_join(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        assert self.cluster is not None
        room = protocol.normalize_room(data["room"])
        if self.history.head(room) is None and len(self.history.rooms()) >= self.settings.max_rooms:
            raise RequestError(f"this hub keeps at most {self.settings.max_rooms} rooms", "too_many_rooms")
        # A room this hub never followed is fetched from its log now: the answer's
        # history and "since" catch-up come from History, which must hold it all.
        head = await self.cluster.head(room)
        if not self.cluster.following(room):
            await self._same_history(room)
            await self.cluster.add_room(room)
        self.cluster.follow(room, self.history.head(room) or 0, self._apply)
        await self.cluster.caught_up(room, head)
        told = self._companions(member)
        answer = self._op_join(member, data)
        answer["created"] = answer["created"] and head == 0
        self._publish(member)
        if member.moved_in and data.get("since") is not None:
            # back from another hub: the others saw "reconnecting…" (not "left")
            event = {"kind": "online", "nick": member.nick}
            self._post_all(self.rooms.get(room, set()) - told - {member}, protocol.EVENT, event)
            self.cluster.announce(event, [room])
        answer["members"] = await self._cluster_who(room)
        return answer

    async def _same_history(self, room: str) -> None:
        """Before following a room's log from what History holds: is it the log's? A
        database kept without the bus (or on another bus) numbered its own lines, and
        following on from its head would mix two histories under one set of numbers."""
        assert self.cluster is not None
        local = self.history.head(room) or 0
        if local == 0:
            return
        row = self.history.since(room, local - 1, 1)
        entry = await self.cluster.entry(room, local)
        if not row or entry is None or (entry["nick"], entry["text"]) != (row[0]["nick"], row[0]["text"]):
            raise RequestError(
                f"this hub's history of {protocol.display_room(room)} is not the cluster's (kept without "
                "the bus, or on another one): start the hub with a fresh --db to share the room",
                "diverged",
            )

    async def _bus_say(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        assert self.cluster is not None and member.nick is not None
        room = self._say_room(member, data)
        mid = data["mid"]
        found = self.history.find(mid)
        if found is not None:  # a re-send of what this hub has stored already
            return {"room": found["room"], "seq": found["seq"], "duplicate": True}
        appended = await self.cluster.append(
            room, member.nick, data["text"], data.get("kind", "say"), mid, self.clock()
        )
        return {"room": room, "seq": appended.seq, "duplicate": appended.duplicate}

    # ------------------------------------------------------------------ requests

    def _request(self, member: Member, data: dict[str, Any]) -> None:
        rid = data["rid"]
        op = data["op"]
        if self.handover.holds(member, data):
            return  # handing over: the client re-sends it to the successor
        try:
            if member.nick is None and op != "hello":
                raise RequestError("say hello first (the hub does not know this session)", "unregistered")
            answer = getattr(self, f"_op_{op}")(member, data)
        except Exception as exc:
            self._refuse(member, rid, exc, op)
            return
        self._post(member, protocol.RESULT, {"rid": rid, "ok": True, **answer})

    def _refuse(self, member: Member, rid: int, exc: Exception, op: str = "") -> None:
        if isinstance(exc, RequestError):
            error, code = str(exc), exc.code
        elif isinstance(exc, ValueError):  # from normalize_*: already user-facing text
            error, code = str(exc), "invalid"
        else:  # a bug of ours must cost one answer, not the hub or the session
            logger.error("request %r from %s failed", op, member.nick, exc_info=exc)
            error, code = "internal error", "bug"
        self._post(member, protocol.RESULT, {"rid": rid, "ok": False, "error": error, "code": code})

    def _known_room(self, room: str) -> str:
        name = protocol.normalize_room(room)
        if self.history.head(name) is None:
            known = ", ".join(protocol.display_room(r) for r in sorted(self.history.rooms())[:20]) or "none"
            raise RequestError(
                f"no room {protocol.display_room(name)} (rooms: {known}; /join creates one)", "unknown_room"
            )
        return name

    def _claim(self, member: Member, nick: str) -> None:
        key = protocol.nick_key(nick)
        holder = self.nicks.get(key)
        if holder is not None and holder is not member:
            extra = " (its owner is reconnecting; the nick is kept for them)" if not holder.linked else ""
            raise RequestError(f"the nick {nick!r} is taken{extra}", "nick_taken")
        if member.nick is not None:
            self.nicks.pop(protocol.nick_key(member.nick), None)
        self.nicks[key] = member
        member.nick = nick

    def _op_hello(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        nick = protocol.normalize_nick(data["nick"])
        if member.nick is not None:
            raise RequestError(f"already here as {member.nick}; use /nick to change", "registered")
        self._claim(member, nick)
        self.handover.hello(member, data)
        return {"nick": nick, "rooms": self.history.rooms()}

    def _op_join(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        room = protocol.normalize_room(data["room"])
        created = False
        if self.history.head(room) is None:
            if len(self.history.rooms()) >= self.settings.max_rooms:
                raise RequestError(
                    f"this hub keeps at most {self.settings.max_rooms} rooms", "too_many_rooms"
                )
            created = self.history.create_room(room, self.clock())
        head = self.history.head(room) or 0
        since = data.get("since")
        if since is not None and since > head:
            since = 0  # the hub's history restarted (an in-memory hub): send what there is
        if since is None:
            rows = self.history.last(room, self.settings.history_on_join)
            skipped = 0
        else:
            first = max(since, head - self.settings.max_catchup)
            rows = self.history.since(room, first, self.settings.max_catchup)
            skipped = first - since
        was_in = room in member.rooms
        member.rooms[room] = head
        self.rooms.setdefault(room, set()).add(member)
        # A rejoin ("since": after a hub restart) is not news: no join spam for it.
        if not was_in and data.get("since") is None:
            self._room_event(member, room, "joined")
        return {
            "room": room,
            "head": head,
            "created": created,
            "history": [_msg_payload(r) for r in rows],
            "skipped": skipped,
            "members": self._who(room),
        }

    def _op_part(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        room = protocol.normalize_room(data["room"])
        if room not in member.rooms:
            raise RequestError(f"you are not in {protocol.display_room(room)}", "not_in_room")
        del member.rooms[room]
        self.rooms.get(room, set()).discard(member)
        self._room_event(member, room, "left")
        return {"room": room}

    def _say_room(self, member: Member, data: dict[str, Any]) -> str:
        room = self._known_room(data["room"])
        if room not in member.rooms:
            raise RequestError(
                f"you are not in {protocol.display_room(room)} (/join {protocol.display_room(room)} first)",
                "not_in_room",
            )
        return room

    def _op_say(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        room = self._say_room(member, data)
        assert member.nick is not None
        stored, duplicate = self.history.append(
            room, member.nick, data["text"], data.get("kind", "say"), data["mid"], self.clock()
        )
        if not duplicate:
            self._fan_out(room, stored)
        return {"room": stored["room"], "seq": stored["seq"], "duplicate": duplicate}

    def _op_dm(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        to = protocol.normalize_nick(data["to"])
        target = self.nicks.get(protocol.nick_key(to))
        if target is None:
            raise RequestError(f"nobody called {to!r} is here", "unknown_nick")
        mid = data["mid"]
        if mid in self._dm_mids:
            return {"to": target.nick, "duplicate": True}
        self._dm_mids[mid] = None
        if len(self._dm_mids) > 10_000:
            self._dm_mids.popitem(last=False)
        dm = {"from": member.nick, "to": target.nick, "text": data["text"], "kind": data.get("kind", "say"),
              "ts": self.clock(), "mid": mid}  # fmt: skip
        self._post(target, protocol.DM, dm)
        return {"to": target.nick, "duplicate": False, "state": target.state}

    def _op_nick(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        nick = protocol.normalize_nick(data["nick"])
        old = member.nick
        if old == nick:
            return {"nick": nick}
        self._claim(member, nick)
        self._presence(member, "nick", nick=old, new=nick)
        self.handover.renamed(member)
        return {"nick": nick, "old": old}

    def _who(self, room: str) -> list[dict[str, Any]]:
        return sorted(
            ({"nick": m.nick, "state": m.state, "away": m.away} for m in self.rooms.get(room, ()) if m.nick),
            key=lambda e: str(e["nick"]).casefold(),
        )

    def _op_who(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        room = self._known_room(data["room"])
        return {"room": room, "members": self._who(room)}

    def _op_rooms(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "rooms": [
                {"room": room, "head": head, "members": len(self.rooms.get(room, ()))}
                for room, head in sorted(self.history.rooms().items())
                if not data.get("mine") or room in member.rooms
            ]
        }

    def _op_history(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        room = self._known_room(data["room"])
        limit = min(data.get("limit") or 20, protocol.MAX_HISTORY)
        since = data.get("since")
        # "since": a client filling a gap in what it was sent (the oldest it lacks first)
        rows = self.history.last(room, limit) if since is None else self.history.since(room, since, limit)
        return {"room": room, "messages": [_msg_payload(r) for r in rows]}

    def _op_search(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        rooms = [self._known_room(data["room"])] if data.get("room") else list(member.rooms)
        query = data["query"].strip()
        if not query:
            raise RequestError("search for what? (/search WORDS)", "invalid")
        limit = min(data.get("limit") or 20, protocol.MAX_HISTORY)
        return {
            "query": query,
            "messages": [_msg_payload(r) for r in self.history.search(query, rooms, limit)],
        }

    def _op_took(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        return self.handover.took(member, data)

    def _op_away(self, member: Member, data: dict[str, Any]) -> dict[str, Any]:
        message = (data.get("message") or "").strip() or None
        member.away = message
        self._presence(member, member.state)
        return {"state": member.state}


def _how_it_ended(member: Member) -> str:
    """How the member's session ended: "bye" (its client's goodbye, or ours), "moved"
    (its client closed it to go to another hub) or "gone" (expired, or an error)."""
    closed = member.peer.closed
    end = closed.result() if closed.done() else None
    if not isinstance(end, ConnectionClosedOK):
        return "gone"
    return "moved" if end.reason == protocol.MOVED else "bye"


def _msg_payload(row: StoredMessage) -> dict[str, Any]:
    payload: dict[str, Any] = {"room": row["room"], "seq": row["seq"], "ts": row["ts"], "nick": row["nick"],
                               "text": row["text"], "kind": row["kind"]}  # fmt: skip
    if row["mid"] is not None:
        payload["mid"] = row["mid"]
    return payload


async def _first(*aws: Any) -> None:
    """Wait until the first of ``aws`` (coroutines or futures) is done; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for original, task in zip(aws, tasks, strict=True):
            if task is not original:  # a task we made; never cancel the caller's future
                task.cancel()
