"""The Session: KoriNet's sans-I/O state machine (docs/PROTOCOL.md §4-§6).

It never sleeps, never touches a socket and never calls a plugin. Its driver:

* calls :meth:`Session.connection_made` when a link is up (client), or
  :meth:`Session.accept` / :meth:`Session.resume` with a validated HELLO (server);
* feeds bytes with :meth:`receive_data` and EOF/loss with :meth:`connection_lost`;
* drains :meth:`events_received` and writes :meth:`data_to_send`;
* calls :meth:`tick` at :meth:`next_deadline` (heartbeats and timeouts);
* drops the link when :meth:`close_expected` says so.
"""

from __future__ import annotations

import secrets
import struct
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..codecs.base import Codec, default_offer
from ..exceptions import (
    AuthenticationError,
    CodecError,
    ConnectionClosedError,
    ConnectionClosedOK,
    FrameTooLarge,
    InvalidState,
    KoriNetError,
    KoriNetTimeout,
    MessageTooLarge,
    NegotiationError,
    RemoteProtocolError,
    SendBufferFull,
)
from ..security.passphrase import PassphraseProver
from ..wire.buffer import FrameDecoder
from ..wire.frames import (
    PREFACE,
    FrameType,
    decode_message,
    decode_u64,
    encode_frame,
    encode_message,
    encode_u64,
)
from .events import (
    Event,
    LinkFailed,
    LinkOpened,
    MessageReceived,
    MessagesAcked,
    PeerClosed,
    PongReceived,
    RealtimeReceived,
    SessionExpiredEvent,
)
from .handshake import Hello, decode_close, encode_close, encode_control, parse_challenge, parse_welcome
from .snapshot import SessionSnapshot, StoredMessage
from .state import (
    CLIENT,
    CLOSED,
    CONNECTING,
    DETACHED,
    OPEN,
    SERVER,
    CloseCode,
    SessionConfig,
    Side,
    State,
)

__all__ = ["PreparedMessage", "Session", "SessionStats"]

_SEQ_OFFSET = 5  # a MSG frame's seq follows the 5-byte frame header (§2.3)
_MSG = int(FrameType.MSG)
_ACK = int(FrameType.ACK)
#: Bytes of a partial frame that count as a sign of life (§4.3).
PROGRESS_BYTES = 64 * 1024
#: Lazy deliveries beyond this many are acknowledged without waiting (§5.2).
LAZY_ACK_MAX = 64
_U64 = struct.Struct(">Q")
_PLAIN_MSG_HEAD = struct.Struct(">IBQBB")  # length, MSG, seq, flags=0, tlen=0
_ACK_FRAME = struct.Struct(">IBQ")  # length=9, ACK, seq: a whole ACK frame in one pack


@dataclass(slots=True)
class SessionStats:
    """Counters a metrics plugin can read; they only grow."""

    links: int = 0
    resumes: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    replayed: int = 0
    duplicates_dropped: int = 0
    realtime_sent: int = 0
    realtime_received: int = 0
    realtime_dropped: int = 0
    realtime_malformed: int = 0
    heartbeat_timeouts: int = 0


class PreparedMessage:
    """A message framed once for many sessions that negotiated ``codec`` (a fan-out):
    every copy's frame is this one with the copy's seq in it (§2.3), byte for byte
    the frame :meth:`Session.send_message` would build.

    Raises:
        LocalProtocolError: ``type`` is too long a name.
    """

    __slots__ = ("_head", "_tail", "codec", "realtime", "size")

    def __init__(
        self,
        codec: str,
        payload: bytes,
        type: str = "",
        *,
        flags: int = 0,
        corr: int = 0,
        realtime: bool = False,
    ) -> None:
        self.codec = codec
        self.realtime = realtime
        self.size = len(payload)  # what counts against the byte window
        frame = encode_message(FrameType.RT if realtime else FrameType.MSG, 0, flags, corr, type, payload)
        self._head = frame[:_SEQ_OFFSET]
        self._tail = frame[_SEQ_OFFSET + 8 :]

    def frame(self, seq: int) -> bytes:
        return self._head + _U64.pack(seq) + self._tail


def _message_frame(seq: int, payload: bytes, type: str, flags: int, corr: int) -> bytes:
    """A whole MSG frame; the plain one (no type, flags or corr) with one pack (§2.3)."""
    if flags or type:
        return encode_message(FrameType.MSG, seq, flags, corr, type, payload)
    return _PLAIN_MSG_HEAD.pack(len(payload) + 11, _MSG, seq, 0, 0) + payload


def _peer_list(fields: dict[str, Any], name: str) -> list[Any]:
    """A list the peer put in a CLOSE frame, or [] if it sent something else."""
    value = fields.get(name)
    return value if isinstance(value, list) else []


class Session:
    """One side of a KoriNet session. See the module docstring for the driver's duties."""

    # A server holds one per client, most of them idle: slots instead of a 1.5 KiB dict.
    __slots__ = (
        "_ack_sent",
        "_ack_urgent",
        "_acked",
        "_decoder",
        "_delivered_early",
        "_events",
        "_handshake_deadline",
        "_last_ping",
        "_last_recv",
        "_limit_bytes",
        "_limit_messages",
        "_link_dead",
        "_next_seq",
        "_out",
        "_peer_heartbeat",
        "_peer_max_frame",
        "_peer_window",
        "_peer_window_bytes",
        "_ping_nonce",
        "_ping_sent_at",
        "_progress_mark",
        "_prover",
        "_sent_high",
        "_unacked",
        "_unacked_bytes",
        "_undelivered_bytes",
        "_undelivered_sizes",
        "codec",
        "codecs",
        "config",
        "delivered",
        "epoch",
        "failure",
        "received",
        "session_id",
        "side",
        "state",
        "stats",
        "token",
        "version",
    )

    def __init__(
        self,
        side: Side,
        codecs: Mapping[str, Codec],
        config: SessionConfig | None = None,
        *,
        passphrase: str | None = None,
    ) -> None:
        """``passphrase`` (client side): prove it to the server, and require the server
        to prove it back (§3.4). A server's passphrase lives in its ServerHandshake."""
        self.side = side
        self._prover = PassphraseProver(passphrase) if passphrase is not None else None
        self.config = config or SessionConfig()
        # Not copied: a hub hands every session the same mapping, and nothing changes it.
        self.codecs = codecs
        self.state: State = DETACHED
        self.session_id: str | None = None
        self.token: str | None = None
        self.version = 0
        self.codec: Codec | None = None
        #: increments whenever a new session replaces an expired one (client side)
        self.epoch = 0
        self.stats = SessionStats()
        #: the error that ended the session, if one did
        self.failure: KoriNetError | None = None
        # Send side (§5): every reliable message stays in _unacked until acknowledged.
        # The deques and the set are made on first use (None until then), and the
        # deques dropped again once empty: an empty deque is 760 B, and most of a
        # server's sessions are idle (a deque per message costs ~1% of its path).
        self._next_seq = 1
        self._unacked: deque[StoredMessage] | None = None  # (seq, frame, payload size)
        self._unacked_bytes = 0
        self._acked = 0
        self._sent_high = 0  # highest seq ever handed to a link
        # Receive side: received >= delivered >= ack_sent.
        self.received = 0
        self.delivered = 0
        self._delivered_early: set[int] | None = None
        self._undelivered_sizes: deque[int] | None = None
        self._undelivered_bytes = 0
        self._ack_sent = 0
        self._ack_urgent = False
        # What the peer told us in the handshake.
        self._peer_heartbeat = self.config.heartbeat_interval
        self._peer_window = self.config.window
        self._peer_window_bytes = self.config.window_bytes
        self._peer_max_frame = self.config.max_frame_size
        self._limit_messages = self.config.window
        self._limit_bytes = self.config.window_bytes
        # The current link.
        self._decoder: FrameDecoder | None = None
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._link_dead = False
        self._last_recv = 0.0
        self._progress_mark = 0
        self._last_ping = 0.0
        self._ping_nonce = 0
        self._ping_sent_at = 0.0
        self._handshake_deadline = 0.0

    # ------------------------------------------------------------------ queries

    def __repr__(self) -> str:
        return f"<Session {self.side.name} {self.session_id} {self.state.name}>"

    @property
    def codec_offer(self) -> tuple[str, ...]:
        """The codecs a HELLO offers, best first: the config's pinned list, or by
        default every codec we were handed (korinet.codecs.base.default_offer).
        (Computed when asked: only a client asks, once per link.)"""
        return tuple(c for c in (self.config.codecs or default_offer(self.codecs)) if c in self.codecs)

    @property
    def unacked(self) -> int:
        """Reliable messages sent (or queued) and not yet acknowledged."""
        return len(self._unacked) if self._unacked else 0

    @property
    def unacked_bytes(self) -> int:
        return self._unacked_bytes

    @property
    def acked(self) -> int:
        """The highest sequence number the peer acknowledged."""
        return self._acked

    @property
    def last_seq(self) -> int:
        """The seq of the last reliable message queued (0 before the first)."""
        return self._next_seq - 1

    @property
    def send_window(self) -> int:
        """Most messages that may be unacknowledged (ours and the peer's limit)."""
        return self._limit_messages

    def can_send(self, size: int = 0) -> bool:
        """Whether a message of ``size`` payload bytes fits in the send window now.
        (A single message larger than the byte window is let through alone.)"""
        unacked = self._unacked
        return not unacked or (
            len(unacked) < self._limit_messages and self._unacked_bytes + size <= self._limit_bytes
        )

    @property
    def has_output(self) -> bool:
        """Whether the driver has anything to do after input: bytes to write, an
        acknowledgement owed (urgent or lazy), or the link to drop. When False,
        :meth:`data_to_send` is empty and :meth:`close_expected` is False."""
        return bool(self._out) or self.delivered > self._ack_sent or self._link_dead or self.state is CLOSED

    def close_expected(self) -> bool:
        """True when the driver must drop the current link (after writing data_to_send)."""
        return self._link_dead or self.state is CLOSED

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must next be called, on the clock passed as ``now``."""
        if self.state is CONNECTING:
            return self._handshake_deadline
        if self.state is OPEN:
            return min(
                self._last_recv + self.config.dead_after * self._peer_heartbeat,
                self._last_ping + self.config.heartbeat_interval,
            )
        return None

    # ------------------------------------------------------------------ durability (§6.4)

    def snapshot(self, *, messages: bool = True) -> SessionSnapshot:
        """The durable state of this session (see :mod:`korinet.session.snapshot`).

        Without ``messages`` the replay buffer is left out: a store that keeps the
        messages itself (:meth:`unacked_after`) only compares the rest.

        Raises:
            InvalidState: no handshake has completed yet (nothing to resume).
        """
        if self.session_id is None or self.token is None or self.codec is None:
            raise InvalidState("no session yet: the first handshake has not completed")
        return SessionSnapshot(
            self.side,
            self.session_id,
            self.token,
            self.version,
            self.codec.name,
            self.epoch,
            self._acked,
            self.delivered,
            tuple(sorted(self._delivered_early)) if self._delivered_early else (),
            tuple(self._unacked) if messages and self._unacked else (),
        )

    def unacked_after(self, seq: int) -> list[StoredMessage]:
        """Unacknowledged messages with a seq above ``seq``, oldest first."""
        tail: list[StoredMessage] = []
        for entry in reversed(self._unacked or ()):
            if entry[0] <= seq:
                break
            tail.append(entry)
        tail.reverse()
        return tail

    def restore(self, snapshot: SessionSnapshot) -> None:
        """Load a snapshot into this fresh session; it is then DETACHED, ready to
        resume: a client calls :meth:`connection_made`, a server waits for the
        client's HELLO and calls :meth:`resume`.

        What was received but not delivered is forgotten (``received`` becomes
        ``delivered``): the resume tells the peer, which replays it (§6.2). Every
        buffered message counts as sent, since it may have left before the crash.

        Raises:
            InvalidState: this session is not fresh, or is of the other side.
            KeyError: the snapshot's codec is not available.
        """
        if self.session_id is not None or self.state is not DETACHED or self.stats.links:
            raise InvalidState("restore() needs a fresh session")
        if snapshot.side is not self.side:
            raise InvalidState(f"a {snapshot.side.name} snapshot cannot restore a {self.side.name} session")
        self.codec = self.codecs[snapshot.codec]
        self.session_id, self.token = snapshot.session_id, snapshot.token
        self.version = snapshot.version
        self.epoch = snapshot.epoch
        if snapshot.messages:
            self._unacked = deque(snapshot.messages)
        self._unacked_bytes = sum(size for _, _, size in snapshot.messages)
        self._acked = snapshot.acked
        self._next_seq = snapshot.next_seq
        # An ACK up to here is legitimate: each buffered message may have been sent.
        self._sent_high = self._next_seq - 1
        self.received = self.delivered = snapshot.delivered
        early = {seq for seq in snapshot.delivered_early if seq > snapshot.delivered}
        self._delivered_early = early or None

    # ------------------------------------------------------------------ link lifecycle

    def _new_link(self, now: float) -> None:
        if self.state is CLOSED:
            raise InvalidState("the session is closed")
        if self.state is not DETACHED:
            raise InvalidState(f"a link is already {self.state.name}; call connection_lost first")
        self._decoder = FrameDecoder(self.config.max_frame_size)
        self._out = []
        self._link_dead = False
        self._last_recv = now
        self._progress_mark = 0
        self._last_ping = now
        self._ack_sent = 0  # re-announce our ack on every link: the last one may be lost
        self._ack_urgent = self.delivered > 0  # (if there is one; else lazy acks stay lazy)
        self.stats.links += 1

    def connection_made(self, now: float) -> None:
        """(client) A new link is up: queue the preface and HELLO (§3.1).

        Next: feed the server's bytes to :meth:`receive_data` until ``LinkOpened``.
        """
        if self.side is not CLIENT:
            raise InvalidState("servers call accept() or resume() with the peer's HELLO")
        self._new_link(now)
        self.state = CONNECTING
        self._handshake_deadline = now + self.config.handshake_timeout
        resume = None
        if self.session_id is not None:
            resume = {"id": self.session_id, "token": self.token, "received": self.received}
        self._out.append(PREFACE)
        self._out.append(
            encode_control(
                FrameType.HELLO,
                {
                    "versions": list(self.config.versions),
                    "codecs": list(self.codec_offer),
                    "heartbeat": self.config.heartbeat_interval,
                    "window": self.config.window,
                    "window_bytes": self.config.window_bytes,
                    "max_frame": self.config.max_frame_size,
                    "resume": resume,
                    "agent": "korinet-py",
                    **({"auth": {"nonce": self._prover.new_nonce()}} if self._prover else {}),
                },
            )
        )

    def accept(self, hello: Hello, now: float, leftover: bytes = b"", expired: str | None = None) -> None:
        """(server) Start a new session on this link from a validated HELLO (§3.3).

        ``expired`` names the session the client asked to resume when it is unknown,
        so that the client learns its old session is gone.
        """
        if self.side is not SERVER or self.session_id is not None:
            raise InvalidState("accept() starts a new server session")
        self.session_id = secrets.token_hex(8)
        self.token = secrets.token_urlsafe(24)
        self.version = hello.version
        self.codec = self.codecs[hello.codec]
        self._open_server_link(hello, now, leftover, resumed=False, expired=expired)

    def resume(self, hello: Hello, now: float, leftover: bytes = b"") -> None:
        """(server) Continue this session on a new link (§6). The driver has checked the
        resume token and dropped any older link of the session first."""
        if self.side is not SERVER or self.session_id is None:
            raise InvalidState("resume() continues an existing server session")
        assert hello.resume is not None
        assert self.codec is not None
        if self.codec.name not in hello.codecs:
            raise InvalidState(f"the client no longer offers the session's codec {self.codec.name}")
        self.stats.resumes += 1
        self._open_server_link(hello, now, leftover, resumed=True, expired=None)

    def _open_server_link(
        self, hello: Hello, now: float, leftover: bytes, *, resumed: bool, expired: str | None
    ) -> None:
        self._new_link(now)
        self._set_peer_limits(hello.heartbeat, hello.window, hello.window_bytes, hello.max_frame)
        assert self.codec is not None
        self._out.append(
            encode_control(
                FrameType.WELCOME,
                {
                    "version": self.version,
                    "codec": self.codec.name,
                    "session": self.session_id,
                    "token": self.token,
                    "resumed": resumed,
                    "received": self.received,
                    "heartbeat": self.config.heartbeat_interval,
                    "window": self.config.window,
                    "window_bytes": self.config.window_bytes,
                    "max_frame": self.config.max_frame_size,
                    "expired": expired,
                    **({"auth": hello.server_proof} if hello.server_proof else {}),
                },
            )
        )
        self.state = OPEN
        peer_received = hello.resume["received"] if (resumed and hello.resume) else 0
        replayed = self._replay_after(peer_received)
        assert self.session_id is not None
        self._events.append(LinkOpened(self.session_id, resumed, self.version, self.codec.name, replayed))
        if leftover:
            self.receive_data(leftover, now)

    def connection_lost(self, now: float) -> None:
        """The link is gone (EOF, reset, or the driver dropped it). Unacknowledged
        messages stay queued for the next link; unsent realtime ones are dropped."""
        if self.state in (CONNECTING, OPEN):
            self.state = DETACHED
        self._decoder = None
        self._out = []
        self._link_dead = False

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """End the session: queue a CLOSE frame if a link is open (§7).

        Next: write :meth:`data_to_send`, then wait (briefly) for the peer to echo the
        CLOSE and drop the connection, then drop the link.
        """
        if self.state is CLOSED:
            return
        if self.state is OPEN and self.delivered > self._ack_sent:
            # The application has these messages: say so before the end, or the peer's
            # senders would see ConnectionClosed for messages that did arrive (§5.2).
            self._out.append(encode_frame(FrameType.ACK, encode_u64(self.delivered)))
            self._ack_sent = self.delivered
        if self.state in (OPEN, CONNECTING):
            self._out.append(encode_close(code, reason))
        self.state = CLOSED

    # ------------------------------------------------------------------ sending

    def send_message(self, obj: Any, type: str = "", *, flags: int = 0, corr: int = 0) -> int:
        """Queue a reliable message and return its sequence number.

        The message is written on the current link if it is open, else on the next
        one; it stays buffered until acknowledged (§5.1).

        Raises:
            InvalidState: the session is closed, or (client) never connected.
            SendBufferFull: the send window is full (see :meth:`can_send`).
            CodecError: ``obj`` cannot be encoded.
            MessageTooLarge: the frame would exceed the peer's maximum.
        """
        codec = self.codec
        if codec is None or self.state is CLOSED:
            codec = self._sending_codec()  # raises why not
        payload = codec.encode(obj)
        seq = self._next_seq
        # _message_frame inlined: this is every post's hot path
        if flags or type:
            frame = encode_message(FrameType.MSG, seq, flags, corr, type, payload)
        else:
            frame = _PLAIN_MSG_HEAD.pack(len(payload) + 11, _MSG, seq, 0, 0) + payload
        return self._queue_frame(seq, frame, len(payload))

    def send_encoded(self, payload: bytes, type: str = "", *, flags: int = 0, corr: int = 0) -> int:
        """:meth:`send_message` for a payload already encoded with this session's
        :attr:`codec` (a fan-out encodes once for many sessions). Same checks, same
        bookkeeping: the frame buffered and replayed is the one send_message builds.

        Raises:
            InvalidState, SendBufferFull, MessageTooLarge: as :meth:`send_message`.
        """
        self._sending_codec()
        seq = self._next_seq
        return self._queue_frame(seq, _message_frame(seq, payload, type, flags, corr), len(payload))

    def send_prepared(self, message: PreparedMessage) -> int:
        """:meth:`send_encoded` of a message framed once for many sessions.

        Raises:
            InvalidState: as :meth:`send_message`, or ``message`` is not of this
                session's codec, or is a realtime one.
            SendBufferFull, MessageTooLarge: as :meth:`send_message`.
        """
        codec = self._sending_codec()
        if message.codec != codec.name or message.realtime:
            kind = "realtime" if message.realtime else f"{message.codec!r}"
            raise InvalidState(f"a {kind} message for a {codec.name!r} session's reliable lane")
        seq = self._next_seq
        return self._queue_frame(seq, message.frame(seq), message.size)

    def _sending_codec(self) -> Codec:
        if self.state is CLOSED:
            raise InvalidState("the session is closed")
        if self.codec is None:
            raise InvalidState("no codec yet: the first handshake has not completed")
        return self.codec

    def _queue_frame(self, seq: int, frame: bytes, size: int) -> int:
        """The one path of a reliable message (frame ``seq`` of ``size`` payload bytes)
        into the send buffer (§5.1): window, frame limit, replay buffer, stats."""
        unacked = self._unacked
        if unacked:
            if len(unacked) >= self._limit_messages or self._unacked_bytes + size > self._limit_bytes:
                raise SendBufferFull(f"{len(unacked)} messages / {self._unacked_bytes} bytes unacknowledged")
        elif unacked is None:
            unacked = self._unacked = deque()
        if len(frame) - 4 > self._peer_max_frame:
            raise MessageTooLarge(len(frame) - 4, self._peer_max_frame)
        self._next_seq = seq + 1
        unacked.append((seq, frame, size))
        self._unacked_bytes += size
        self.stats.messages_sent += 1
        if self.state is OPEN:
            self._out.append(frame)
            self._sent_high = seq
        return seq

    def send_realtime(self, obj: Any, type: str = "", *, flags: int = 0) -> bool:
        """Send a realtime message now, or drop it (returns False) when no link is open.

        Realtime messages are never buffered, acknowledged or replayed (§5.4).
        """
        codec = self._realtime_codec()
        if codec is None:
            return False
        return self._send_realtime_frame(encode_message(FrameType.RT, 0, flags, 0, type, codec.encode(obj)))

    def send_realtime_prepared(self, message: PreparedMessage) -> bool:
        """:meth:`send_realtime` of a realtime message framed once for many sessions.

        Raises:
            InvalidState: ``message`` is not a realtime one of this session's codec.
            MessageTooLarge: as :meth:`send_realtime`.
        """
        codec = self._realtime_codec()
        if codec is None:
            return False
        if message.codec != codec.name or not message.realtime:
            kind = f"{message.codec!r}" if message.realtime else "reliable"
            raise InvalidState(f"a {kind} message for a {codec.name!r} session's realtime lane")
        return self._send_realtime_frame(message.frame(0))

    def _realtime_codec(self) -> Codec | None:
        """The codec, if a realtime message can leave now; else None, counted as dropped."""
        if self.state is not OPEN or self.codec is None:
            self.stats.realtime_dropped += 1
            return None
        return self.codec

    def _send_realtime_frame(self, frame: bytes) -> bool:
        if len(frame) - 4 > self._peer_max_frame:
            raise MessageTooLarge(len(frame) - 4, self._peer_max_frame)
        self._out.append(frame)
        self.stats.realtime_sent += 1
        return True

    def message_delivered(self, seq: int, epoch: int | None = None, *, lazy: bool = False) -> None:
        """The application has message ``seq``: it may now be acknowledged (§5.2).

        Deliveries may be reported out of order; the acknowledgement stays cumulative.
        Reports from an older epoch (an expired session) are ignored. A ``lazy``
        delivery (a request or a reply, whose sender waits for an answer, not for the
        ACK) is acknowledged with the next frame we send, or when the driver calls
        :meth:`flush_ack`; any other makes the next :meth:`data_to_send` carry an ACK.
        """
        if epoch is not None and epoch != self.epoch:
            return
        if seq <= self.delivered or seq > self.received:
            return
        if not lazy:
            self._ack_urgent = True
        if seq != self.delivered + 1:
            if self._delivered_early is None:
                self._delivered_early = {seq}
            else:
                self._delivered_early.add(seq)
            return
        self.delivered = seq
        sizes = self._undelivered_sizes
        assert sizes is not None  # seq <= received: _handle_msg made it
        self._undelivered_bytes -= sizes.popleft()
        if self._delivered_early:
            self._catch_up_delivered()
        if not sizes:
            self._undelivered_sizes = None  # all delivered: idle sessions hold no empty deque

    def _catch_up_delivered(self) -> None:
        # Only received messages count: after a restore (§6.4) early deliveries may
        # lie beyond ``received`` until the peer replays them.
        early = self._delivered_early
        sizes = self._undelivered_sizes
        assert sizes is not None  # only called once a message was received
        while early and self.delivered + 1 in early and self.delivered < self.received:
            early.remove(self.delivered + 1)
            self.delivered += 1
            self._undelivered_bytes -= sizes.popleft()

    @property
    def ack_pending(self) -> bool:
        """Deliveries not yet acknowledged (lazy ones wait for :meth:`flush_ack`)."""
        return self.delivered > self._ack_sent

    def flush_ack(self) -> None:
        """Make the next :meth:`data_to_send` carry the ACK even if nothing else goes."""
        self._ack_urgent = True

    def data_to_send(self) -> bytes:
        """Bytes to write on the link now (possibly empty). Appends a coalesced ACK
        when one is due (§5.2): urgent, or riding along with other frames."""
        if (
            self.state is OPEN
            and self.delivered > self._ack_sent
            and (self._ack_urgent or self._out or self.delivered - self._ack_sent >= LAZY_ACK_MAX)
        ):
            ack = _ACK_FRAME.pack(9, _ACK, self.delivered)
            self._ack_sent = self.delivered
            self._ack_urgent = False
            out = self._out
            if not out:
                return ack  # (a stop-and-wait receiver's every write)
            out.append(ack)
        else:
            out = self._out
            if not out:
                return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def events_received(self) -> list[Event]:
        """Events since the last call, in order."""
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes from the link. Never raises on bad input: a violation queues a
        CLOSE, ends the session and reports ``LinkFailed``.

        Next: :meth:`events_received`, :meth:`data_to_send`, :meth:`close_expected`.
        """
        if self._decoder is None or self._link_dead or self.state is CLOSED:
            return
        decoder = self._decoder
        frames: Iterable[tuple[int, bytes]]
        whole = decoder.whole_frames(data)
        if whole is not None:
            frames = whole  # whole frames, one read: no copy through the decoder's buffer
        else:
            decoder.feed(data)
            # Liveness (§4.3) needs a whole frame, or real progress through a large one:
            # a peer dripping a byte at a time must not keep a link (and its buffer) alive.
            if decoder.buffered >= self._progress_mark + PROGRESS_BYTES:
                self._last_recv = now
                self._progress_mark = decoder.buffered
            frames = decoder.frames()
        try:
            for ftype, body in frames:
                self._last_recv = now
                self._progress_mark = 0
                if self.state is OPEN:
                    # the hot paths: no enum, no dispatch
                    if ftype == _MSG:
                        self._handle_msg(body)
                        continue
                    if ftype == _ACK and len(body) == 8:
                        self._handle_ack(_U64.unpack(body)[0])
                        continue
                self._handle_frame(FrameType(ftype), body, now)
                if self._decoder is not decoder or self._link_dead or self._closed():
                    break
        except FrameTooLarge as exc:
            self._protocol_error(exc, CloseCode.FRAME_TOO_LARGE)
        except RemoteProtocolError as exc:
            self._protocol_error(exc, CloseCode.PROTOCOL_ERROR)
        if self._link_dead or self._closed():
            decoder.take_rest()  # this link reads nothing more: free what it buffered

    def _closed(self) -> bool:
        # a method, so mypy does not narrow self.state across the frame handlers
        return self.state is CLOSED

    def _protocol_error(self, exc: RemoteProtocolError, code: int) -> None:
        if self.state in (OPEN, CONNECTING):
            self._out = [encode_close(code, str(exc))]
        self.state = CLOSED
        self.failure = exc
        self._events.append(LinkFailed(exc, session_ended=True))

    def _handle_frame(self, ftype: FrameType, body: bytes, now: float) -> None:
        if self.state is CONNECTING:
            if ftype is FrameType.WELCOME:
                self._handle_welcome(body, now)
            elif ftype is FrameType.CHALLENGE:
                self._handle_challenge(body)
            elif ftype is FrameType.CLOSE:
                self._handle_close(body)
            else:
                raise RemoteProtocolError(f"expected WELCOME, got {ftype.name}")
            return
        if ftype is FrameType.MSG:
            self._handle_msg(body)
        elif ftype is FrameType.ACK:
            self._handle_ack(decode_u64(body))
        elif ftype is FrameType.RT:
            self._handle_rt(body)
        elif ftype is FrameType.PING:
            self._out.append(encode_frame(FrameType.PONG, body))
        elif ftype is FrameType.PONG:
            if body == encode_u64(self._ping_nonce):
                self._events.append(PongReceived(now - self._ping_sent_at))
        elif ftype is FrameType.CLOSE:
            self._handle_close(body)
        else:
            raise RemoteProtocolError(f"unexpected {ftype.name} on an open link")

    def _handle_msg(self, body: bytes) -> None:
        if len(body) >= 10 and body[8] == 0 and body[9] == 0:
            # plain message: no flags, no correlation id, no type name (§2.3)
            seq = _U64.unpack_from(body)[0]
            flags = corr = 0
            mtype = ""
            payload = body[10:]
        else:
            m = decode_message(body)
            seq, flags, corr, mtype, payload = m.seq, m.flags, m.corr, m.type, m.payload
        received = self.received
        if seq != received + 1:
            if seq == 0:
                raise RemoteProtocolError("MSG with sequence number 0 (reliable messages start at 1)")
            if seq <= received:
                self.stats.duplicates_dropped += 1  # a replay of what we already have (§5.3)
                return
            raise RemoteProtocolError(f"sequence gap: expected {received + 1}, got {seq}")
        if seq - self.delivered > self.config.window:
            raise RemoteProtocolError(f"the peer exceeded our window of {self.config.window} messages")
        size = len(payload)
        if self._undelivered_bytes + size > self.config.window_bytes and self.delivered < received:
            raise RemoteProtocolError(f"the peer exceeded our window of {self.config.window_bytes} bytes")
        assert self.codec is not None
        try:
            obj = self.codec.decode(payload)
        except CodecError as exc:
            raise RemoteProtocolError(f"message {seq}: {exc}") from exc
        self.received = seq
        sizes = self._undelivered_sizes
        if sizes is None:
            sizes = self._undelivered_sizes = deque()
        sizes.append(size)
        self._undelivered_bytes += size
        self.stats.messages_received += 1
        if self._delivered_early and seq in self._delivered_early:
            # Restored (§6.4): the application took this one before the crash.
            self.stats.duplicates_dropped += 1
            self._ack_urgent = True
            self._catch_up_delivered()
            return
        self._events.append(MessageReceived(seq, flags, corr, mtype, obj))

    def _handle_ack(self, seq: int) -> None:
        if seq > self._sent_high:
            raise RemoteProtocolError(f"ACK {seq} for a message never sent (last sent is {self._sent_high})")
        if seq <= self._acked:
            return
        unacked = self._unacked
        while unacked and unacked[0][0] <= seq:
            self._unacked_bytes -= unacked.popleft()[2]
        if not unacked:
            self._unacked = None  # all acknowledged: idle sessions hold no empty deque
        self._acked = seq
        self._events.append(MessagesAcked(seq))

    def _handle_rt(self, body: bytes) -> None:
        m = decode_message(body)
        assert self.codec is not None
        try:
            obj = self.codec.decode(m.payload)
        except CodecError:
            self.stats.realtime_malformed += 1  # realtime is lossy anyway: count, go on
            return
        self.stats.realtime_received += 1
        self._events.append(RealtimeReceived(m.flags, m.type, obj))

    def _handle_close(self, body: bytes) -> None:
        code, reason, fields = decode_close(body)
        error: KoriNetError
        if code == CloseCode.TRY_AGAIN_LATER:
            # A limit on the server: this link is refused, the session may resume later.
            self._link_dead = True
            self.state = DETACHED
            self._events.append(LinkFailed(ConnectionClosedError(code, reason), session_ended=False))
            return
        if code == CloseCode.UNSUPPORTED_VERSION:
            error = NegotiationError("protocol version", self.config.versions, _peer_list(fields, "versions"))
        elif code == CloseCode.UNSUPPORTED_CODEC:
            error = NegotiationError("codec", list(self.codec_offer), _peer_list(fields, "codecs"))
        elif code == CloseCode.AUTH_FAILED:
            error = AuthenticationError(reason)
        elif code in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            error = ConnectionClosedOK(code, reason)
        else:
            error = ConnectionClosedError(code, reason)
        if self.state is OPEN and code in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            # Echo an orderly close (§7): it tells the closer that everything it sent
            # before, its last ACK included, was read, so it may drop the connection.
            self._out.append(self._final_ack() + encode_close(code, reason))
        self.state = CLOSED
        self.failure = error
        self._events.append(PeerClosed(code, reason))

    def _final_ack(self) -> bytes:
        if self.delivered > self._ack_sent:
            self._ack_sent = self.delivered
            return encode_frame(FrameType.ACK, encode_u64(self.delivered))
        return b""

    def _auth_failed(self, reason: str) -> None:
        """We refuse the server (§3.4): no point in retrying, the session ends."""
        error = AuthenticationError(reason)
        self._out = [encode_close(CloseCode.AUTH_FAILED, reason)]
        self.state = CLOSED
        self.failure = error
        self._events.append(LinkFailed(error, session_ended=True))

    def _handle_challenge(self, body: bytes) -> None:
        challenge = parse_challenge(body)
        if self._prover is None:
            self._auth_failed("the server requires a passphrase (give one with passphrase=...)")
            return
        try:
            proof = self._prover.answer(challenge.nonce, challenge.salt, challenge.params)
        except ValueError as exc:
            self._auth_failed(str(exc))
            return
        self._out.append(encode_control(FrameType.AUTH, {"proof": proof}))

    def _handle_welcome(self, body: bytes, now: float) -> None:
        w = parse_welcome(body)
        if self._prover is not None and not self._prover.server_proved(w.auth):
            self._auth_failed(
                "the server did not prove that it knows the passphrase "
                "(it has none, or another one): refusing it"
            )
            return
        if w.version not in self.config.versions:
            raise RemoteProtocolError(f"the server chose version {w.version}, which we did not offer")
        if w.codec not in self.codec_offer:
            raise RemoteProtocolError(f"the server chose codec {w.codec!r}, which we did not offer")
        new_codec = self.codecs[w.codec]
        replay_from = w.received
        if self.session_id is not None and not w.resumed:
            self._start_over(new_codec)
            replay_from = 0
        elif self.session_id is not None and w.session != self.session_id:
            raise RemoteProtocolError("the server resumed a session we did not ask for")
        elif self.session_id is None:
            if w.resumed:
                raise RemoteProtocolError("the server resumed a session we did not ask for")
            replay_from = 0
        if w.resumed:
            self.stats.resumes += 1
        self.session_id, self.token = w.session, w.token
        self.version, self.codec = w.version, new_codec
        self._set_peer_limits(w.heartbeat, w.window, w.window_bytes, w.max_frame)
        self.state = OPEN
        self._last_ping = now
        replayed = self._replay_after(replay_from)
        self._events.append(LinkOpened(w.session, w.resumed, w.version, w.codec, replayed))

    def _start_over(self, new_codec: Codec) -> None:
        """The server lost our session: void what it may have seen, renumber the rest (§6.3)."""
        old_id = self.session_id or ""
        sent_high = self._sent_high
        unacked = self._unacked or ()
        unconfirmed = sum(1 for e in unacked if e[0] <= sent_high)
        carried = [e for e in unacked if e[0] > sent_high]
        self.epoch += 1
        self._unacked = None
        self._unacked_bytes = 0
        self._next_seq = 1
        self._acked = self._sent_high = 0
        self.received = self.delivered = self._ack_sent = 0
        self._delivered_early = None
        self._undelivered_sizes = None
        self._undelivered_bytes = 0
        kept: deque[StoredMessage] = deque()
        old_codec = self.codec
        renumbered: dict[int, int] = {}
        failed: list[int] = []
        failure = ""
        for old_seq, frame, size in carried:
            if old_codec is not None and old_codec.name != new_codec.name:
                # The new server chose another codec (it lacks ours): re-encode (§6.3).
                m = decode_message(frame[5:])
                try:
                    payload = new_codec.encode(old_codec.decode(m.payload))
                except CodecError as exc:
                    failed.append(old_seq)
                    failure = str(exc)
                    continue
                frame = encode_message(FrameType.MSG, 0, m.flags, m.corr, m.type, payload)
                size = len(payload)
            seq = self._next_seq
            self._next_seq += 1
            renumbered[old_seq] = seq
            frame = frame[:_SEQ_OFFSET] + _U64.pack(seq) + frame[_SEQ_OFFSET + 8 :]
            kept.append((seq, frame, size))
            self._unacked_bytes += size
        self._unacked = kept or None
        self._events.append(
            SessionExpiredEvent(old_id, sent_high, unconfirmed, renumbered, tuple(failed), failure)
        )

    def _set_peer_limits(self, heartbeat: float, window: int, window_bytes: int, max_frame: int) -> None:
        # A peer announcing a huge interval must not make itself undetectable (§4.3).
        self._peer_heartbeat = min(heartbeat, self.config.max_peer_heartbeat)
        self._peer_window = window
        self._peer_window_bytes = window_bytes
        self._peer_max_frame = max_frame
        self._limit_messages = min(self.config.window, window)
        self._limit_bytes = min(self.config.window_bytes, window_bytes)

    def _replay_after(self, peer_received: int) -> int:
        """Queue every unacknowledged message the peer has not received (§6.2)."""
        count = 0
        for seq, frame, _size in self._unacked or ():
            if seq > peer_received:
                self._out.append(frame)
                if seq <= self._sent_high:
                    count += 1
                self._sent_high = max(self._sent_high, seq)
        self.stats.replayed += count
        return count

    # ------------------------------------------------------------------ timers

    def tick(self, now: float) -> None:
        """Run timers: handshake timeout, dead-peer detection, heartbeats (§4.3)."""
        if self.state is CONNECTING and now >= self._handshake_deadline:
            self._link_failed(KoriNetTimeout("the handshake timed out"))
        elif self.state is OPEN:
            silence = now - self._last_recv
            if silence >= self.config.dead_after * self._peer_heartbeat:
                self.stats.heartbeat_timeouts += 1
                self._link_failed(
                    ConnectionClosedError(
                        CloseCode.HEARTBEAT_TIMEOUT, f"nothing from the peer for {silence:.1f}s"
                    )
                )
            elif now - self._last_ping >= self.config.heartbeat_interval:
                self._last_ping = now
                self._ping_nonce = (self._ping_nonce + 1) & 0xFFFFFFFFFFFFFFFF
                self._ping_sent_at = now
                self._out.append(encode_frame(FrameType.PING, encode_u64(self._ping_nonce)))

    def _link_failed(self, error: KoriNetError) -> None:
        self._link_dead = True
        self.state = DETACHED
        self._events.append(LinkFailed(error, session_ended=False))
