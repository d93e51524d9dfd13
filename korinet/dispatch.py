"""The rules for taking a received message, shared by every runtime (docs/PROTOCOL.md §5.5).

Pure decisions and frame-queueing helpers over a Session: the asyncio Peer and the
blocking SyncClient differ in how they wake their callers, never in what they accept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .exceptions import KoriNetError
from .messages import MessageType
from .session import MessageReceived, RealtimeReceived, Session
from .wire.frames import MessageFlags

__all__ = ["admit", "admit_realtime", "has_role", "queue_answer", "queue_rejection", "rejection_reason"]

logger = logging.getLogger(__name__)

_REQUEST = int(MessageFlags.REQUEST)
_REPLY = int(MessageFlags.REPLY)
_ERROR = int(MessageFlags.ERROR)
_REJECT = int(MessageFlags.REJECT)


def has_role(identity: Any, role: str) -> bool:
    roles = getattr(identity, "roles", None) or ()
    return role in roles


def admit(
    ev: MessageReceived, types: Mapping[str, MessageType], identity: Any, accept_plain: bool
) -> tuple[MessageType | None, str | None]:
    """Decide on a new message (not a reply): ``(type, None)`` takes it (type is None
    for plain data), ``(None, reason)`` rejects it."""
    if not ev.type:
        return (None, None) if accept_plain else (None, "only typed messages are accepted here")
    mtype = types.get(ev.type)
    if mtype is None:
        return None, f"unknown message type {ev.type!r}"
    reason = _refusal(mtype, ev.obj, identity)
    return (None, reason) if reason else (mtype, None)


def _refusal(mtype: MessageType, obj: Any, identity: Any) -> str | None:
    """Why a message of this type from this identity is refused (role, then validator)."""
    if mtype.required_role is not None and not has_role(identity, mtype.required_role):
        return f"message type {mtype.name!r} requires the role {mtype.required_role!r}"
    if mtype.validate is not None:
        try:
            mtype.validate(obj)
        except (ValueError, TypeError, KeyError) as exc:
            return f"invalid {mtype.name!r} message: {exc}"
    return None


def admit_realtime(
    ev: RealtimeReceived, types: Mapping[str, MessageType], identity: Any
) -> tuple[MessageType | None, str | None]:
    """Decide on a realtime message: ``(type, None)`` takes it (type is None for an
    untyped or unknown type: the realtime inbox takes those), ``(None, reason)``
    drops it. The role and the validator are checked as for reliable messages."""
    mtype = types.get(ev.type) if ev.type else None
    if mtype is None:
        return None, None
    reason = _refusal(mtype, ev.obj, identity)
    return (None, reason) if reason else (mtype, None)


def rejection_reason(ev: MessageReceived) -> str:
    """The reason carried by a REPLY|ERROR or REJECT message."""
    return str(ev.obj.get("error") if isinstance(ev.obj, dict) else None)


def queue_rejection(session: Session, ev: MessageReceived, reason: str, who: object) -> None:
    """Queue a REJECT for ``ev`` (§5.5) and count it as delivered."""
    logger.warning("%r: rejected message %d (type %r): %s", who, ev.seq, ev.type, reason)
    try:
        session.send_message(
            {"error": reason}, ev.type, flags=_REJECT | (ev.flags & _REQUEST), corr=ev.corr or ev.seq
        )
    except KoriNetError as exc:
        logger.warning("%r: could not send the rejection: %s", who, exc)
    session.message_delivered(ev.seq, session.epoch)


def queue_answer(
    session: Session, mtype: str, corr: int, result: Any, error: BaseException | None, who: object
) -> bool:
    """Queue the REPLY (or REPLY|ERROR) to request ``corr``; False if it could not be."""
    try:
        if error is None:
            session.send_message(result, mtype, flags=_REPLY, corr=corr)
        else:
            session.send_message(
                {"error": f"{type(error).__name__}: {error}"}, mtype, flags=_REPLY | _ERROR, corr=corr
            )
    except KoriNetError as exc:
        logger.warning("%r: could not send the reply: %s", who, exc)
        return False
    return True
