"""The chat's messages on a KoriNet session: names, shapes and validation (pure, stdlib only).

Client to hub, one type: ``chat.request`` ``{"rid": int, "op": str, ...}``; every
request is answered by one ``chat.result`` ``{"rid", "ok", "error"?, ...}``.

Hub to client:

* ``chat.msg``: a room message with its per-room sequence number (kept in history);
* ``chat.event``: presence and membership (joined, left, reconnecting, online, away,
  nick); never stored;
* ``chat.dm``: a direct message;
* ``chat.hub``: who may host the hub next, and a handover (state, take, moved,
  closed: handover.py);
* ``chat.result``: the answer to a request.

A room message is identified twice: by ``(room, seq)``, given by the hub, and by
``mid``, chosen by the sending client so that a message re-sent after the hub lost
the session (docs/CHAT.md, "Exactly once") is recognised and not stored twice.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, Final

from korinet.messages import MessageType

__all__ = [
    "DM",
    "EVENT",
    "HUB",
    "MAX_KEY",
    "MAX_NICK",
    "MAX_ROOM",
    "MAX_TEXT",
    "MOVED",
    "MSG",
    "OPS",
    "REQUEST",
    "RESULT",
    "display_room",
    "message_types",
    "nick_key",
    "normalize_nick",
    "normalize_room",
    "validate_dm",
    "validate_event",
    "validate_msg",
    "validate_request",
    "validate_result",
]

REQUEST: Final = "chat.request"
RESULT: Final = "chat.result"
MSG: Final = "chat.msg"
EVENT: Final = "chat.event"
DM: Final = "chat.dm"
#: Hub to client: who may host next, and a handover (docs/CHAT.md, "Handover").
HUB: Final = "chat.hub"

#: Longest message text, in characters (a clear error beyond, on both sides).
MAX_TEXT: Final = 2000
MAX_NICK: Final = 24
MAX_ROOM: Final = 32
MAX_QUERY: Final = 200
MAX_MID: Final = 64
MAX_KEY: Final = 128

#: The reason a client gives when it closes its session with a hub it is leaving for
#: another: not a goodbye (a cluster hub keeps the nick held, says nothing).
MOVED: Final = "the hub moved"
#: Most messages one history or search answer carries.
MAX_HISTORY: Final = 500

# Letters and digits of any script, and the punctuation IRC allows in nicks; no spaces,
# no controls, nothing that could pass for a room name.
_NICK_RE: Final = re.compile(r"[^\W][\w\-\[\]{}|^`]*")
_ROOM_RE: Final = re.compile(r"[\w][\w\-.]*")


def normalize_nick(nick: Any) -> str:
    """Check a nick and return it as given (its case is kept for display).

    Raises:
        ValueError: with a message for the user.
    """
    if not isinstance(nick, str) or not nick:
        raise ValueError("a nick cannot be empty")
    if len(nick) > MAX_NICK:
        raise ValueError(f"nick too long ({len(nick)} > {MAX_NICK} characters)")
    if not _NICK_RE.fullmatch(nick):
        raise ValueError(f"invalid nick {nick!r}: letters, digits and - _ [ ] {{ }} | ^ ` only")
    return nick


def nick_key(nick: str) -> str:
    """Nicks collide regardless of case."""
    return nick.casefold()


def normalize_room(room: Any) -> str:
    """``"#General"`` or ``"general"`` -> ``"general"`` (rooms are case-insensitive).

    Raises:
        ValueError: with a message for the user.
    """
    if not isinstance(room, str):
        raise ValueError("a room name must be text")
    return _normalize_room(room)


@functools.lru_cache(maxsize=4096)  # every message names its room: check each name once
def _normalize_room(room: str) -> str:
    name = room[1:] if room.startswith("#") else room
    if not name:
        raise ValueError("a room name cannot be empty")
    if len(name) > MAX_ROOM:
        raise ValueError(f"room name too long ({len(name)} > {MAX_ROOM} characters)")
    if not _ROOM_RE.fullmatch(name):
        raise ValueError(f"invalid room name {room!r}: letters, digits, - _ . only")
    return name.casefold()


def display_room(room: str) -> str:
    return f"#{room}"


# ---------------------------------------------------------------------- validation
# Each validator raises ValueError/TypeError; the runtime turns that into a REJECT
# (the sender's send() raises MessageRejected) and the receiver never sees the message.


def _dict(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError("expected a map")
    return data


def _int(data: dict[str, Any], key: str, *, optional: bool = False) -> None:
    value = data.get(key)
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key!r} must be a non-negative integer")


def _str(data: dict[str, Any], key: str, limit: int, *, optional: bool = False) -> None:
    value = data.get(key)
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise TypeError(f"{key!r} must be text")
    if len(value) > limit:
        raise ValueError(f"{key!r} too long ({len(value)} > {limit} characters)")


def _text(data: dict[str, Any]) -> None:
    value = data.get("text")
    if not isinstance(value, str):
        raise TypeError("'text' must be text")
    if len(value) > MAX_TEXT:
        raise ValueError(f"message too long ({len(value)} > {MAX_TEXT} characters)")


def _room_arg(data: dict[str, Any]) -> None:
    normalize_room(data.get("room"))


def _optional_room_arg(data: dict[str, Any]) -> None:
    if data.get("room") is not None:
        normalize_room(data["room"])


def _kind(data: dict[str, Any]) -> None:
    if data.get("kind", "say") not in ("say", "me"):
        raise ValueError("'kind' must be 'say' or 'me'")


def _say(data: dict[str, Any]) -> None:
    _room_arg(data)
    _text(data)
    _str(data, "mid", MAX_MID)
    _kind(data)


def _dm(data: dict[str, Any]) -> None:
    normalize_nick(data.get("to"))
    _text(data)
    _str(data, "mid", MAX_MID)
    _kind(data)


def _history(data: dict[str, Any]) -> None:
    _room_arg(data)
    _int(data, "limit", optional=True)
    _int(data, "since", optional=True)


def _search(data: dict[str, Any]) -> None:
    _optional_room_arg(data)
    _str(data, "query", MAX_QUERY)
    _int(data, "limit", optional=True)


def _join(data: dict[str, Any]) -> None:
    _room_arg(data)
    _int(data, "since", optional=True)


def _nick(data: dict[str, Any]) -> None:
    normalize_nick(data.get("nick"))


def _hello(data: dict[str, Any]) -> None:
    normalize_nick(data.get("nick"))
    _int(data, "can_host", optional=True)  # the port a hub of this client would listen on
    # the client's nick key: a session presenting it may take the nick over from an
    # earlier session of the same client on another hub (docs/CHAT.md, "Failover")
    _str(data, "key", MAX_KEY, optional=True)
    _int(data, "dm_since", optional=True)  # the last direct message shown (cluster hubs)
    if not isinstance(data.get("hosting", False), bool):
        raise TypeError("'hosting' must be a boolean")


def _took(data: dict[str, Any]) -> None:
    _int(data, "port")
    _str(data, "fp", 200, optional=True)


def _away(data: dict[str, Any]) -> None:
    _str(data, "message", MAX_TEXT, optional=True)


def _rooms(data: dict[str, Any]) -> None:
    if not isinstance(data.get("mine", False), bool):  # only the rooms this member is in
        raise TypeError("'mine' must be a boolean")


#: Request operations and their argument checks.
OPS: Final[dict[str, Callable[[dict[str, Any]], None]]] = {
    "hello": _hello,
    "join": _join,
    "part": _room_arg,
    "say": _say,
    "dm": _dm,
    "nick": _nick,
    "who": _room_arg,
    "rooms": _rooms,
    "history": _history,
    "search": _search,
    "away": _away,
    "took": _took,
}


def validate_request(data: Any) -> None:
    d = _dict(data)
    _int(d, "rid")
    op = d.get("op")
    check = OPS.get(op) if isinstance(op, str) else None
    if check is None:
        raise ValueError(f"unknown operation {op!r} (known: {', '.join(OPS)})")
    check(d)


def validate_result(data: Any) -> None:
    d = _dict(data)
    _int(d, "rid")
    if not isinstance(d.get("ok"), bool):
        raise TypeError("'ok' must be a boolean")
    _str(d, "error", 1000, optional=True)


def validate_msg(data: Any) -> None:
    d = _dict(data)
    _room_arg(d)
    _int(d, "seq")
    _str(d, "nick", 200)
    _text(d)
    _str(d, "mid", MAX_MID, optional=True)
    if not isinstance(d.get("ts"), (int, float)):
        raise TypeError("'ts' must be a number")
    _kind(d)


_EVENT_KINDS: Final = frozenset({"joined", "left", "reconnecting", "online", "away", "nick", "notice"})


def validate_event(data: Any) -> None:
    d = _dict(data)
    if d.get("kind") not in _EVENT_KINDS:
        raise ValueError(f"unknown event kind {d.get('kind')!r}")
    _optional_room_arg(d)
    _str(d, "nick", 200, optional=True)
    _str(d, "new", 200, optional=True)
    _str(d, "text", MAX_TEXT, optional=True)


def validate_dm(data: Any) -> None:
    d = _dict(data)
    _str(d, "from", 200)
    _str(d, "to", 200)
    _text(d)
    _kind(d)
    _int(d, "seq", optional=True)  # its number in the recipient's DM log (cluster hubs)


_HUB_KINDS: Final = frozenset({"successors", "state", "take", "moved", "closed"})


def validate_hub(data: Any) -> None:
    d = _dict(data)
    kind = d.get("kind")
    if kind not in _HUB_KINDS:
        raise ValueError(f"unknown hub message kind {kind!r}")
    _str(d, "host", 200, optional=True)  # the nick of the member hosting the hub
    if not isinstance(d.get("started", 0), (int, float)):
        raise TypeError("'started' must be a number")
    if kind == "successors":
        entries = d.get("list")
        if not isinstance(entries, list) or len(entries) > 1000:
            raise TypeError("'list' must be a list")
        for entry in entries:
            _str(_dict(entry), "nick", 200)
            _str(entry, "address", 200)
            _int(entry, "port")
    elif kind == "state":
        _room_arg(d)
        _int(d, "head")
        messages = d.get("messages")
        if not isinstance(messages, list):
            raise TypeError("'messages' must be a list")
        for message in messages:
            validate_msg(message)
    elif kind == "moved":
        _str(d, "nick", 200)
        _str(d, "address", 200)
        _int(d, "port")
        _str(d, "fp", 200, optional=True)
        if not isinstance(d.get("merge", False), bool):
            raise TypeError("'merge' must be a boolean")


def message_types() -> list[MessageType]:
    """What the plugin registers. No handlers: the hub and the client read their
    inboxes, so a message is acknowledged only once the chat code has it."""
    return [
        MessageType(REQUEST, validate_request, description="chat: a client's request to the hub"),
        MessageType(RESULT, validate_result, description="chat: the hub's answer to a request"),
        MessageType(MSG, validate_msg, description="chat: a room message with its sequence number"),
        MessageType(EVENT, validate_event, description="chat: presence and membership"),
        MessageType(DM, validate_dm, description="chat: a direct message"),
        MessageType(HUB, validate_hub, description="chat: who hosts next, and a hub handover"),
    ]
