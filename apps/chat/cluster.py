"""Chat rooms shared by several hubs through the cluster bus (docs/CHAT.md, "Several hubs").

What each hub puts on the bus (korinet.cluster):

* a **log per room** (``room_`` + the room name in hex): every room message is
  appended there with the sender's ``mid`` as the bus's ``msg_id``, so a hub
  re-publishing after a failure, or a client re-sending through another hub, is
  stored once. The entry's number in the log IS the room's sequence number: every
  hub follows the log, stores each entry in its own History under that number and
  fans it out to its own members in that order.
* the **key space** ``chat_nicks``: a nick is claimed there (value: hub id and
  session id), renewed while the session lives, released when it ends; a hub that
  dies loses its nicks after the TTL.
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
import heapq
import itertools
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

from korinet.cluster import Appended, BusError, ClusterBus, KeySpace, LogEntry

from . import protocol

__all__ = ["NICK_SPACE", "NICK_TTL", "PRESENCE", "RoomCluster", "nick_name", "room_log"]

logger = logging.getLogger(__name__)

NICK_SPACE = "chat_nicks"
#: A dead hub's nicks are free again after this many seconds; a live hub renews
#: every NICK_TTL / 3.
NICK_TTL = 30.0
PRESENCE = "chat_presence"
#: Seconds before following a room's log again after the bus failed us.
REFOLLOW_DELAY = 1.0


def room_log(room: str) -> str:
    """The bus name of a room's log (bus names are letters, digits, - and _)."""
    return "room_" + room.encode().hex()


def nick_name(nick: str) -> str:
    """The bus key of a nick (case-insensitive, any script)."""
    return "n" + protocol.nick_key(nick).encode().hex()


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
        self.held.clear()
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

    def owner(self, session_id: str | None) -> bytes:
        return f"{self.hub_id}/{session_id}".encode()

    async def claim(self, nick: str, owner: bytes) -> bool:
        """Take ``nick`` for the whole cluster; False if any hub holds it."""
        nicks = await self.ready()
        key = nick_name(nick)
        if self.held.get(key) == owner:
            return True
        if not await nicks.claim(key, owner):
            return False
        self.held[key] = owner
        return True

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
