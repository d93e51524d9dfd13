"""Fan-out: one message to many peers, encoded once per codec.

A hub relaying a message to N members would call ``Peer.post`` N times, and each
call encodes and frames the same object again. :func:`post_many` and
:func:`send_realtime_many` encode and frame it once per negotiated codec (a
``PreparedMessage``) and hand that to each session (``Session.send_prepared``),
which only puts its seq in and buffers, stores and replays the frame exactly as
it would its own. For each peer the rest is what ``Peer.post`` /
``Peer.send_realtime`` do: the same checks, the same durable-store commit, the
same write coalescing.

One peer's trouble (a full window, an ended session) is reported in the result,
never raised: the others still get the message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..codecs.base import Codec
from ..exceptions import CodecError, KoriNetError, LocalProtocolError
from ..session import PreparedMessage
from ..wire.frames import MAX_TYPE_NAME
from .peer import Peer

__all__ = ["FanoutResult", "post_many", "send_realtime_many"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class FanoutResult:
    """What :func:`post_many` did for each peer (each peer is in exactly one dict)."""

    #: peer -> the sequence number of its copy (as ``Peer.post`` returns it)
    queued: dict[Peer, int] = field(default_factory=dict)
    #: peer -> what ``Peer.post`` would have raised: SendBufferFull, ConnectionClosed,
    #: InvalidState (never connected), CodecError, MessageTooLarge, StoreError...
    failed: dict[Peer, KoriNetError] = field(default_factory=dict)
    #: how many times the object was encoded (one per codec in use)
    encodes: int = 0


class _Prepared:
    """The message encoded and framed at most once per codec name, on first need
    (a codec's CodecError is kept and given to every peer of that codec)."""

    __slots__ = ("_by_codec", "encodes", "obj", "realtime", "type")

    def __init__(self, obj: Any, type: str, *, realtime: bool) -> None:
        self.obj = obj
        self.type = type
        self.realtime = realtime
        self.encodes = 0
        self._by_codec: dict[str, PreparedMessage | CodecError] = {}

    def get(self, codec: Codec) -> PreparedMessage:
        found = self._by_codec.get(codec.name)
        if found is None:
            self.encodes += 1
            try:
                payload = codec.encode(self.obj)
            except CodecError as exc:
                found = exc
            else:
                found = PreparedMessage(codec.name, payload, self.type, realtime=self.realtime)
            self._by_codec[codec.name] = found
        if isinstance(found, CodecError):
            raise found
        return found


def _check_type(type: str) -> None:
    # the one check the session makes of the type name, made once instead of per peer
    if len(type.encode()) > MAX_TYPE_NAME:
        raise LocalProtocolError(f"message type name longer than {MAX_TYPE_NAME} bytes")


def post_many(peers: Iterable[Peer], obj: Any, type: str = "") -> FanoutResult:
    """``peer.post(obj, type)`` for every peer, encoding ``obj`` once per codec.

    Each peer gets its copy once (a peer listed twice too), queued in its session
    in the order of calls like any post. Never raises for one peer: see
    :class:`FanoutResult`. With a durable store each copy is committed before this
    returns, unless the caller is inside ``SessionStore.batch()`` (one commit then).

    Raises:
        LocalProtocolError: ``type`` is too long a name (nothing was queued).
    """
    _check_type(type)
    prepared = _Prepared(obj, type, realtime=False)
    result = FanoutResult()
    for peer in dict.fromkeys(peers):
        codec = peer.session.codec
        try:
            if codec is None:
                # never connected: post says so (InvalidState) the way it always does
                seq = peer.post(obj, type)
            else:
                seq = peer.post_prepared(prepared.get(codec))
        except KoriNetError as exc:
            result.failed[peer] = exc
        else:
            result.queued[peer] = seq
    result.encodes = prepared.encodes
    return result


def send_realtime_many(peers: Iterable[Peer], obj: Any, type: str = "") -> int:
    """``peer.send_realtime(obj, type)`` for every peer, encoding ``obj`` once per
    codec; returns how many peers it was sent to. A peer without an open link, or
    with a backed-up one, does not get it (counted in its session's stats, as
    send_realtime counts it). A codec that cannot encode ``obj``, or a peer whose
    frame limit it exceeds, is logged and skipped: realtime is lossy by design.

    Raises:
        LocalProtocolError: ``type`` is too long a name (nothing was sent).
    """
    _check_type(type)
    prepared = _Prepared(obj, type, realtime=True)
    sent = 0
    for peer in dict.fromkeys(peers):
        conn = peer.realtime_link()
        if conn is None:
            continue
        session = peer.session
        codec = session.codec
        if codec is None:
            session.stats.realtime_dropped += 1
            continue
        try:
            if not session.send_realtime_prepared(prepared.get(codec)):
                continue
        except (CodecError, LocalProtocolError) as exc:  # MessageTooLarge is a LocalProtocolError
            logger.warning("%r: realtime %r not sent: %s", peer, type, exc)
            continue
        if peer.realtime_write(conn):
            sent += 1
    return sent
