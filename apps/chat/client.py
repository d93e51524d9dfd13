"""The chat client without a screen: ChatClient, used by the terminal UI, the tests
and the benchmark alike.

It turns what the hub sends into :class:`Line` objects (every string from a peer is
sanitised on the way in) and what the user types into requests. The rules that make
"nobody loses a message" hold on this side:

* **in order, once**: each room's messages carry the hub's sequence number. One at
  or below the last shown is a duplicate and dropped; one beyond it waits until the
  gap is filled (the client asks the hub for the gap).
* **offline typing**: a line typed while the link is down goes into the session's
  replay buffer at once (the runtime sends it when the link is back, exactly once)
  and stays in :attr:`ChatClient.pending` until the hub's copy comes back.
* **hub restart** (the session expired): the client says hello again, rejoins its
  rooms "since" the last sequence number it showed, and re-sends what is still
  pending under the same message ids, which the hub recognises.
* **the hub moved** (its host quit and handed it over, or crashed and a member took
  over: handover.py): the client connects to the new hub, rejoins "since" as after
  a restart, and re-sends what is pending; lines typed meanwhile wait in pending.
* **the hub is gone** (a client given several hubs of one cluster): when the link
  drops and the hub's port refuses (or stays silent) a few probes running, the
  client moves to the next hub that answers, as for a handover; the nick passes with
  it (its nick key, below), the rooms are rejoined "since", and DMs resume after the
  last number shown.
* **"— N new while away —"**: when the link returns, the client asks the hub for the
  rooms' heads before showing what the session replayed, and puts the marker first.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from korinet import (
    Client,
    ConnectionClosed,
    ConnectionClosedOK,
    KoriNetError,
    MessageRejected,
    SendBufferFull,
    SessionConfig,
    SessionExpired,
)
from korinet.session import CloseCode

from . import protocol, watch
from .handover import RoomState, Taker, collect, stored
from .hub import chat_plugins
from .sanitize import clean

if TYPE_CHECKING:
    from korinet.plugins import PluginManager
    from korinet.security import ClientTLS

__all__ = ["COMMANDS", "ChatClient", "ChatError", "Line", "Pending", "describe"]

logger = logging.getLogger(__name__)

#: A dead link is noticed within about 2.5 heartbeats: keep them short on a LAN.
CLIENT_CONFIG = SessionConfig(heartbeat_interval=2.0)

#: The longest wait between reconnection attempts: on a LAN a hub that is back is
#: used again within a second (the runtime's default, 5 s, suits the internet).
BACKOFF_CAP = 1.0

#: Seconds to reach the hub a handover moved us to.
MOVE_TIMEOUT = 10.0

#: A dropped embedded hub is taken to be gone after this many refused (or silent)
#: probes, this many seconds apart (docs/CHAT.md, "If the host crashes").
CRASH_PROBES = 3
PROBE_INTERVAL = 0.5
#: Seconds a hub has to accept a TCP connection when probed.
PROBE_TIMEOUT = 1.0

#: Room messages each client keeps (its own copy, for a takeover after a crash).
KEEP_PER_ROOM = 2000

#: Slash commands and their one-line help (the UI completes these).
COMMANDS: dict[str, str] = {
    "/join": "/join #room          join (or create) a room and make it current",
    "/part": "/part [#room]        leave a room (default: the current one)",
    "/nick": "/nick NAME           change your nick",
    "/msg": "/msg NICK TEXT       a direct message",
    "/me": "/me ACTION           an action (* alice waves)",
    "/who": "/who [#room]         who is in a room, and their state",
    "/rooms": "/rooms               the rooms of this hub",
    "/history": "/history [N]         the last N messages of the current room",
    "/search": "/search WORDS        search the history of your rooms",
    "/away": "/away [MESSAGE]      mark yourself away (no message: back)",
    "/help": "/help                this list",
    "/quit": "/quit [--force]      leave (lines not yet delivered: asks first)",
}


class ChatError(Exception):
    """A request the hub refused, or a command the user got wrong (text for the user)."""

    def __init__(self, text: str, code: str = "") -> None:
        super().__init__(text)
        self.code = code


@dataclass(slots=True)
class Line:
    """One line for the screen. Every string in it is already sanitised.

    kind: "msg" (a room message), "history" (a room message from the past), "dm",
    "event" (presence, membership), "marker" ("— 3 new while away —"), "info",
    "error".
    """

    kind: str
    text: str
    room: str | None = None
    nick: str | None = None
    ts: float | None = None
    seq: int | None = None
    me: bool = False  # an action (/me)
    own: bool = False  # written by this client
    mention: bool = False  # mentions this client's nick


@dataclass(slots=True)
class Pending:
    """A line typed but not yet confirmed by the hub."""

    mid: str
    text: str
    room: str | None
    to: str | None = None
    kind: str = "say"
    rid: int = 0
    acked: bool = False  # the hub's application has the request (it will be stored)


@dataclass
class _Waiting:
    future: asyncio.Future[dict[str, Any]]
    op: str
    mid: str | None = None


@dataclass
class _RoomView:
    seen: int = 0  # the last sequence number shown
    held: dict[int, dict[str, Any]] = field(default_factory=dict)  # beyond a gap
    asked: int = 0  # the gap start already asked for
    log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=KEEP_PER_ROOM))  # shown, raw


class ChatClient:
    """A chat session with a hub.

    Args:
        host, port: the hub.
        nick: the nick wanted (a taken one gets ``_`` appended, and a line says so).
        room: the room joined first (and current).
        tls: TLS settings (None: plaintext).
        plugins: plugin manager (the chat plugin is added if missing).
        on_line: called with every new :class:`Line`.
        on_status: called when the status line would change.
        taker: lets this client take the hub over when its host quits (None: it
            cannot; docs/CHAT.md, "Handover").
        hosting: this process hosts the hub (its client is never asked to take it).
        hubs: every hub of the cluster, ``(host, port)``, ``host:port`` among them or
            not: tried in order at start if the first does not answer, and moved to
            when the hub in use is gone (docs/CHAT.md, "Failover").
    """

    def __init__(
        self,
        host: str,
        port: int,
        nick: str,
        *,
        room: str | None = "general",
        tls: ClientTLS | None = None,
        plugins: PluginManager | None = None,
        config: SessionConfig | None = None,
        on_line: Callable[[Line], None] | None = None,
        on_status: Callable[[], None] | None = None,
        backoff_cap: float = BACKOFF_CAP,
        keep_lines: int = 5000,
        taker: Taker | None = None,
        hosting: bool = False,
        hubs: list[tuple[str, int]] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.hubs = list(hubs or [])
        if (host, port) not in self.hubs:
            self.hubs.insert(0, (host, port))
        self.nick = protocol.normalize_nick(nick)
        self.wanted_rooms = [protocol.normalize_room(room)] if room else []
        self.current: str | None = self.wanted_rooms[0] if self.wanted_rooms else None
        self.tls = tls
        self.plugins = chat_plugins(plugins)
        self.config = config or CLIENT_CONFIG
        self.backoff_cap = backoff_cap
        self.listeners: list[Callable[[Line], None]] = [on_line] if on_line else []
        self.on_status = on_status
        self.peer: Client | None = None
        self.rooms: dict[str, _RoomView] = {}
        self.members: dict[str, set[str]] = {}  # room -> nicks, for completion
        self.known_rooms: set[str] = set()  # every room the hub told us of, for completion
        self._rooms_asked = -1e9  # when the hub's room list was last asked for (monotonic)
        self.pending: OrderedDict[str, Pending] = OrderedDict()
        self.lines: deque[Line] = deque(maxlen=keep_lines)
        self.lines_total = 0
        self.duplicates_dropped = 0
        self.state = "connecting"
        self.away: str | None = None
        self._client_id = secrets.token_hex(6)  # public: it starts every mid
        # Secret: what lets a new session of ours (on another hub) take our nick over.
        self._nick_key = secrets.token_hex(16)
        #: the last DM number shown, and the nick (key) whose DM log it counts
        self.dm_seen: int | None = None
        self._dm_nick: str | None = None
        self._mids = itertools.count(1)
        self._rids = itertools.count(1)
        self._waiting: dict[int, _Waiting] = {}
        self._backlog: deque[dict[str, Any]] = deque()
        self._pump: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()
        self._holding: list[dict[str, Any]] | None = None  # msgs held until the "away" marker
        self._mark: dict[str, int] = {}
        self._registering = False
        self._closing = False
        self._mention_re = self._mention_pattern()
        self.taker = taker
        self.hosting = hosting
        #: who may host next, in order, as the hub last said ({"nick", "address", "port"})
        self.successors: list[dict[str, Any]] = []
        self.hub_host: str | None = None  # the nick of the member hosting the hub
        self.hub_started: float | None = None  # when the chat's hub started, as it said
        self._incoming: dict[str, RoomState] = {}  # rooms being handed over to us
        self._moving = False
        self._move_register: asyncio.Future[None] | None = None  # saying hello to the hub moved to
        self._watching = False  # probing a hub whose link dropped

    # ------------------------------------------------------------------ lifecycle

    async def start(self, open_timeout: float = 10.0) -> None:
        """Connect, say hello, join the first room.

        Raises:
            KoriNetError: no session could be opened (the message says why).
            ChatError: the hub refused us.
        """
        if len(self.hubs) > 1:
            self.host, self.port = await self._first_answering()
        self.peer = await Client.connect(
            self.host,
            self.port,
            plugins=self.plugins,
            tls=self.tls,
            config=self.config,
            backoff_cap=self.backoff_cap,
            open_timeout=open_timeout,
        )
        watch.add(self)
        self.state = "connected"
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self._register(first=True)

    async def _first_answering(self) -> tuple[str, int]:
        """The first of our hubs that accepts a connection (the first if none does)."""
        from .discovery import answers

        for host, port in self.hubs:
            if await answers(host, port, PROBE_TIMEOUT):
                return host, port
        return self.hubs[0]

    async def close(self) -> None:
        self._closing = True
        watch.remove(self)
        if self.peer is not None:
            await self.peer.close("bye", timeout=2.0)
        for task in (self._reader, self._pump, *self._tasks):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self.state = "closed"
        self._status()

    def reconnect_now(self) -> None:
        """The hub is known to be back (it announced itself): try at once instead of
        waiting out the backoff delay."""
        if self.peer is not None and not self.peer.is_connected and not self.peer.is_closed:
            self.peer.reconnect_now()

    @property
    def queued(self) -> int:
        """Lines typed and not yet confirmed by the hub."""
        return len(self.pending)

    @property
    def undelivered(self) -> int:
        """Lines typed that the hub does not have yet (quitting now would lose them)."""
        return sum(1 for p in self.pending.values() if not p.acked)

    @property
    def status(self) -> str:
        """``#general · alice · connected`` or ``... · reconnecting… 3 queued``."""
        room = protocol.display_room(self.current) if self.current else "(no room)"
        state = "reconnecting…" if self.state == "reconnecting" else self.state
        if self.away and self.state == "connected":
            state = "away"
        queued = f" {self.queued} queued" if self.queued else ""
        return f"{clean(room)} · {clean(self.nick)} · {state}{queued}"

    def session_event(self, event: str, session: Any) -> None:
        """From the plugin's hooks (watch.py)."""
        if session is not self.peer or self.peer is None:
            return
        if event == "lost":
            self.state = "reconnecting"
            if self._move_register is not None:
                self._move_register.cancel()  # the hub we were moving to is gone too
            can_move = bool(self.hub_host and not self.hosting) or len(self.hubs) > 1
            if can_move and not self._watching and not self._closing:
                # an embedded hub: if its process died, someone takes over; hubs of a
                # cluster: if ours is gone, we move to another
                self._watching = True
                self._spawn(self._watch_hub(self.peer))
            if not self._mark:
                self._mark = {room: view.seen for room, view in self.rooms.items()}
        elif event == "resumed":
            self.state = "connected"
            if self._mark and not self._registering:
                # Hold what the session replays (it comes right after this hook, before
                # any task runs) until the marker is out.
                mark, self._mark = self._mark, {}
                if self._holding is None:
                    self._holding = []
                self._spawn(self._after_resume(mark))
        elif event == "opened":
            self.state = "connected"
        elif event == "closed" and self.peer.is_closed:
            self.state = "closed"
        self._status()

    # ------------------------------------------------------------------ output

    def _emit(self, line: Line) -> None:
        self.lines.append(line)
        self.lines_total += 1
        for listener in self.listeners:
            try:
                listener(line)
            except Exception:
                logger.exception("a line listener failed")
        self._changed.set()
        self._changed = asyncio.Event()

    def _info(self, text: str, kind: str = "info", room: str | None = None) -> None:
        self._emit(Line(kind, text, room=room))

    def notice(self, text: str) -> None:
        """Show a line of our own (not from a peer) to the user."""
        self._info(clean(text))

    def _status(self) -> None:
        if self.on_status is not None:
            self.on_status()
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[ChatClient], bool], timeout: float | None = 10.0) -> None:
        """Wait until ``predicate(self)`` holds (checked after every line or status change).

        Raises:
            TimeoutError: it did not within ``timeout``.
        """
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._changed.wait()

    def _mention_pattern(self) -> re.Pattern[str]:
        return re.compile(rf"(?<![\w]){re.escape(self.nick)}(?![\w])", re.IGNORECASE)

    # ------------------------------------------------------------------ requests

    def _request(self, op: str, mid: str | None = None, **args: Any) -> asyncio.Future[dict[str, Any]]:
        rid = next(self._rids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = _Waiting(future, op, mid)
        payload = {"rid": rid, "op": op, **args}
        if mid is not None:
            payload["mid"] = mid
            self.pending[mid].rid = rid
        self._send(payload)
        return future

    async def _ask(self, op: str, **args: Any) -> dict[str, Any]:
        """Send a request and return the hub's answer.

        Raises:
            ChatError: the hub refused it (the text says why).
        """
        result = await self._request(op, **args)
        if not result.get("ok"):
            raise ChatError(clean(result.get("error") or "refused"), str(result.get("code", "")))
        return result

    def _send(self, payload: dict[str, Any]) -> None:
        """Hand a request to the session now (it queues while the link is down), or to
        our own backlog when the session's window is full (sent in order later)."""
        if self._backlog:
            self._backlog.append(payload)
            return
        assert self.peer is not None
        try:
            ack = self.peer.send_nowait(payload, protocol.REQUEST)
        except SendBufferFull:
            self._backlog.append(payload)
            if self._pump is None or self._pump.done():
                self._pump = asyncio.get_running_loop().create_task(self._drain_backlog())
            return
        except KoriNetError as exc:
            self._fail(payload["rid"], exc)
            return
        ack.add_done_callback(functools.partial(self._acked, payload["rid"]))

    async def _drain_backlog(self) -> None:
        assert self.peer is not None
        peer = self.peer
        try:
            while self._backlog:
                await peer.wait_acked(peer.session.acked + 1)  # room for at least one
                while self._backlog:
                    payload = self._backlog[0]
                    try:
                        ack = peer.send_nowait(payload, protocol.REQUEST)
                    except SendBufferFull:
                        break
                    self._backlog.popleft()
                    ack.add_done_callback(functools.partial(self._acked, payload["rid"]))
        except KoriNetError:
            pass

    def _acked(self, rid: int, ack: asyncio.Future[None]) -> None:
        if ack.cancelled():
            return
        error = ack.exception()
        if error is None:
            waiting = self._waiting.get(rid)
            pending = self.pending.get(waiting.mid) if waiting and waiting.mid else None
            if pending is not None and pending.rid == rid:
                pending.acked = True
                self._status()
            return
        if isinstance(error, SessionExpired) or self._moving:
            # the hub may or may not have it: re-registration (on the new hub, after a
            # move) re-sends what is pending; later failures of the old session find
            # no request waiting any more (re-sent under a new rid)
            return
        self._fail(rid, error, keep_pending=self._closing)

    def _fail(self, rid: int, error: BaseException, *, keep_pending: bool = False) -> None:
        waiting = self._waiting.pop(rid, None)
        if waiting is None:
            return
        text = describe(error)
        if waiting.mid is not None and not keep_pending:
            pending = self.pending.pop(waiting.mid, None)
            if pending is not None:
                self._info(f"not sent ({clean(text)}): {clean(pending.text, 80)}", "error")
                self._status()
        if not waiting.future.done():
            waiting.future.set_result({"rid": rid, "ok": False, "error": text, "code": "failed"})

    # ------------------------------------------------------------------ registration

    async def _register(self, first: bool) -> None:
        """hello, then the rooms (again, after a hub restart), then what is pending."""
        self._registering = True
        # Room messages that follow a join's answer may be read before the join's own
        # code runs again and makes the room's view: hold them until it has.
        if self._holding is None:
            self._holding = []
        try:
            wanted = self.nick
            for attempt in range(6):
                nick = wanted if attempt == 0 else f"{wanted}{'_' * attempt}"
                extra = self._hosting_offer()
                if self.dm_seen is not None and self._dm_nick == protocol.nick_key(nick):
                    extra["dm_since"] = self.dm_seen  # DMs after the last shown, once
                result = await self._request("hello", nick=nick, key=self._nick_key, **extra)
                if result.get("ok"):
                    self._learn_rooms(result.get("rooms"))
                    if nick != self.nick or attempt:
                        self._info(f"the nick {clean(wanted)} is taken: you are {clean(nick)}")
                    self._set_nick(nick)
                    self._dms_from(result.get("dm_since"))
                    break
                if result.get("code") != "nick_taken":
                    raise ChatError(clean(result.get("error") or "refused"), str(result.get("code", "")))
            else:
                raise ChatError(f"the nick {clean(wanted)} and its variants are taken; pick another")
            if self.away:
                self._request("away", message=self.away)
            for room in list(self.wanted_rooms):
                await self._join(room, announce=first)
            self._mark = {}
            if not first:
                for pending in list(self.pending.values()):
                    self._resend(pending)
        finally:
            self._registering = False
            self._release_held()

    def _hosting_offer(self) -> dict[str, Any]:
        if self.hosting:
            return {"hosting": True}
        return {"can_host": self.taker.port} if self.taker is not None else {}

    def _resend(self, pending: Pending) -> None:
        waiting = self._waiting.pop(pending.rid, None)
        if pending.to is not None:
            future = self._request("dm", mid=pending.mid, to=pending.to, text=pending.text, kind=pending.kind)
        else:
            future = self._request(
                "say", mid=pending.mid, room=pending.room, text=pending.text, kind=pending.kind
            )
        if waiting is not None and not waiting.future.done():
            future.add_done_callback(lambda f: waiting.future.set_result(f.result()))

    async def _join(self, room: str, *, announce: bool) -> dict[str, Any]:
        view = self.rooms.get(room)
        since = view.seen if view is not None else None
        if since is None and room in self._mark:
            since = self._mark[room]
        result = await self._ask("join", room=room, **({"since": since} if since is not None else {}))
        room = result["room"]
        if room not in self.wanted_rooms:
            self.wanted_rooms.append(room)
        self._learn_rooms([room])
        head = int(result["head"])
        history = [m for m in result.get("history", ()) if _valid_msg(m)]
        self.members[room] = {str(m.get("nick")) for m in result.get("members", ()) if isinstance(m, dict)}
        if since is None:
            view = self.rooms[room] = _RoomView(seen=head)
            if announce:
                who = len(self.members[room])
                verb = "created" if result.get("created") else "joined"
                self._info(
                    f"— {verb} {clean(protocol.display_room(room))} ({who} here) —",
                    room=room,
                )
            for m in history:
                self._emit(self._msg_line(m, "history"))
            return result
        if view is None:
            view = self.rooms[room] = _RoomView(seen=since)
        # (compared with what we asked for: a message that came in while we waited for
        # the answer, now that the room counts us in, is already shown)
        if head < since:  # an in-memory hub restarted: its numbers start again
            self._info(f"— the hub's history of {protocol.display_room(room)} restarted —", room=room)
            view.seen = 0
            view.held.clear()
        missed = head - view.seen
        if missed > 0:
            self._info(f"— {missed} new while away —", "marker", room=room)
        if result.get("skipped"):
            self._info(f"({result['skipped']} older messages not shown: /history for more)", room=room)
            view.seen = max(view.seen, history[0]["seq"] - 1 if history else head)
        for m in history:
            self._room_msg(m)
        return result

    async def _after_resume(self, mark: dict[str, int]) -> None:
        """The link is back on the same session: put "— N new while away —" before the
        messages the session replays (they are held until the hub tells the heads)."""
        # Our own lines queued while away reach the hub before this request: not news.
        own: dict[str, int] = {}
        for pending in self.pending.values():
            if pending.room is not None:
                own[pending.room] = own.get(pending.room, 0) + 1
        try:
            result = await self._ask("rooms", mine=True)
        except ChatError:
            self._release_held()
            return
        heads = {r["room"]: r["head"] for r in result.get("rooms", ()) if isinstance(r, dict)}
        for room, seen in mark.items():
            head = heads.get(room)
            missed = head - seen - own.get(room, 0) if isinstance(head, int) else 0
            if missed > 0 and room in self.rooms:
                self._info(f"— {missed} new while away —", "marker", room=room)
        self._release_held()

    def _release_held(self) -> None:
        held, self._holding = self._holding, None
        for m in held or ():
            self._room_msg(m)

    def _dms_from(self, start: Any) -> None:
        """The hub delivers our DMs numbered above ``start`` (cluster hubs): keep what
        we showed of this nick's DMs, or start counting afresh for a new nick."""
        if not isinstance(start, int):
            return
        if self._dm_nick != protocol.nick_key(self.nick) or self.dm_seen is None:
            self.dm_seen = start
            self._dm_nick = protocol.nick_key(self.nick)

    def _set_nick(self, nick: str) -> None:
        self.nick = nick
        self._mention_re = self._mention_pattern()
        self._status()

    # ------------------------------------------------------------------ receiving

    async def _read(self) -> None:
        assert self.peer is not None
        peer = self.peer
        while True:
            try:
                msg = await peer.recv_message()
            except SessionExpired:
                self._info("the hub lost our session (it restarted?): joining again")
                self._spawn(self._reregister())
                continue
            except ConnectionClosed as exc:
                self.state = "closed"
                if not (self._closing and isinstance(exc, ConnectionClosedOK)):  # our own quit: no news
                    self._info(f"disconnected from the hub: {describe(exc)}", "error")
                for rid in list(self._waiting):
                    # quitting: what never reached the hub stays counted (undelivered)
                    self._fail(rid, exc, keep_pending=self._closing)
                self._status()
                return
            try:
                self._received(msg.type, msg.data)
            except Exception:  # a bad message must not end the session
                logger.exception("could not handle a %r message", msg.type)

    async def _reregister(self) -> None:
        self._mark = self._mark or {room: view.seen for room, view in self.rooms.items()}
        self.rooms = {}
        try:
            await self._register(first=False)
        except (ChatError, KoriNetError) as exc:
            self._info(f"could not join again: {describe(exc)}", "error")

    def _received(self, type_: str, data: dict[str, Any]) -> None:
        if type_ == protocol.RESULT:
            self._result(data)
        elif type_ == protocol.MSG:
            if self._holding is not None:
                self._holding.append(data)
            else:
                self._room_msg(data)
        elif type_ == protocol.EVENT:
            self._event(data)
        elif type_ == protocol.DM:
            self._dm(data)
        elif type_ == protocol.HUB:
            self._hub_message(data)

    def _result(self, data: dict[str, Any]) -> None:
        rid = data["rid"]
        waiting = self._waiting.get(rid)
        if waiting is None:
            return
        if not data.get("ok") and data.get("code") == "unregistered" and waiting.mid is not None:
            return  # sent before our new hello reached the restarted hub: re-sent after it
        del self._waiting[rid]
        if waiting.mid is not None:
            pending = self.pending.pop(waiting.mid, None)
            if pending is not None and not data.get("ok"):
                self._info(f"not sent ({clean(data.get('error'))}): {clean(pending.text, 80)}", "error")
            self._status()
        if not waiting.future.done():
            waiting.future.set_result(data)

    def _room_msg(self, data: dict[str, Any]) -> None:
        """Show a room message once, in sequence order (see the module docstring)."""
        room = data["room"]
        view = self.rooms.get(room)
        if view is None:
            return  # a room we left (or not yet joined again): its messages wait in history
        seq = data["seq"]
        if seq <= view.seen or seq in view.held:
            self.duplicates_dropped += 1
            return
        if seq > view.seen + 1:
            view.held[seq] = data
            if view.asked != view.seen:
                view.asked = view.seen
                self._spawn(self._fill_gap(room, view.seen, seq - view.seen - 1))
            return
        self._show(data)
        view.seen = seq
        view.log.append(data)
        while view.seen + 1 in view.held:
            view.seen += 1
            view.log.append(view.held[view.seen])
            self._show(view.held.pop(view.seen))

    async def _fill_gap(self, room: str, since: int, count: int) -> None:
        try:
            result = await self._ask(
                "history", room=room, since=since, limit=min(count, protocol.MAX_HISTORY)
            )
        except ChatError:
            return
        for m in result.get("messages", ()):
            if _valid_msg(m):
                self._room_msg(m)

    def _show(self, data: dict[str, Any]) -> None:
        mid = data.get("mid")
        if mid is not None and mid in self.pending:
            del self.pending[mid]
            self._status()
        self._emit(self._msg_line(data, "msg"))

    def _msg_line(self, data: dict[str, Any], kind: str) -> Line:
        nick = str(data.get("nick", "?"))
        own = protocol.nick_key(nick) == protocol.nick_key(self.nick) or data.get("mid", "").startswith(
            self._client_id
        )
        text = str(data.get("text", ""))
        return Line(
            kind,
            clean(text),
            room=clean(data.get("room")),
            nick=clean(nick, protocol.MAX_NICK + 8),
            ts=data.get("ts"),
            seq=data.get("seq"),
            me=data.get("kind") == "me",
            own=own,
            mention=kind == "msg" and not own and bool(self._mention_re.search(text)),
        )

    def _event(self, data: dict[str, Any]) -> None:
        kind = data["kind"]
        nick = clean(data.get("nick") or "?", protocol.MAX_NICK + 8)
        room = data.get("room")
        where = f" {clean(protocol.display_room(room))}" if room else ""
        raw_nick = str(data.get("nick") or "")
        if kind == "joined" and room:
            self.members.setdefault(room, set()).add(raw_nick)
            self._learn_rooms([room])
            text = f"{nick} joined{where}"
        elif kind == "left":
            for names in [self.members.get(room, set())] if room else self.members.values():
                names.discard(raw_nick)
            text = f"{nick} left{where}"
        elif kind == "reconnecting":
            text = f"{nick} is reconnecting…"
        elif kind == "online":
            text = f"{nick} is back"
        elif kind == "away":
            text = f"{nick} is away" + (f": {clean(data['text'], 200)}" if data.get("text") else "")
        elif kind == "nick":
            new = str(data.get("new") or "?")
            for names in self.members.values():
                if raw_nick in names:
                    names.discard(raw_nick)
                    names.add(new)
            text = f"{nick} is now known as {clean(new, protocol.MAX_NICK + 8)}"
        else:  # notice
            text = f"hub: {clean(data.get('text', ''), 500)}"
        self._emit(Line("event", text, room=clean(room) if room else None, nick=nick))

    def _dm(self, data: dict[str, Any]) -> None:
        seq = data.get("seq")
        if isinstance(seq, int):  # from a DM log on the cluster bus: once, by number
            if self.dm_seen is not None and seq <= self.dm_seen:
                self.duplicates_dropped += 1
                return
            self.dm_seen = seq
        mid = data.get("mid")
        if isinstance(mid, str) and mid in self.pending:  # a DM to ourselves
            del self.pending[mid]
        text = str(data.get("text", ""))
        self._emit(
            Line(
                "dm",
                clean(text),
                nick=clean(data.get("from"), protocol.MAX_NICK + 8),
                ts=data.get("ts"),
                me=data.get("kind") == "me",
                mention=True,
            )
        )

    # ------------------------------------------------------------------ handover

    def _hub_message(self, data: dict[str, Any]) -> None:
        kind = data["kind"]
        if kind == "successors":
            self.successors = list(data["list"])
            self.hub_host = data.get("host") or self.hub_host
            self.hub_started = data.get("started", self.hub_started)
        elif kind == "state" and self.taker is not None:
            collect(self._incoming, data)
        elif kind == "take" and self.taker is not None:
            self.hub_started = data.get("started", self.hub_started)
            self._spawn(self._take_over(clean(data.get("host") or "the host", protocol.MAX_NICK + 8)))
        elif kind == "moved" and data.get("merge"):
            # two hubs were started at once and the other is the chat's: join it afresh
            where = clean(f"{data['address']}:{data['port']}", 60)
            text = f"two chat hubs were started at once; moving to the first one ({where})"
            self.hosting = False
            self._spawn(self._move(data["address"], data["port"], data.get("fp"), text, fresh=True))
        elif kind == "moved":
            host = clean(data.get("host") or "the host", protocol.MAX_NICK + 8)
            nick = clean(data["nick"], protocol.MAX_NICK + 8)
            text = f"{host}'s hub closed; now hosted by {nick}"
            self._spawn(self._move(data["address"], data["port"], data.get("fp"), text))
        elif kind == "closed":
            host = clean(data.get("host") or "the host", protocol.MAX_NICK + 8)
            self._info(
                f"{host}'s hub closed and nobody here could host it: quit, then run korinet-chat again "
                "(the first to do so starts a hub)",
                "error",
            )

    async def _take_over(self, host: str) -> None:
        """The hub's host quits and chose us: start a hub from the rooms it sent, tell it
        where, and move there ourselves."""
        assert self.taker is not None
        rooms, self._incoming = list(self._incoming.values()), {}
        try:
            address, port, fp = await self.taker.start(rooms, self.hub_started)
        except Exception as exc:  # the old hub waits, then asks the next one
            self._info(f"could not take the hub over: {describe(exc)}", "error")
            return
        self.hosting = True
        try:
            async with asyncio.timeout(MOVE_TIMEOUT):
                await self._ask("took", port=port, **({"fp": fp} if fp else {}))
        except (ChatError, KoriNetError, TimeoutError):
            pass  # the old hub is gone already: the others find us as after a crash
        await self._move(address, port, fp, f"{host}'s hub closed; now hosted by you ({self.nick})")

    async def _watch_hub(self, peer: Client) -> None:
        """The link to an embedded hub dropped. Until it is back, its port is probed; if
        the port refuses (or says nothing) a few times running, its process is gone: the
        first of the successors the hub named takes over from its own copy of the rooms,
        and the others move there."""
        from .discovery import answers

        try:
            refused = 0
            while refused < CRASH_PROBES:
                if (
                    self.peer is not peer
                    or peer.is_connected
                    or peer.is_closed
                    or self._moving
                    or self._closing
                ):
                    return  # the link came back, or we moved already
                # Probed until the link is back: a dying process may still complete a
                # handshake on its listening socket for an instant after its links dropped.
                refused = 0 if await answers(self.host, self.port, PROBE_TIMEOUT) else refused + 1
                if refused < CRASH_PROBES:
                    await asyncio.sleep(PROBE_INTERVAL)
            if not self.hub_host:  # a hub of a cluster: any other one will do
                await self._fail_over(peer)
                return
            host = clean(self.hub_host or "the host", protocol.MAX_NICK + 8)
            for entry in list(self.successors):
                nick = clean(entry["nick"], protocol.MAX_NICK + 8)
                if protocol.nick_key(entry["nick"]) == protocol.nick_key(self.nick):
                    if await self._take_over_alone(host):
                        return
                elif await self._move(entry["address"], entry["port"], None,
                                      f"{host}'s hub stopped answering; now hosted by {nick}"):  # fmt: skip
                    return
            self._info(f"{host}'s hub stopped answering and nobody could take it over", "error")
        except Exception:  # a bug of ours must not leave the user stranded without a word
            logger.exception("could not find a new hub")
            self._info("the hub stopped answering and finding a new one failed (a bug: see the log)", "error")
        finally:
            self._watching = False
            self._status()

    async def _fail_over(self, peer: Client) -> None:
        """Our hub is gone: move to the next of the cluster's hubs that answers (then
        the others in turn, ours last), until one takes us or our own link is back."""
        from .discovery import answers

        start = self.hubs.index((self.host, self.port)) + 1 if (self.host, self.port) in self.hubs else 0
        order = self.hubs[start:] + self.hubs[:start]
        while not self._closing:
            for host, port in order:
                if self.peer is peer and peer.is_connected:
                    return  # our hub answered again after all
                gone = f"{self.host}:{self.port}"
                if await answers(host, port, PROBE_TIMEOUT) and await self._move(
                    host, port, None, f"hub {gone} gone; now on hub {host}:{port}"
                ):
                    return
            await asyncio.sleep(PROBE_INTERVAL)

    async def _take_over_alone(self, host: str) -> bool:
        """Start a hub from our own copy of the rooms (the host is gone: nothing was
        handed over) and move there."""
        if self.taker is None:
            return False
        rooms = [
            RoomState(room, view.seen, [stored(room, m) for m in view.log])
            for room, view in self.rooms.items()
        ]
        try:
            address, port, fp = await self.taker.start(rooms, self.hub_started)
        except Exception as exc:
            self._info(f"could not take the hub over: {describe(exc)}", "error")
            return False
        self.hosting = True
        return await self._move(
            address, port, fp, f"{host}'s hub stopped answering; now hosted by you ({self.nick})"
        )

    async def _move(
        self, host: str, port: int, fingerprint: str | None, text: str, *, fresh: bool = False
    ) -> bool:
        """The hub moved: connect to the new one, rejoin our rooms "since" what we showed
        (no gap, no duplicate) and re-send what is pending under the same mids (the new
        hub has the old one's mids: nothing is stored twice)."""
        if self._closing or self._moving:
            return False
        self._moving = True
        try:
            old = self.peer
            for task in (self._reader, self._pump):
                if task is not None and task is not asyncio.current_task():
                    task.cancel()
            self._backlog.clear()  # requests not sent: the says among them are pending
            for pending in self.pending.values():
                pending.acked = False  # a hub handing over drops what it gets: not delivered yet
            for rid, waiting in list(self._waiting.items()):
                if waiting.mid is None:  # a /who or the like: asked again by the user
                    del self._waiting[rid]
                    if not waiting.future.done():
                        waiting.future.set_result(
                            {"rid": rid, "ok": False, "error": "the hub moved: try again", "code": "moved"}
                        )
            self.state = "reconnecting"
            self._status()
            if old is not None:
                self._spawn(_quietly_close(old))
            self.host, self.port = host, port
            if self.tls is not None:
                from korinet.security import ClientTLS

                self.tls = ClientTLS(identity=self.tls.identity, known_hosts=self.tls.known_hosts,
                                     fingerprint=fingerprint, on_first_use=self.tls.on_first_use)  # fmt: skip
            try:
                self.peer = await Client.connect(host, port, plugins=self.plugins, tls=self.tls,
                                                 config=self.config, backoff_cap=self.backoff_cap,
                                                 open_timeout=MOVE_TIMEOUT)  # fmt: skip
            except KoriNetError as exc:
                self.state = "closed"
                self._info(f"could not reach the new hub at {host}:{port}: {describe(exc)}", "error")
                return False
            self.state = "connected"
            self._info(text)
            if fresh:  # another hub's numbers: join its rooms as new, not "since"
                self.rooms, self._mark = {}, {}
            self._reader = asyncio.get_running_loop().create_task(self._read())
            # If this hub goes too before it took us in, the link's loss ends the wait
            # (session_event) and the caller tries the next hub.
            registering = self._move_register = asyncio.ensure_future(self._register(first=False))
            try:
                await registering
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not registering.cancelled() or (current is not None and current.cancelling()):
                    raise
                self._info(f"the hub at {host}:{port} went away too", "error")
                return False
            finally:
                self._move_register = None
            return True
        except (ChatError, KoriNetError) as exc:
            self._info(f"could not join the new hub: {describe(exc)}", "error")
            return True
        finally:
            self._moving = False
            self._status()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ user actions

    def say(self, text: str, room: str | None = None, kind: str = "say") -> Pending:
        """Queue a room message (returns at once; it is pending until the hub's copy is back).

        Raises:
            ChatError: too long, or no room.
        """
        room = protocol.normalize_room(room) if room else self.current
        if room is None:
            raise ChatError("you are in no room: /join #general first")
        if room not in self.rooms and not (self._moving and room in self.wanted_rooms):
            raise ChatError(
                f"you are not in {protocol.display_room(room)} (/join {protocol.display_room(room)})"
            )
        _check_length(text)
        pending = Pending(f"{self._client_id}-{next(self._mids)}", text, room, kind=kind)
        self.pending[pending.mid] = pending
        if not self._moving:  # moving: sent to the new hub with the rest of what is pending
            self._request("say", mid=pending.mid, room=room, text=text, kind=kind)
        self._status()
        return pending

    def dm(self, to: str, text: str, kind: str = "say") -> asyncio.Future[dict[str, Any]]:
        """Queue a direct message; the future gets the hub's answer."""
        to = protocol.normalize_nick(to)
        _check_length(text)
        pending = Pending(f"{self._client_id}-{next(self._mids)}", text, None, to=to, kind=kind)
        self.pending[pending.mid] = pending
        if self._moving:  # sent to the new hub with the rest of what is pending
            pending.rid = next(self._rids)
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._waiting[pending.rid] = _Waiting(future, "dm", pending.mid)
        else:
            future = self._request("dm", mid=pending.mid, to=to, text=text, kind=kind)
        self._status()
        return future

    async def join(self, room: str) -> None:
        room = protocol.normalize_room(room)
        if room in self.rooms:
            self.current = room
            self._info(f"— now in {protocol.display_room(room)} —", room=room)
            self._status()
            return
        if room not in self.wanted_rooms:
            self.wanted_rooms.append(room)
        try:
            await self._join(room, announce=True)
        except ChatError:
            self.wanted_rooms.remove(room)
            raise
        self.current = room
        self._status()

    async def part(self, room: str | None = None) -> None:
        room = protocol.normalize_room(room) if room else self.current
        if room is None or room not in self.rooms:
            raise ChatError(f"you are not in {protocol.display_room(room) if room else 'any room'}")
        await self._ask("part", room=room)
        self.rooms.pop(room, None)
        if room in self.wanted_rooms:
            self.wanted_rooms.remove(room)
        self._info(f"— left {protocol.display_room(room)} —", room=room)
        if self.current == room:
            self.current = self.wanted_rooms[0] if self.wanted_rooms else None
            if self.current:
                self._info(f"— now in {protocol.display_room(self.current)} —", room=self.current)
        self._status()

    async def set_nick(self, nick: str) -> None:
        nick = protocol.normalize_nick(nick)
        result = await self._ask("nick", nick=nick)
        self._set_nick(result["nick"])
        if isinstance(result.get("dm_since"), int):
            self.dm_seen, self._dm_nick = None, None
            self._dms_from(result["dm_since"])
        self._info(f"you are now known as {clean(self.nick)}")

    async def who(self, room: str | None = None) -> list[dict[str, Any]]:
        room = protocol.normalize_room(room) if room else self.current
        if room is None:
            raise ChatError("who in which room? (/who #room)")
        result = await self._ask("who", room=room)
        members = [m for m in result.get("members", ()) if isinstance(m, dict)]
        self.members[result["room"]] = {str(m.get("nick")) for m in members}
        names = ", ".join(
            clean(m.get("nick"), 40)
            + ("" if m.get("state") == "online" else f" ({clean(m.get('state'), 20)})")
            for m in members
        )
        self._info(f"{clean(protocol.display_room(result['room']))}: {names or 'nobody'}")
        return members

    async def list_rooms(self) -> list[dict[str, Any]]:
        result = await self._ask("rooms")
        rooms = [r for r in result.get("rooms", ()) if isinstance(r, dict)]
        self._learn_rooms([r.get("room") for r in rooms])
        for r in rooms:
            self._info(
                f"{clean(protocol.display_room(str(r.get('room'))))}  "
                f"{r.get('members', 0)} here, {r.get('head', 0)} messages"
            )
        if not rooms:
            self._info("no rooms yet: /join #general")
        return rooms

    def _learn_rooms(self, names: Any) -> None:
        """Remember rooms the hub named (a list, or the hello's room -> head map)."""
        for name in names if isinstance(names, (list, dict)) else ():
            try:
                self.known_rooms.add(protocol.normalize_room(name))
            except ValueError:
                pass  # a hostile hub's junk never reaches the completer

    async def refresh_rooms(self, max_age: float = 2.0, timeout: float = 0.5) -> None:
        """Ask the hub for its rooms, quietly (for completion), unless that was done in
        the last ``max_age`` seconds or the link is down. Gives up after ``timeout``."""
        now = time.monotonic()
        if self.state != "connected" or self.peer is None or now - self._rooms_asked < max_age:
            return
        self._rooms_asked = now
        try:
            async with asyncio.timeout(timeout):
                result = await self._ask("rooms")
        except (ChatError, KoriNetError, TimeoutError):
            return
        self._learn_rooms([r.get("room") for r in result.get("rooms", ()) if isinstance(r, dict)])

    async def history(self, count: int = 20, room: str | None = None) -> None:
        room = protocol.normalize_room(room) if room else self.current
        if room is None:
            raise ChatError("history of which room? (/join one first)")
        result = await self._ask("history", room=room, limit=count)
        messages = [m for m in result.get("messages", ()) if _valid_msg(m)]
        self._info(f"— last {len(messages)} of {protocol.display_room(room)} —", room=room)
        for m in messages:
            self._emit(self._msg_line(m, "history"))

    async def search(self, query: str) -> None:
        result = await self._ask("search", query=query)
        messages = [m for m in result.get("messages", ()) if _valid_msg(m)]
        self._info(f"— {len(messages)} found for {clean(query, 60)!r} —")
        for m in messages:
            self._emit(self._msg_line(m, "history"))

    async def set_away(self, message: str | None) -> None:
        result = await self._ask("away", message=message or "")
        self.away = message or None
        self._info("you are away" if result.get("state") == "away" else "you are back")
        self._status()

    async def handle_input(self, text: str) -> bool:
        """Act on one line the user typed. Returns False when the user wants to quit.
        Mistakes become "error" lines, never exceptions."""
        text = text.rstrip("\r\n")
        if not text.strip():
            return True
        try:
            lines = paste_lines(text)
            if lines is not None:
                # A paste: every line is a message of its own, in order; a line that
                # starts with "/" is text here, never a command (a pasted "/quit"...).
                reason = check_input(text)
                if reason:
                    raise ChatError(reason)
                for line in lines:
                    self.say(line)
                return True
            if text.startswith("/") and not text.startswith("//"):
                return await self._command(text)
            self.say(text[1:] if text.startswith("//") else text)
        except (ChatError, ValueError) as exc:
            self._info(str(exc), "error")
        except KoriNetError as exc:
            self._info(f"not possible now: {describe(exc)}", "error")
        return True

    async def _command(self, text: str) -> bool:
        name, _, rest = text.partition(" ")
        name = _command_name(name)  # an unambiguous prefix works: /j #dev
        rest = rest.strip()
        if name == "/quit":
            return False
        if name == "/help":
            for usage in COMMANDS.values():
                self._info(usage)
        elif name == "/join":
            if not rest:
                raise ChatError("usage: /join #room")
            await self.join(rest.split()[0])
        elif name == "/part":
            await self.part(rest.split()[0] if rest else None)
        elif name == "/nick":
            if not rest:
                raise ChatError(f"you are {self.nick}; usage: /nick NAME")
            await self.set_nick(rest.split()[0])
        elif name == "/msg":
            to, _, body = rest.partition(" ")
            if not to or not body.strip():
                raise ChatError("usage: /msg NICK TEXT")
            result = await self.dm(to, body)
            if result.get("ok"):
                self._emit(
                    Line("dm", clean(body), nick=f"→ {clean(result.get('to'))}", ts=time.time(), own=True)
                )
        elif name == "/me":
            if not rest:
                raise ChatError("usage: /me ACTION")
            self.say(rest, kind="me")
        elif name == "/who":
            await self.who(rest.split()[0] if rest else None)
        elif name == "/rooms":
            await self.list_rooms()
        elif name == "/history":
            count = 20
            if rest:
                try:
                    count = max(1, min(int(rest.split()[0]), protocol.MAX_HISTORY))
                except ValueError:
                    raise ChatError("usage: /history [N]") from None
            await self.history(count)
        elif name == "/search":
            if not rest:
                raise ChatError("usage: /search WORDS")
            await self.search(rest)
        elif name == "/away":
            await self.set_away(rest or None)
        else:
            raise ChatError(
                f"unknown command {clean(name, 30)} (/help lists them; // sends a line starting with /)"
            )
        return True


async def _quietly_close(peer: Client) -> None:
    try:
        await peer.close(protocol.MOVED, timeout=1.0)
    except (KoriNetError, OSError):
        pass


def _check_length(text: str) -> None:
    if len(text) > protocol.MAX_TEXT:
        raise ChatError(f"message too long ({len(text)} > {protocol.MAX_TEXT} characters): not sent")


def paste_lines(text: str) -> list[str] | None:
    """The lines of a multi-line input (a paste), blank ones left out; None for one line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    if "\n" not in text:
        return None
    return [line for line in text.split("\n") if line.strip()]


def check_input(text: str) -> str | None:
    """Why ``text`` cannot be sent as typed (the UI keeps it in the input and shows
    this), or None when it can. Pure: only what is known without asking the hub."""
    lines = paste_lines(text)
    if lines is not None:
        for number, line in enumerate(lines, 1):
            if len(line) > protocol.MAX_TEXT:
                return (
                    f"line {number} of {len(lines)} is too long ({len(line)} > {protocol.MAX_TEXT} "
                    "characters): shorten or split it; nothing was sent"
                )
        return None
    text = text.strip("\r\n")
    name, _, rest = text.partition(" ")
    body, limit = text, protocol.MAX_TEXT
    if text.startswith("//"):
        body = text[1:]
    elif text.startswith("/"):
        command = _command_name(name)
        if command == "/msg":
            body = rest.strip().partition(" ")[2]
        elif command in ("/me", "/away"):
            body = rest.strip()
        elif command == "/search":
            body, limit = rest.strip(), protocol.MAX_QUERY
        else:
            return None
    if len(body) > limit:
        return f"too long ({len(body)} > {limit} characters): shorten or split it; nothing was sent"
    return None


def _command_name(word: str) -> str:
    """``/j`` -> ``/join``: a command or an unambiguous prefix of one, else as typed."""
    word = word.lower()
    matches = [c for c in COMMANDS if c.startswith(word)]
    return matches[0] if word not in COMMANDS and len(matches) == 1 else word


def describe(error: BaseException) -> str:
    """An error in words for the user, never a Python repr."""
    if isinstance(error, ConnectionClosed):
        try:
            why = CloseCode(error.code).name.lower().replace("_", " ")
        except ValueError:
            why = f"code {error.code}"
        if error.code == CloseCode.NORMAL:
            why = "the session ended"
        elif error.code == CloseCode.GOING_AWAY:
            why = "the hub shut down"
        return clean(f"{why} ({error.reason})" if error.reason else why, 300)
    if isinstance(error, MessageRejected):
        return clean(f"refused: {error.reason}", 300)
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno).lower()  # asyncio's own text carries a tuple
    if isinstance(error, TimeoutError) and not str(error):
        return "no answer in time"
    return clean(str(error) or type(error).__name__, 300)


def _valid_msg(data: Any) -> bool:
    try:
        protocol.validate_msg(data)
    except (TypeError, ValueError):
        return False
    return True
