"""The korinet-audio plugin: its message types and hooks.

Every KoriNet process loads this module, so it stays cheap: the hub (and numpy,
through the codecs) is imported on the first audio message, not here.

The same handlers run on both sides. On a server session (a peer with a ``hub``)
they drive that hub's :class:`~korinet_audio.hub.AudioHub`; on a talker's client
they hand the message to the receiver registered in :data:`receivers`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Final, Protocol

from korinet import REALTIME, Message, MessageType, hookimpl

from .frames import UtterancePart

if TYPE_CHECKING:
    from .hub import AudioHub

__all__ = ["FRAME", "JOIN", "ROSTER", "UTTERANCE", "Receiver", "audio_hub", "receivers", "use_audio_hub"]

JOIN: Final = "audio.join"
FRAME: Final = "audio.frame"
UTTERANCE: Final = "audio.utterance"
ROSTER: Final = "audio.roster"


class Receiver(Protocol):
    """What a talker registers for its client session."""

    def on_frame(self, obj: Any) -> None: ...
    def on_utterance(self, obj: Any) -> None: ...
    def on_roster(self, obj: Any) -> None: ...


#: client session -> the talker's receiver (talk.py registers itself here)
receivers: weakref.WeakKeyDictionary[Any, Receiver] = weakref.WeakKeyDictionary()
_hubs: weakref.WeakKeyDictionary[Any, AudioHub] = weakref.WeakKeyDictionary()


def audio_hub(peer: Any) -> AudioHub | None:
    """The AudioHub of the KoriNet hub serving ``peer`` (None on a client)."""
    hub = getattr(peer, "hub", None)
    if hub is None:
        return None
    found = _hubs.get(hub)
    if found is None:
        from .hub import AudioHub

        found = _hubs[hub] = AudioHub()
    return found


def use_audio_hub(hub: Any, audio: AudioHub) -> None:
    """Make ``audio`` the AudioHub of the KoriNet hub ``hub``, before its first audio
    message (``serve --cluster`` gives one on the cluster bus)."""
    _hubs[hub] = audio


def _validate_join(obj: Any) -> None:
    from .hub import parse_join

    parse_join(obj)


def _validate_roster(obj: Any) -> None:
    if not isinstance(obj, dict) or not isinstance(obj.get("members"), list):
        raise ValueError("a roster is a map with a members list")
    if not isinstance(obj.get("codec"), str):
        raise ValueError("a roster names a codec")


def _on_join(peer: Any, msg: Message) -> Any:
    hub = audio_hub(peer)
    if hub is None:
        raise ValueError("only a hub takes joins")
    return hub.join(peer, msg.data)


def _on_frame(peer: Any, msg: Message) -> None:
    receiver = receivers.get(peer)
    if receiver is not None:
        receiver.on_frame(msg.data)
        return
    hub = audio_hub(peer)
    if hub is not None:
        hub.on_frame(peer, msg.data)


def _on_utterance(peer: Any, msg: Message) -> None:
    receiver = receivers.get(peer)
    if receiver is not None:
        receiver.on_utterance(msg.data)
        return
    hub = audio_hub(peer)
    if hub is not None:
        hub.on_utterance(peer, msg.data)


def _on_roster(peer: Any, msg: Message) -> None:
    receiver = receivers.get(peer)
    if receiver is not None:
        receiver.on_roster(msg.data)


@hookimpl
def korinet_register_message_types() -> list[MessageType]:
    return [
        MessageType(JOIN, _validate_join, handler=_on_join, description="join an intercom channel"),
        # realtime: parsed by the handler so that a malformed frame is counted where it lands
        MessageType(FRAME, delivery=REALTIME, handler=_on_frame, description="20 ms of live audio"),
        MessageType(
            UTTERANCE,
            UtterancePart.parse,
            handler=_on_utterance,
            description="push-to-talk audio, replayed to listeners who were away",
        ),
        MessageType(ROSTER, _validate_roster, handler=_on_roster, description="who is in the channel"),
    ]


@hookimpl
def korinet_session_closed(session: Any, reason: str) -> None:
    hub = getattr(session, "hub", None)
    if hub is not None and hub in _hubs:
        _hubs[hub].leave(session)
