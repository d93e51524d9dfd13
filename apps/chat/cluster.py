"""Chat rooms shared by several hubs through the cluster bus (docs/CHAT.md, "Several hubs").

What each hub puts on the bus (korinet.cluster):

* a **log per room** (``room_`` + the room name in hex): every room message is
  appended there with the sender's ``mid`` as the bus's ``msg_id``, so a hub
  re-publishing after a failure, or a client re-sending through another hub, is
  stored once. The entry's number in the log IS the room's sequence number: every
  hub follows the log, stores each entry in its own History under that number and
  fans it out to its own members in that order.
* the **key space** ``chat_nicks``: a nick is claimed there (value: a hash of the
  client's nick key, a secret the client made and sends only in its hello), renewed
  while the session lives, released when the client leaves; a hub that dies loses
  its nicks after the TTL. A session presenting the same key on another hub renews
  the entry instead of claiming it: the nick passes to it with no moment free.
* a **log per recipient of direct messages** (``dm_`` + the nick's key in hex): a DM
  is appended with its ``mid`` as the ``msg_id`` (a re-send through any hub is
  stored once); the recipient's hub follows the log while the recipient is there and
  hands each entry over with its number, which the client remembers: after a
  failover it says hello with the last number shown and gets what follows, once.
* the **key space** ``chat_members`` (same TTL as nicks; a key per nick and hub):
  who is on which hub, in which rooms, in which state (``/who``, ``/rooms`` and the join answer across hubs).
* the **log** ``chat_rooms``: every room a hub of the cluster followed, appended once
  per hub that first follows it (``/rooms`` reads it for the rooms of the cluster).
* the **signal** subject ``chat_presence``: joined, left, reconnecting, online,
  away and nick changes. Presence is a signal, not a log entry: the room's numbers
  must stay those of its messages only (a client holds everything after a gap in
  them until the gap is filled), and presence is never stored nor replayed today
  either. The price: an event sent while a hub's link to the bus is down is lost,
  and its order against messages from other hubs is not kept.

This module knows the bus and the encoding; the hub (hub.py) decides what to do
with what comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from korinet.cluster import Appended, BusError, ClusterBus, KeySpace, LogEntry

from . import protocol

__all__ = [
    "MEMBER_SPACE",
    "NICK_SPACE",
    "NICK_TTL",
    "PRESENCE",
    "ROOMS_LOG",
    "RoomCluster",
    "dm_log",
    "nick_name",
    "owner_of",
    "room_log",
]

logger = logging.getLogger(__name__)

NICK_SPACE = "chat_nicks"
#: A dead hub's nicks are free again after this many seconds; a live hub renews
#: every NICK_TTL / 3.
NICK_TTL = 30.0
PRESENCE = "chat_presence"
MEMBER_SPACE = "chat_members"
ROOMS_LOG = "chat_rooms"
#: Its first entry names the cluster (announced on mDNS, so clients find its hubs).
CLUSTER_LOG = "chat_cluster"
#: Seconds before following a room's log again after the bus failed us.
REFOLLOW_DELAY = 1.0


def room_log(room: str) -> str:
    """The bus name of a room's log (bus names are letters, digits, - and _)."""
    return "room_" + room.encode().hex()


def nick_name(nick: str) -> str:
    """The bus key of a nick (case-insensitive, any script)."""
    return "n" + protocol.nick_key(nick).encode().hex()


def dm_log(nick: str) -> str:
    """The bus name of the log of direct messages to ``nick``."""
    return "dm_" + protocol.nick_key(nick).encode().hex()


def owner_of(key: str) -> bytes:
    """What a nick is claimed with on the bus: a hash of the client's nick key (the
    key itself never reaches the bus, so reading the bus does not let one take a nick)."""
    return hashlib.sha256(key.encode()).hexdigest().encode()


def encode_dm(sender: str, to: str, text: str, kind: str, mid: str, ts: float) -> bytes:
    return json.dumps({"from": sender, "to": to, "text": text, "kind": kind, "mid": mid, "ts": ts}).encode()


def decode_dm(entry: LogEntry) -> dict[str, Any]:
    """A DM log entry as a ``chat.dm`` payload (with its number); an unreadable one
    still takes its number, as an unreadable line."""
    try:
        data = json.loads(entry.data)
        dm = {"from": str(data["from"])[:200], "to": str(data["to"])[:200],
              "text": str(data["text"])[: protocol.MAX_TEXT],
              "kind": data["kind"] if data.get("kind") in ("say", "me") else "say",
              "ts": float(data["ts"]), "mid": str(data["mid"])[: protocol.MAX_MID]}  # fmt: skip
    except (ValueError, TypeError, KeyError) as exc:
        logger.warning("cluster bus: unreadable DM entry (%s)", exc)
        dm = {"from": "?", "to": "?", "text": "(unreadable entry)", "kind": "say", "ts": 0.0, "mid": ""}
    dm["seq"] = entry.seq
    return dm


def encode_message(nick: str, text: str, kind: str, mid: str, ts: float) -> bytes:
    return json.dumps({"nick": nick, "text": text, "kind": kind, "mid": mid, "ts": ts}).encode()


def decode_message(data: bytes) -> dict[str, Any]:
    """A log entry as a message. An entry no hub of ours wrote still takes its number
    (the room's numbers have no gaps): it shows as an unreadable line."""
    try:
        entry = json.loads(data)
        if not isinstance(entry, dict):
            raise TypeError("not a map")
        message = {
            "nick": str(entry["nick"])[:200],
            "text": str(entry["text"])[: protocol.MAX_TEXT],
            "kind": entry["kind"] if entry.get("kind") in ("say", "me") else "say",
            "mid": str(entry["mid"])[: protocol.MAX_MID] if entry.get("mid") is not None else None,
            "ts": float(entry["ts"]),
        }
    except (ValueError, TypeError, KeyError) as exc:
        logger.warning("cluster bus: unreadable room entry (%s)", exc)
        return {"nick": "?", "text": "(unreadable entry)", "kind": "say", "mid": None, "ts": 0.0}
    return message


class _Follower:
    def __init__(self, applied: int) -> None:
        self.applied = applied
        #: (seq, waiter) by seq: each entry wakes only those waiting for it (one
        #: event for all would wake every waiter at every entry)
        self.waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self.task: asyncio.Task[None] | None = None

    def moved_to(self, seq: int) -> None:
        self.applied = seq
        while self.waiters and self.waiters[0][0] <= seq:
            _, _, waiter = heapq.heappop(self.waiters)
            if not waiter.done():
                waiter.set_result(None)


class RoomCluster:
    """One hub's part in the cluster: its followers, its nicks, its presence link.

    ``apply(room, entry)`` is the hub's: it stores the entry and fans it out, and is
    called once per entry, in order, per room."""

    def __init__(self, bus: ClusterBus, hub_id: str | None = None, *, nick_ttl: float = NICK_TTL) -> None:
        self.bus = bus
        self.hub_id = hub_id or secrets.token_hex(6)
        self.nick_ttl = nick_ttl
        self.nicks: KeySpace | None = None
        #: nick key -> the value we claimed it with (what the renewal keeps alive)
        self.held: dict[str, bytes] = {}
        self._followers: dict[str, _Follower] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # loops: presence, renewal
        self._errands: set[asyncio.Task[Any]] = set()  # one-shots: releases, signals
        self._started: asyncio.Task[None] | None = None
        self._order = itertools.count()  # ties between waiters for one seq
        self.members_space: KeySpace | None = None
        #: member key -> the entry this hub wants on the bus (None: gone), and what is there
        self.shown: dict[str, bytes | None] = {}
        self.shown_on_bus: dict[str, bytes] = {}
        self._showing: set[str] = set()
        self.cluster_rooms: set[str] = set()
        self._rooms_read = 0

    # ------------------------------------------------------------------ life

    async def start(self, on_presence: Callable[[dict[str, Any]], None]) -> None:
        """Connect to the bus (once; later calls wait for the first).

        Raises:
            BusError: the bus is unreachable.
        """
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._start(on_presence))
        await asyncio.shield(self._started)

    async def _start(self, on_presence: Callable[[dict[str, Any]], None]) -> None:
        await self.bus.connect()
        self.nicks = await self.bus.key_space(NICK_SPACE, self.nick_ttl)
        listener = await self.bus.listen(PRESENCE)
        self._spawn(self._listen(listener, on_presence))
        self._spawn(self._renew())

    async def ready(self) -> KeySpace:
        if self._started is None or self.nicks is None:
            if self._started is None:
                raise BusError("the hub's cluster link was not started")
            await asyncio.shield(self._started)
        assert self.nicks is not None
        return self.nicks

    async def close(self) -> None:
        """Stop following, give our nicks up (others may take them at once), disconnect."""
        self.stop()
        if self._errands:  # releases of sessions that just ended, among others
            await asyncio.wait(list(self._errands), timeout=5.0)
        if self.nicks is not None:
            for key, value in list(self.held.items()):
                with contextlib.suppress(BusError, Exception):
                    await self.nicks.release(key, value)
        if self.members_space is not None:
            for key, value in list(self.shown_on_bus.items()):
                with contextlib.suppress(BusError, Exception):
                    await self.members_space.release(key, value)
        self.held.clear()
        self.shown_on_bus.clear()
        with contextlib.suppress(Exception):
            await self.bus.close()

    def stop(self) -> None:
        """Stop at once, without a word to the bus (our nicks expire after the TTL)."""
        for task in list(self._tasks) + [f.task for f in self._followers.values() if f.task]:
            task.cancel()

    def _spawn(self, coro: Any, *, errand: bool = False) -> asyncio.Task[Any]:
        tasks = self._errands if errand else self._tasks
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    # ------------------------------------------------------------------ rooms

    def follow(self, room: str, after: int, apply: Callable[[str, LogEntry], None]) -> None:
        """Follow ``room``'s log from entry ``after`` on (the last one stored here), for
        as long as the hub runs: a room once followed stays complete in History."""
        if room in self._followers:
            return
        follower = self._followers[room] = _Follower(after)
        follower.task = asyncio.get_running_loop().create_task(self._follow(room, follower, apply))

    async def _follow(self, room: str, follower: _Follower, apply: Callable[[str, LogEntry], None]) -> None:
        log = room_log(room)
        while True:
            try:
                async for entry in self.bus.follow(log, follower.applied):
                    apply(room, entry)
                    follower.moved_to(entry.seq)
            except BusError as exc:
                logger.warning("cluster bus: following %s failed (%s); again soon", room, exc)
            except ValueError:  # History refused the entry: the log lost some (see History.put)
                logger.exception("cluster bus: cannot store %s's log here; no longer followed", room)
                return
            except Exception:  # a bug of ours must not silence the room for good
                logger.exception("cluster bus: following %s failed; again soon", room)
            await asyncio.sleep(REFOLLOW_DELAY)

    async def caught_up(self, room: str, seq: int) -> None:
        """Wait until this hub stored ``room``'s entries up to ``seq``."""
        follower = self._followers[room]
        if follower.applied >= seq:
            return
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(follower.waiters, (seq, next(self._order), waiter))
        await waiter

    def following(self, room: str) -> bool:
        return room in self._followers

    async def entry(self, room: str, seq: int) -> dict[str, Any] | None:
        """Entry ``seq`` of ``room``'s log, decoded; None if the log has no such entry."""
        found = await self.bus.read(room_log(room), seq - 1, 1)
        return decode_message(found[0].data) if found and found[0].seq == seq else None

    async def head(self, room: str) -> int:
        return await self.bus.head(room_log(room))

    async def append(self, room: str, nick: str, text: str, kind: str, mid: str, ts: float) -> Appended:
        return await self.bus.append(room_log(room), encode_message(nick, text, kind, mid, ts), msg_id=mid)

    # ------------------------------------------------------------------ nicks

    async def claim(self, nick: str, owner: bytes) -> str:
        """Take ``nick`` for the whole cluster. Returns "new" (it was free), "ours" (an
        earlier session of the same client held it: taken over) or "" (someone else
        holds it)."""
        nicks = await self.ready()
        key = nick_name(nick)
        if self.held.get(key) == owner:
            return "ours"
        if await nicks.claim(key, owner):
            got = "new"
        # Held with our owner value by an earlier session of the same client (on a hub
        # that died or that it left): renewing takes it over with no gap in which anyone
        # else could claim it.
        elif await nicks.renew(key, owner):
            got = "ours"
        else:
            return ""
        self.held[key] = owner
        return got

    def forget(self, nick: str, owner: bytes) -> None:
        """Stop renewing ``nick`` without releasing it: it expires after the TTL,
        unless a later session of the same client (on another hub) renews it."""
        key = nick_name(nick)
        if self.held.get(key) == owner:
            del self.held[key]

    def release(self, nick: str, owner: bytes) -> None:
        """Give ``nick`` up (in the background: the session is gone already)."""
        key = nick_name(nick)
        if self.held.get(key) != owner:
            return
        del self.held[key]
        if self.nicks is not None:
            self._spawn(self._release(self.nicks, key, owner), errand=True)

    @staticmethod
    async def _release(nicks: KeySpace, key: str, owner: bytes) -> None:
        try:
            await nicks.release(key, owner)
        except BusError as exc:
            logger.warning("cluster bus: could not free a nick (%s); it expires by itself", exc)

    async def _renew(self) -> None:
        nicks = await self.ready()
        while True:
            await asyncio.sleep(self.nick_ttl / 3)
            for key, owner in list(self.held.items()):
                try:
                    if not await nicks.renew(key, owner) and not await nicks.claim(key, owner):
                        logger.warning("cluster bus: nick %s expired and was taken elsewhere", key)
                except BusError as exc:
                    logger.warning("cluster bus: cannot renew nicks (%s)", exc)
                    break
            for key in list(self.shown_on_bus):
                if key not in self._showing:  # (an update in flight renews it anyway)
                    with contextlib.suppress(BusError):
                        await self._show_now(key)

    # ------------------------------------------------------------------ direct messages

    async def append_dm(self, sender: str, to: str, text: str, kind: str, mid: str, ts: float) -> Appended:
        return await self.bus.append(dm_log(to), encode_dm(sender, to, text, kind, mid, ts), msg_id=mid)

    async def dm_head(self, nick: str) -> int:
        return await self.bus.head(dm_log(nick))

    def follow_dms(
        self, nick: str, after: int, deliver: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> asyncio.Task[None]:
        """Hand every DM to ``nick`` numbered above ``after`` to ``deliver``, in order,
        until the task is cancelled (the member left or changed nick)."""
        return self._spawn(self._follow_dms(dm_log(nick), after, deliver))

    async def _follow_dms(
        self, log: str, after: int, deliver: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> None:
        while True:
            try:
                async for entry in self.bus.follow(log, after):
                    await deliver(decode_dm(entry))  # (may wait: the rest stays on the bus)
                    after = entry.seq
            except BusError as exc:
                logger.warning("cluster bus: following DMs failed (%s); again soon", exc)
            except Exception:  # a bug of ours must not silence someone's DMs for good
                logger.exception("cluster bus: following DMs failed; again soon")
            await asyncio.sleep(REFOLLOW_DELAY)

    # ------------------------------------------------------------------ who is where

    def show(self, nick: str, entry: dict[str, Any] | None) -> None:
        """Say on the bus that ``nick`` is on this hub as ``entry`` ({nick, state, away,
        rooms}), or (None) that it is not. Kept alive with the nicks; the latest wins.
        Each hub has its own entry for a nick (a member that moved may linger on its
        old hub until its session there ends)."""
        key = f"{nick_name(nick)}_{self.hub_id}"
        if entry is None:
            self.shown[key] = None
        else:
            self.shown[key] = json.dumps({**entry, "hub": self.hub_id}).encode()
        if key not in self._showing and self._started is not None:
            self._showing.add(key)
            self._spawn(self._show(key), errand=True)

    async def _show(self, key: str) -> None:
        try:
            await self.ready()
            while self.shown.get(key, None) != self.shown_on_bus.get(key):
                await self._show_now(key)
        except BusError as exc:
            logger.info("cluster bus: who is here was not updated (%s)", exc)
        finally:
            self._showing.discard(key)

    async def _show_now(self, key: str) -> None:
        members = await self.ready_members()
        wanted = self.shown.get(key)
        on_bus = self.shown_on_bus.get(key)
        if wanted == on_bus:
            if wanted is not None and not await members.renew(key, wanted):
                await members.claim(key, wanted)
            elif wanted is None:
                self.shown.pop(key, None)
            return
        if on_bus is not None:
            await members.release(key, on_bus)
            del self.shown_on_bus[key]
        if wanted is None:
            self.shown.pop(key, None)
        elif await members.claim(key, wanted) or await members.renew(key, wanted):
            self.shown_on_bus[key] = wanted
        else:  # shown by another hub still (a member who moved here): taken at a renewal
            self.shown_on_bus[key] = wanted
            logger.info("cluster bus: %s is still shown on another hub", key)

    async def ready_members(self) -> KeySpace:
        await self.ready()
        if self.members_space is None:
            self.members_space = await self.bus.key_space(MEMBER_SPACE, self.nick_ttl)
        return self.members_space

    async def everyone(self) -> list[dict[str, Any]]:
        """Who every hub of the cluster says is on it (this hub's own entries included)."""
        members = await self.ready_members()
        found = []
        for data in (await members.items()).values():
            try:
                entry = json.loads(data)
                found.append({
                    "nick": str(entry["nick"])[:200], "state": str(entry["state"])[:20],
                    "away": None if entry.get("away") is None else str(entry["away"])[: protocol.MAX_TEXT],
                    "rooms": [str(r) for r in entry["rooms"]][:1000], "hub": str(entry["hub"]),
                })  # fmt: skip
            except (ValueError, TypeError, KeyError) as exc:
                logger.info("cluster bus: a bad member entry was ignored (%s)", exc)
        return found

    async def cluster_id(self) -> str:
        """The cluster's name, the same for every hub on this bus: the first hub to
        ask makes it (racing hubs append under one msg_id; the log's first entry wins)."""
        await self.ready()
        await self.bus.append(CLUSTER_LOG, secrets.token_hex(8).encode(), msg_id="cluster-id")
        first = await self.bus.read(CLUSTER_LOG, 0, 1)
        return first[0].data.decode("ascii", "replace")[:64]

    # ------------------------------------------------------------------ the cluster's rooms

    async def add_room(self, room: str) -> None:
        """Put ``room`` in the cluster's list of rooms (once per hub that follows it)."""
        await self.bus.append(ROOMS_LOG, room.encode(), msg_id=f"room-{self.hub_id}-{room.encode().hex()}")

    async def all_rooms(self) -> set[str]:
        """Every room a hub of the cluster ever followed (read on from where we were)."""
        while True:
            entries = await self.bus.read(ROOMS_LOG, self._rooms_read, 1000)
            for entry in entries:
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    self.cluster_rooms.add(protocol.normalize_room(entry.data.decode()))
                self._rooms_read = entry.seq
            if len(entries) < 1000:
                return set(self.cluster_rooms)

    # ------------------------------------------------------------------ presence

    def announce(self, event: dict[str, Any], rooms: list[str]) -> None:
        """Tell the other hubs (fire and forget: presence is never stored)."""
        if self._started is None or not rooms:
            return
        data = json.dumps({"hub": self.hub_id, "rooms": rooms, "event": event}).encode()
        self._spawn(self._signal(data), errand=True)

    async def _signal(self, data: bytes) -> None:
        try:
            await self.ready()
            await self.bus.signal(PRESENCE, data)
        except BusError as exc:
            logger.info("cluster bus: a presence event was not sent (%s)", exc)

    async def _listen(self, listener: Any, on_presence: Callable[[dict[str, Any]], None]) -> None:
        try:
            async for data in listener:
                try:
                    signal = json.loads(data)
                    if signal.get("hub") == self.hub_id:
                        continue
                    event = signal["event"]
                    protocol.validate_event(event)
                    rooms = [protocol.normalize_room(r) for r in signal["rooms"]]
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    logger.info("cluster bus: a bad presence signal was ignored (%s)", exc)
                    continue
                on_presence({"event": event, "rooms": rooms})
        finally:
            with contextlib.suppress(Exception):
                await listener.close()
