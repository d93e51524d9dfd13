"""Audio channels across hubs, through the cluster bus (korinet.cluster, docs/CLUSTER.md).

An :class:`~korinet_audio.hub.AudioHub` given a bus has a :class:`ChannelBus`. For
each channel with a member on this hub it opens three things on the bus (``<hex>``
is the channel name in hex: any channel name as one bus token):

* **frames**, signal subject ``audio_f_<hex>``: each live frame a local talker sends
  is signalled as ``[hub_id, frame]`` (``src`` set) if another hub has members in the
  channel; frames signalled by other hubs go to the local members on the realtime
  lane. Signals are never kept: a hub not listening at that moment never gets them,
  as a listener whose link is down never gets a live frame. A hub hears its own
  signals too and drops them by the hub id (its members had them directly).
* **members**, signal subject ``audio_m_<hex>``: ``{"hub", "n", "hello", "members":
  [[name, codecs], ...]}``, sent whenever this hub's members of the channel change,
  and every ``refresh`` seconds. A hub opening the channel says ``hello`` and every
  other hub answers at once. A hub's members are forgotten ``3 * refresh`` seconds
  after its last word (it died without a bye), or at once on its bye (an empty list).
  Signals, not a key space: rosters change by push within one hop of the bus (a key
  space would have to be polled, a round trip per key on NATS), and membership is
  soft state each hub holds anyway: the refresh mends a lost signal or a dead hub.
  The codecs travel with the names, so the roster's codec choice spans the hubs.
* **push-to-talk**, log ``audio_p_<hex>``: each utterance part a local talker sends
  is appended as ``{"hub", "part"}`` with msg_id ``SESSION:STREAM:UTTERANCE:FIRST_SEQ``
  (a part re-sent within the bus's duplicate window is stored once). Each hub follows
  the log from where it stood when it opened the channel and posts each part of
  another hub's talker to its local members on the reliable lane, connected or not,
  as for a local talker: a detached member's session replays it on resume, once.
  Local members got local parts directly (no bus round trip); appended anyway, always,
  so that no other hub depends on soft state to get them. The log keeps parts for
  ``ptt_keep`` seconds and at most PTT_MAX_BYTES (its Retention, set each time a hub
  opens the channel): a hub reads it only from where it stood when it opened the
  channel, so older parts serve only a hub cut from the bus for that long, and a
  listener hears a missed utterance from their own hub's session, not from the log.

The order of opening is what makes a roster trustworthy: a hub listens to frames and
members before it says hello, so a hub that has heard of another's members knows that
hub is listening to the channel's frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Collection, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgpack

from korinet.cluster import BusError, ClusterBus, Listener, Retention

from .frames import AudioFrame, MalformedFrame, UtterancePart

if TYPE_CHECKING:
    from .hub import AudioHub

__all__ = ["PTT_KEEP", "PTT_MAX_BYTES", "REFRESH", "ChannelBus", "channel_subjects"]

logger = logging.getLogger(__name__)

#: seconds between two announcements of a hub's members of a channel
REFRESH: Final = 2.0
#: frames waiting to be signalled before the newest are dropped (realtime: never a backlog)
OUTBOX_FRAMES: Final = 200
#: most members one hub may announce in a channel (a bound on what we keep per hub)
MAX_REMOTE_MEMBERS: Final = 1000
#: seconds before a link that failed (listeners, log) is opened again
RETRY: Final = 1.0
#: seconds a push-to-talk log keeps a part (``serve --ptt-keep``): much longer than a
#: hub's usual cut from the bus, and than a session waits for a listener (120 s)
PTT_KEEP: Final = 900.0
#: bytes a push-to-talk log keeps at most, per channel (about 30 minutes of pcm16 talk)
PTT_MAX_BYTES: Final = 64 * 2**20
#: seconds a cancelled task has to end (its clean-up: a bus unsubscribes within 2 s)
#: before it is cancelled again (see _cancel_and_wait)
CANCEL_PATIENCE = 5.0


def channel_subjects(channel: str) -> tuple[str, str, str]:
    """The frames subject, the members subject and the push-to-talk log of a channel."""
    key = channel.encode().hex()
    return f"audio_f_{key}", f"audio_m_{key}", f"audio_p_{key}"


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@dataclass(slots=True)
class _Remote:
    """One other hub's members of a channel."""

    members: list[tuple[str, tuple[str, ...]]]
    n: int
    expires: float


@dataclass(slots=True)
class _Link:
    """A channel on the bus, while it has a member on this hub."""

    channel: str
    frames: str
    members: str
    log: str
    remote: dict[str, _Remote] = field(default_factory=dict)  # hub id -> its members
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    log_seq: int | None = None  # the last entry of the log handled (None: not opened yet)


def _parse_members(obj: Any) -> list[tuple[str, tuple[str, ...]]]:
    """A hub's member list from the bus, checked as a join request is.

    Raises:
        ValueError: not a list of ``[name, codecs]``.
    """
    from .hub import parse_join

    if not isinstance(obj, list) or len(obj) > MAX_REMOTE_MEMBERS:
        raise ValueError("members must be a list")
    members = []
    for item in obj:
        if not isinstance(item, list) or len(item) != 2:
            raise ValueError("a member is [name, codecs]")
        _, name, codecs = parse_join({"channel": "x", "name": item[0], "codecs": item[1]})
        members.append((name, codecs))
    return members


class ChannelBus:
    """An AudioHub's channels on the cluster bus (see the module docstring).

    Args:
        hub: the AudioHub (its members, its stats; it gets ``frame_in``, ``part_in``
            and ``remote_changed`` from here).
        bus: a connected cluster bus.
        hub_id: this hub on the bus (default: random); unique among the hubs.
        refresh: seconds between announcements of our members (the tests shorten it).
        ptt_keep: seconds the channels' push-to-talk logs keep a part.
    """

    def __init__(
        self,
        hub: AudioHub,
        bus: ClusterBus,
        hub_id: str | None = None,
        *,
        refresh: float = REFRESH,
        ptt_keep: float = PTT_KEEP,
    ) -> None:
        self.hub = hub
        self.bus = bus
        self.hub_id = hub_id or secrets.token_hex(6)
        self.refresh = refresh
        self.ptt_retention = Retention(max_age=ptt_keep, max_bytes=PTT_MAX_BYTES)
        self.links: dict[str, _Link] = {}
        self._n = 0  # counts our member announcements: a late, older one is ignored
        self._outbox: asyncio.Queue[tuple[str, bytes]] | None = None
        self._appends: asyncio.Queue[tuple[str, bytes, str]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<ChannelBus hub {self.hub_id} on {self.bus.address}>"

    # ------------------------------------------------------------------ from the hub

    def members_changed(self, channel: str) -> None:
        """This hub's members of ``channel`` changed: open the channel on the bus, tell
        the others, or close it when the last local member has left."""
        if self._closed:
            return
        here = channel in self.hub.channels
        link = self.links.get(channel)
        if here and link is None:
            self._start()
            link = self.links[channel] = _Link(channel, *channel_subjects(channel))
            link.task = self._spawn(self._run_link(link))  # says hello once it listens
        elif here and link is not None and link.ready.is_set():
            self._spawn(self._say_members(link))
        elif not here and link is not None:
            del self.links[channel]
            if link.task is not None:
                link.task.cancel()
            self._spawn(self._say_members(link, bye=True))

    def remote_members(self, channel: str) -> list[tuple[str, tuple[str, ...]]]:
        """Other hubs' members of ``channel`` (name, codecs), ordered by hub."""
        link = self.links.get(channel)
        if link is None:
            return []
        return [m for hub in sorted(link.remote) for m in link.remote[hub].members]

    def frame_out(self, channel: str, wire: list[Any]) -> None:
        """A local talker's frame (``src`` set): signal it if another hub has members in
        the channel; dropped and counted if the bus is backed up."""
        link = self.links.get(channel)
        if link is None or not link.remote or self._outbox is None:
            return
        try:
            self._outbox.put_nowait((link.frames, _pack([self.hub_id, wire])))
        except asyncio.QueueFull:
            self.hub.stats.frames_bus_dropped += 1

    def part_out(self, channel: str, session_id: Any, part: UtterancePart) -> None:
        """A local talker's utterance part (``src`` set): append it to the channel's log."""
        link = self.links.get(channel)
        if link is None or self._appends is None:
            return
        msg_id = f"{session_id}:{part.stream}:{part.utterance}:{part.first_seq}"
        self._appends.put_nowait((link.log, _pack({"hub": self.hub_id, "part": part.to_wire()}), msg_id))

    async def close(self) -> None:
        """Say bye in every open channel (the others drop our members at once), stop."""
        self._closed = True
        links = list(self.links.values())
        self.links.clear()
        for link in links:
            if link.task is not None:
                link.task.cancel()
        with contextlib.suppress(BusError, TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.gather(*(self._say_members(link, bye=True) for link in links))
        await _cancel_and_wait(self._tasks)

    # ------------------------------------------------------------------ tasks

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start(self) -> None:
        if self._outbox is not None:
            return
        self._outbox = asyncio.Queue(OUTBOX_FRAMES)
        self._appends = asyncio.Queue()
        self._spawn(self._send_frames(self._outbox))
        self._spawn(self._append_parts(self._appends))
        self._spawn(self._refresh())

    async def _send_frames(self, outbox: asyncio.Queue[tuple[str, bytes]]) -> None:
        while True:
            subject, data = await outbox.get()
            try:
                await self.bus.signal(subject, data)
                self.hub.stats.frames_to_bus += 1
            except BusError as exc:
                self.hub.stats.frames_bus_dropped += 1
                logger.debug("frame not signalled: %s", exc)

    async def _append_parts(self, appends: asyncio.Queue[tuple[str, bytes, str]]) -> None:
        # one at a time: a talker's parts are stored in the order they came
        while True:
            log, data, msg_id = await appends.get()
            try:
                await self.bus.append(log, data, msg_id=msg_id)
                self.hub.stats.utterances_to_bus += 1
            except BusError as exc:  # the bus retried for 30 s already
                self.hub.stats.utterances_bus_failed += 1
                logger.warning("push-to-talk part not stored on the bus (other hubs miss it): %s", exc)

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.refresh)
            now = loop.time()
            for link in list(self.links.values()):
                if link.ready.is_set():
                    self._spawn(self._say_members(link))
                gone = [hub for hub, remote in link.remote.items() if remote.expires <= now]
                for hub in gone:
                    logger.info("#%s: hub %s went quiet, its members are gone", link.channel, hub)
                    del link.remote[hub]
                if gone:
                    self.hub.remote_changed(link.channel)

    # ------------------------------------------------------------------ one channel

    async def _run_link(self, link: _Link) -> None:
        """Listen to the channel's frames and members, follow its log; again after a
        failure of the bus, until the channel closes here (the task is cancelled)."""
        while True:
            listeners: list[Listener] = []
            tasks: list[asyncio.Task[None]] = []
            try:
                frames = await self.bus.listen(link.frames)
                listeners.append(frames)
                members = await self.bus.listen(link.members)
                listeners.append(members)
                await self.bus.retain(link.log, self.ptt_retention)
                if link.log_seq is None:  # parts said before we opened are not ours to play
                    link.log_seq = await self.bus.head(link.log)
                loop = asyncio.get_running_loop()
                tasks = [
                    loop.create_task(self._frames_in(link, frames)),
                    loop.create_task(self._members_in(link, members)),
                    loop.create_task(self._parts_in(link)),
                ]
                link.ready.set()
                await self._say_members(link, hello=True)
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # raises what stopped it
                logger.warning("#%s: the bus stopped a listener; listening again", link.channel)
            except (BusError, OSError) as exc:
                logger.warning("#%s on the cluster bus: %s; again in %.0f s", link.channel, exc, RETRY)
            finally:
                link.ready.clear()
                await _cancel_and_wait(tasks)
                for listener in listeners:
                    with contextlib.suppress(Exception):
                        await listener.close()
            await asyncio.sleep(RETRY)

    async def _say_members(self, link: _Link, *, hello: bool = False, bye: bool = False) -> None:
        channel = None if bye else self.hub.channels.get(link.channel)
        members = [[m.name, list(m.codecs)] for m in channel.members.values()] if channel else []
        self._n += 1
        data = _pack({"hub": self.hub_id, "n": self._n, "hello": hello, "members": members})
        try:
            await self.bus.signal(link.members, data)
        except BusError as exc:
            logger.debug("#%s: members not announced (the refresh will): %s", link.channel, exc)

    async def _members_in(self, link: _Link, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        async for data in listener:
            try:
                obj = _unpack(data)
                hub, n = obj["hub"], obj["n"]
                if not isinstance(hub, str) or type(n) is not int:
                    raise ValueError("hub and n")
                members = _parse_members(obj["members"])
            except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
                logger.debug("#%s: a malformed member list on the bus: %s", link.channel, exc)
                continue
            if hub == self.hub_id:
                continue
            if obj.get("hello") is True:
                self._spawn(self._say_members(link))  # a hub opening the channel: who is here
            known = link.remote.get(hub)
            if known is not None and n <= known.n:
                continue  # an older announcement overtaken by a newer one
            before = known.members if known is not None else []
            if members:
                link.remote[hub] = _Remote(members, n, loop.time() + 3 * self.refresh)
            else:
                link.remote.pop(hub, None)
            if members != before:
                self.hub.remote_changed(link.channel)

    async def _frames_in(self, link: _Link, listener: Listener) -> None:
        async for data in listener:
            try:
                hub, wire = _unpack(data)
                if hub == self.hub_id:
                    self.hub.stats.frames_own_ignored += 1
                    continue
                frame = AudioFrame.parse(wire)
                if not frame.src:
                    raise MalformedFrame("a frame from a hub names its talker")
            except (ValueError, TypeError, msgpack.UnpackException):
                self.hub.stats.frames_malformed += 1
                continue
            self.hub.stats.frames_from_bus += 1
            self.hub.frame_in(link.channel, frame)

    async def _parts_in(self, link: _Link) -> None:
        """Every part appended after we opened the channel, once, in the log's order."""
        while True:
            try:
                async for entry in self.bus.follow(link.log, link.log_seq or 0):
                    link.log_seq = entry.seq
                    self._part_entry(link, entry.data)
            except BusError as exc:
                logger.warning("#%s: following push-to-talk: %s; again in %.0f s", link.channel, exc, RETRY)
            await asyncio.sleep(RETRY)

    def _part_entry(self, link: _Link, data: bytes) -> None:
        try:
            obj = _unpack(data)
            if obj["hub"] == self.hub_id:
                return  # our talker's: our members had it when it came
            part = UtterancePart.parse(obj["part"])
            if not part.src:
                raise MalformedFrame("a part from a hub names its talker")
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            logger.warning("#%s: a malformed push-to-talk entry on the bus: %s", link.channel, exc)
            return
        self.hub.stats.utterances_from_bus += 1
        self.hub.part_in(link.channel, part)


async def _cancel_and_wait(tasks: Collection[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended.

    A task still running CANCEL_PATIENCE after its cancel is cancelled again: on
    Python 3.11, ``asyncio.wait_for`` (used inside the NATS client) swallows a
    cancellation that lands just as what it waits for completes, and the task then
    goes on (here: follows its log forever, and closing the hub hung). A task
    cancelled already (by close(), while it cleans up) is given its patience first:
    a second cancel would cut its clean-up short."""
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        if not task.cancelling():
            task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=CANCEL_PATIENCE)
        for task in pending:
            logger.debug("%r did not end on its cancel; cancelling it again", task)
            task.cancel()
