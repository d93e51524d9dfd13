"""The intercom hub: channels of talkers, and the fan-out of their audio.

One :class:`AudioHub` per KoriNet :class:`~korinet.Hub` (so ``korinet serve`` hosts
the intercom too, and so does ``korinet-audio serve``). It is driven by the message
handlers of plugin.py, in the runtime's event loop:

* ``audio.join`` (reliable request): a session joins a channel under a name; the
  reply and a roster to every member say who is there and which codec each talker
  should use (the best one every other member can decode).
* ``audio.frame`` (realtime): checked, stamped with the talker's name and sent on
  the realtime lane to every other member. A member whose link is down or backed
  up does not get it (the runtime drops and counts it): never queued, never replayed.
* ``audio.utterance`` (reliable, push-to-talk): stamped and posted on the reliable
  lane to every other member, connected or not: a detached member's session keeps it
  and replays it when the member comes back, exactly once.

A member stays in its channel while its session is detached and leaves when the
session ends (``korinet_session_closed``).

Given a cluster bus, the hub shares its channels with the hubs on it (cluster.py):
frames of remote talkers arrive by ``frame_in``, their utterance parts by
``part_in``, and the roster names and negotiates with the members of every hub.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Final

from korinet import KoriNetError, post_many, send_realtime_many
from korinet.cluster import ClusterBus

from .cluster import PTT_KEEP, REFRESH, ChannelBus
from .codecs import negotiate
from .frames import AudioFrame, MalformedFrame, UtterancePart
from .plugin import FRAME, ROSTER, UTTERANCE

__all__ = ["AudioHub", "HubStats", "Member", "parse_join"]

logger = logging.getLogger(__name__)

_CHANNEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,32}\Z")
#: Frames a talker may send per second before the hub drops the excess (2x real time).
MAX_FRAME_RATE: Final = 100.0


def parse_join(obj: Any) -> tuple[str, str, tuple[str, ...]]:
    """Check an ``audio.join`` request: ``{"channel", "name", "codecs"}``.

    Raises:
        ValueError: with a reason the joining user can read.
    """
    if not isinstance(obj, dict):
        raise ValueError("a join request is a map")
    channel, name, codecs = obj.get("channel"), obj.get("name"), obj.get("codecs")
    if not isinstance(channel, str) or not _CHANNEL.match(channel):
        raise ValueError("the channel name must be 1-32 letters, digits, '.', '_' or '-'")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError("the name must be 1-32 printable characters")
    if (
        not isinstance(codecs, list | tuple)
        or not 0 < len(codecs) <= 8
        or not all(isinstance(c, str) and 0 < len(c) <= 16 for c in codecs)
    ):
        raise ValueError("codecs must list 1-8 codec names")
    return channel, name, tuple(codecs)


@dataclass(slots=True)
class Member:
    peer: Any
    name: str
    channel: str
    codecs: tuple[str, ...]
    tokens: float = MAX_FRAME_RATE
    refilled: float = 0.0


@dataclass(slots=True)
class HubStats:
    frames_in: int = 0
    frames_out: int = 0
    frames_dropped: int = 0  # a member's link was down or backed up
    frames_malformed: int = 0
    frames_over_rate: int = 0
    frames_not_joined: int = 0
    utterances_in: int = 0
    utterances_out: int = 0
    utterances_dropped: int = 0  # a member's send window was full
    # on the cluster bus
    frames_to_bus: int = 0
    frames_from_bus: int = 0
    frames_own_ignored: int = 0  # our own signals, heard back
    frames_bus_dropped: int = 0  # the bus was backed up or down
    utterances_to_bus: int = 0
    utterances_from_bus: int = 0
    utterances_bus_failed: int = 0  # not stored: other hubs miss them


@dataclass(slots=True)
class Channel:
    name: str
    members: dict[Any, Member] = field(default_factory=dict)  # peer -> member, in join order


class AudioHub:
    """Channels and fan-out (see the module docstring).

    Args:
        bus: a connected cluster bus to share channels with the hubs on it; None:
            this hub's channels are its own.
        hub_id: this hub on the bus (default: random).
        refresh: seconds between two announcements of our members on the bus.
        ptt_keep: seconds the bus keeps a push-to-talk part (cluster.py).
    """

    def __init__(
        self,
        *,
        bus: ClusterBus | None = None,
        hub_id: str | None = None,
        refresh: float = REFRESH,
        ptt_keep: float = PTT_KEEP,
    ) -> None:
        self.channels: dict[str, Channel] = {}
        self.members: dict[Any, Member] = {}
        self.stats = HubStats()
        self.cluster = (
            ChannelBus(self, bus, hub_id, refresh=refresh, ptt_keep=ptt_keep) if bus is not None else None
        )

    async def close(self) -> None:
        """Leave the cluster bus (the bus itself stays open: its owner closes it)."""
        if self.cluster is not None:
            await self.cluster.close()

    # ------------------------------------------------------------------ membership

    def join(self, peer: Any, request: Any) -> dict[str, Any]:
        """Put ``peer`` in a channel (leaving any other); returns the join reply.

        Raises:
            ValueError: a malformed request (the talker's request fails with it).
        """
        channel_name, wanted, codecs = parse_join(request)
        self.leave(peer, announce=True)
        channel = self.channels.setdefault(channel_name, Channel(channel_name))
        taken = {m.name for m in channel.members.values()}
        if self.cluster is not None:  # a race between two hubs can still give one name twice
            taken.update(name for name, _ in self.cluster.remote_members(channel_name))
        name, n = wanted, 2
        while name in taken:
            name, n = f"{wanted}-{n}", n + 1
        member = Member(peer, name, channel_name, codecs, refilled=peer.loop.time())
        channel.members[peer] = member
        self.members[peer] = member
        logger.info("%s joined #%s as %s (codecs %s)", _who(peer), channel_name, name, ",".join(codecs))
        self._announce(channel, skip=peer)
        if self.cluster is not None:
            self.cluster.members_changed(channel_name)
        return {"channel": channel_name, "name": name, **self._roster(channel, member)}

    def leave(self, peer: Any, *, announce: bool = True) -> None:
        member = self.members.pop(peer, None)
        if member is None:
            return
        channel = self.channels.get(member.channel)
        if channel is None:
            return
        channel.members.pop(peer, None)
        logger.info("%s left #%s", member.name, channel.name)
        if not channel.members:
            del self.channels[channel.name]
        elif announce:
            self._announce(channel)
        if self.cluster is not None:
            self.cluster.members_changed(channel.name)

    def remote_changed(self, channel_name: str) -> None:
        """Another hub's members of a channel changed (cluster.py): a new roster."""
        channel = self.channels.get(channel_name)
        if channel is not None:
            self._announce(channel)

    def _roster(self, channel: Channel, member: Member) -> dict[str, Any]:
        others = [m.codecs for m in channel.members.values() if m is not member]
        names = [m.name for m in channel.members.values()]
        if self.cluster is not None:
            remote = self.cluster.remote_members(channel.name)
            others += [codecs for _, codecs in remote]
            names += [name for name, _ in remote]
        return {"members": names, "codec": negotiate(member.codecs, others)}

    def _announce(self, channel: Channel, skip: Any = None) -> None:
        """Tell every member who is there and which codec to send with (reliable)."""
        for member in list(channel.members.values()):
            if member.peer is skip:
                continue
            try:
                member.peer.post(self._roster(channel, member), ROSTER)
            except KoriNetError as exc:
                logger.warning("cannot send the roster to %s: %s", member.name, exc)

    # ------------------------------------------------------------------ audio

    def on_frame(self, peer: Any, obj: Any) -> None:
        """A live frame from a talker: check it, fan it out on the realtime lane."""
        self.stats.frames_in += 1
        member = self.members.get(peer)
        if member is None:
            self.stats.frames_not_joined += 1
            return
        try:
            frame = AudioFrame.parse(obj)
        except MalformedFrame:
            self.stats.frames_malformed += 1
            return
        if not self._admit(member, peer.loop.time()):
            self.stats.frames_over_rate += 1
            return
        wire = frame.with_src(member.name).to_wire()
        others = [m.peer for m in self.channels[member.channel].members.values() if m is not member]
        self._send_frame(others, wire)
        if self.cluster is not None:
            self.cluster.frame_out(member.channel, wire)

    def frame_in(self, channel_name: str, frame: AudioFrame) -> None:
        """A live frame of another hub's talker (cluster.py): to every member here."""
        channel = self.channels.get(channel_name)
        if channel is not None:
            self._send_frame([m.peer for m in channel.members.values()], frame.to_wire())

    def _send_frame(self, peers: list[Any], wire: list[Any]) -> None:
        sent = send_realtime_many(peers, wire, FRAME)  # encoded once per codec
        self.stats.frames_out += sent
        self.stats.frames_dropped += len(peers) - sent

    def _admit(self, member: Member, now: float) -> bool:
        # a token bucket: a talker cannot make the hub fan out more than 2x real time
        member.tokens = min(MAX_FRAME_RATE, member.tokens + (now - member.refilled) * MAX_FRAME_RATE)
        member.refilled = now
        if member.tokens < 1.0:
            return False
        member.tokens -= 1.0
        return True

    def on_utterance(self, peer: Any, obj: Any) -> None:
        """A push-to-talk utterance part: post it on the reliable lane to every other
        member, connected or not (a detached session replays it on resume)."""
        member = self.members.get(peer)
        if member is None:
            return
        part = UtterancePart.parse(obj).with_src(member.name)  # already validated by the message type
        self.stats.utterances_in += 1
        others = [m for m in self.channels[member.channel].members.values() if m is not member]
        self._post_part(others, part)
        if self.cluster is not None:
            self.cluster.part_out(member.channel, peer.session_id, part)

    def part_in(self, channel_name: str, part: UtterancePart) -> None:
        """An utterance part of another hub's talker, from the channel's log (cluster.py):
        to every member here, connected or not, as for a talker of ours."""
        channel = self.channels.get(channel_name)
        if channel is not None:
            self._post_part(list(channel.members.values()), part)

    def _post_part(self, others: list[Member], part: UtterancePart) -> None:
        result = post_many([m.peer for m in others], part.to_wire(), UTTERANCE)  # encoded once per codec
        self.stats.utterances_out += len(result.queued)
        self.stats.utterances_dropped += len(result.failed)
        for other in others:
            error = result.failed.get(other.peer)
            if error is not None:
                logger.warning("utterance part for %s dropped: %s", other.name, error)


def _who(peer: Any) -> str:
    return str(getattr(peer, "peername", None) or peer)
