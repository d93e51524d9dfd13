"""The cluster bus: what hubs on several machines share, through an engine made
for it (NATS JetStream, in the ``korinet-nats`` plugin), never a protocol of ours.

A hub needs three things from the bus (docs/CLUSTER.md):

* **logs**: named, ordered, replayable, append-only. ``append`` gives the entry
  its sequence number in that log (1, 2, 3 ... with no gaps), so every hub that
  reads a log sees the same order; an append whose ``msg_id`` the log has seen
  lately is not stored twice and answers with the first copy's sequence number
  (a hub re-publishing after a failure cannot duplicate). A log keeps everything
  unless its owner gives it a :class:`Retention` (``retain``): then its oldest
  entries go once a limit is passed, and the rest keep their numbers.
* **key spaces**: keys with an owner and an expiry. ``claim`` creates a key only
  if no one holds it; the owner keeps it with ``renew`` and gives it up with
  ``release``; a key not renewed within the space's TTL is free again (a hub that
  died cannot hold a nick for ever).
* **signals**: fire-and-forget messages on a subject, never stored, never
  replayed (realtime audio frames, presence pings).

One hub with no bus uses none of this: the bus is optional, found through the
``korinet_cluster_bus`` hook of an installed plugin (``korinet-nats`` answers
``nats://`` addresses). :class:`LocalBus` keeps everything in this process: the
reference for the semantics (tests hold every bus to the same contract) and a
bus for hubs that share one process.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "Appended",
    "BusError",
    "ClusterBus",
    "KeySpace",
    "Listener",
    "LocalBus",
    "LogEntry",
    "Retention",
    "bus_for",
    "valid_name",
]

#: how many recent msg_ids a log remembers for de-duplication (LocalBus); NATS
#: keeps them for the stream's duplicate window instead (2 minutes by default)
DEDUP_WINDOW = 100_000


class BusError(Exception):
    """The bus could not do what was asked (unreachable, refused, bad name)."""


@dataclass(frozen=True, slots=True)
class LogEntry:
    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    #: True: the log had this msg_id already; ``seq`` is the first copy's
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of a log the bus keeps: once any limit is passed, the oldest entries
    are removed (the others keep their numbers; readers after a removed entry start
    at the first one kept). None: no limit of that kind."""

    #: seconds an entry is kept after it was appended
    max_age: float | None = None
    #: the entries' data together (NATS counts its headers too: a little more)
    max_bytes: int | None = None
    max_entries: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_age", "max_bytes", "max_entries"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Retention.{name} must be above 0 (or None: no limit), not {value!r}")


def valid_name(name: str) -> bool:
    """Log, space, key and subject names: letters, digits, ``-`` and ``_`` (what every
    engine accepts as one token; callers encode anything else, e.g. in hex)."""
    return bool(name) and all(c.isascii() and (c.isalnum() or c in "-_") for c in name)


def _check(name: str) -> str:
    if not valid_name(name):
        raise BusError(f"not a valid bus name: {name!r} (letters, digits, - and _ only)")
    return name


@runtime_checkable
class KeySpace(Protocol):
    """Keys with an owner (the value) and an expiry (``ttl`` seconds after the last
    claim or renewal)."""

    ttl: float

    async def claim(self, key: str, value: bytes) -> bool:
        """Create ``key`` holding ``value`` if no one holds it; True if we got it."""
        ...

    async def renew(self, key: str, value: bytes) -> bool:
        """Restart the expiry of a key we hold (it still holds ``value``); False if
        it expired or someone else holds it now."""
        ...

    async def release(self, key: str, value: bytes) -> None:
        """Give the key up, if it still holds ``value`` (never someone else's)."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The value held under ``key``, or None if it is free."""
        ...

    async def items(self) -> dict[str, bytes]:
        """Every key held now, with its value."""
        ...


class Listener(Protocol):
    """Signals as they come: ``async for data in listener``; ``close()`` stops them."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


@runtime_checkable
class ClusterBus(Protocol):
    """What hubs share. Every method may raise :class:`BusError`."""

    #: where the bus is, for messages ("nats://127.0.0.1:4222", "local")
    address: str

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def append(self, log: str, data: bytes, *, msg_id: str) -> Appended:
        """Add an entry at the end of ``log`` (created on first use)."""
        ...

    async def retain(self, log: str, retention: Retention) -> None:
        """Keep at most ``retention`` of ``log`` from now on (created if need be); the
        owner of a log calls it before using the log, each time it starts."""
        ...

    async def read(self, log: str, after: int, limit: int = 1000) -> list[LogEntry]:
        """Up to ``limit`` entries with a sequence number above ``after``, in order
        (only those still kept: see :class:`Retention`)."""
        ...

    async def head(self, log: str) -> int:
        """The sequence number of the last entry (0: empty or no such log)."""
        ...

    def follow(self, log: str, after: int) -> AsyncIterator[LogEntry]:
        """Every entry above ``after``, in order, then each new one as it is appended:
        no gap, no repeat, whatever happens to the link to the bus meanwhile (entries
        removed by the log's :class:`Retention` before they were read are skipped)."""
        ...

    async def key_space(self, name: str, ttl: float) -> KeySpace: ...

    async def signal(self, subject: str, data: bytes) -> None:
        """Send to whoever listens on ``subject`` now; nothing is kept."""
        ...

    async def listen(self, subject: str) -> Listener:
        """Signals on ``subject`` from the moment this returns (none are replayed)."""
        ...


def bus_for(address: str, plugins: object | None = None) -> ClusterBus:
    """The bus at ``address``, made by the installed plugin that knows its scheme
    (``nats://`` needs ``korinet-nats``); ``local`` is this process's LocalBus.

    Raises:
        BusError: no installed plugin answers for that address.
    """
    if address == "local":
        return LocalBus()
    from .plugins import PluginManager, default_manager

    manager = plugins if isinstance(plugins, PluginManager) else default_manager()
    bus = manager.cluster_bus(address)
    if bus is None:
        scheme = address.split("://", 1)[0] if "://" in address else address
        hint = " (pip install korinet-nats)" if scheme == "nats" else ""
        raise BusError(f"no installed plugin serves the cluster bus {address!r}{hint}")
    return bus


# ---------------------------------------------------------------------- LocalBus


class _Log:
    def __init__(self) -> None:
        self.entries: deque[tuple[float, bytes]] = deque()  # (appended at, data), oldest first
        self.first = 1  # the number of entries[0]
        self.size = 0  # bytes of data in entries
        self.retention = Retention()
        self.ids: OrderedDict[str, int] = OrderedDict()
        self.grew = asyncio.Event()

    @property
    def head(self) -> int:
        return self.first + len(self.entries) - 1

    def trim(self, now: float) -> None:
        """Remove the oldest entries past a limit of the retention."""
        keep = self.retention
        while self.entries and (
            (keep.max_entries is not None and len(self.entries) > keep.max_entries)
            or (keep.max_bytes is not None and self.size > keep.max_bytes)
            or (keep.max_age is not None and self.entries[0][0] <= now - keep.max_age)
        ):
            _, data = self.entries.popleft()
            self.size -= len(data)
            self.first += 1


class _LocalKeySpace:
    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self._clock = clock
        self._held: dict[str, tuple[bytes, float]] = {}  # key -> (value, expires at)

    def _current(self, key: str) -> bytes | None:
        held = self._held.get(key)
        if held is None:
            return None
        if held[1] <= self._clock():
            del self._held[key]
            return None
        return held[0]

    async def claim(self, key: str, value: bytes) -> bool:
        if self._current(_check(key)) is not None:
            return False
        self._held[key] = (value, self._clock() + self.ttl)
        return True

    async def renew(self, key: str, value: bytes) -> bool:
        if self._current(_check(key)) != value:
            return False
        self._held[key] = (value, self._clock() + self.ttl)
        return True

    async def release(self, key: str, value: bytes) -> None:
        if self._current(_check(key)) == value:
            del self._held[key]

    async def get(self, key: str) -> bytes | None:
        return self._current(_check(key))

    async def items(self) -> dict[str, bytes]:
        return {key: value for key in list(self._held) if (value := self._current(key)) is not None}


class LocalBus:
    """A bus inside this process: hubs that share the object share the state."""

    address = "local"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._logs: dict[str, _Log] = {}
        self._spaces: dict[str, _LocalKeySpace] = {}
        self._listeners: dict[str, set[asyncio.Queue[bytes]]] = {}

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _log(self, name: str) -> _Log:
        log = self._logs.get(_check(name))
        if log is None:
            log = self._logs[name] = _Log()
        log.trim(self._clock())  # limits apply whenever the log is used (NATS: at once)
        return log

    async def retain(self, log: str, retention: Retention) -> None:
        entries = self._log(log)
        entries.retention = retention
        entries.trim(self._clock())

    async def append(self, log: str, data: bytes, *, msg_id: str) -> Appended:
        entries = self._log(log)
        first = entries.ids.get(msg_id)
        if first is not None:
            return Appended(first, duplicate=True)
        entries.entries.append((self._clock(), bytes(data)))
        entries.size += len(data)
        seq = entries.head
        entries.trim(self._clock())
        entries.ids[msg_id] = seq
        if len(entries.ids) > DEDUP_WINDOW:
            entries.ids.popitem(last=False)
        entries.grew.set()
        entries.grew = asyncio.Event()
        return Appended(seq, duplicate=False)

    async def read(self, log: str, after: int, limit: int = 1000) -> list[LogEntry]:
        entries = self._log(log)
        start = max(after + 1, entries.first)
        end = min(entries.head, start + limit - 1)
        return [LogEntry(seq, entries.entries[seq - entries.first][1]) for seq in range(start, end + 1)]

    async def head(self, log: str) -> int:
        return self._log(log).head

    async def follow(self, log: str, after: int) -> AsyncIterator[LogEntry]:
        entries = self._log(log)
        seq = max(after, 0)
        while True:
            grew = entries.grew
            entries.trim(self._clock())
            seq = max(seq, entries.first - 1)  # removed before we read them: skipped
            while seq < entries.head:
                seq += 1
                yield LogEntry(seq, entries.entries[seq - entries.first][1])
                entries.trim(self._clock())
                seq = max(seq, entries.first - 1)
            await grew.wait()

    async def key_space(self, name: str, ttl: float) -> KeySpace:
        space = self._spaces.get(_check(name))
        if space is None:
            space = self._spaces[name] = _LocalKeySpace(ttl, self._clock)
        return space

    async def signal(self, subject: str, data: bytes) -> None:
        for queue in self._listeners.get(_check(subject), ()):
            queue.put_nowait(bytes(data))

    async def listen(self, subject: str) -> Listener:
        return _LocalListener(self._listeners.setdefault(_check(subject), set()))


class _LocalListener:
    def __init__(self, listeners: set[asyncio.Queue[bytes]]) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._listeners = listeners
        listeners.add(self._queue)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            yield await self._queue.get()

    async def close(self) -> None:
        self._listeners.discard(self._queue)
