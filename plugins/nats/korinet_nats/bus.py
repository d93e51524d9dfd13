"""A :class:`korinet.cluster.ClusterBus` on NATS: logs are JetStream streams, key
spaces are JetStream key-value buckets, signals are core NATS subjects.

Names on the server (one KoriNet bus may share a NATS account with others):

* log ``L``: stream ``KORINET_L`` on subject ``korinet.log.L``; the entry's
  sequence number is the stream's, so every hub reads one order. ``append``
  sends ``Nats-Msg-Id``: within the stream's duplicate window (2 minutes unless
  the address says ``?dedup=SECONDS``) a re-sent entry is stored once.
  A log given a :class:`~korinet.cluster.Retention` gets it as the stream's
  limits (``max_age``, ``max_bytes``, ``max_msgs``; the oldest go first), set when
  the stream is made and changed on a stream that exists.
* key space ``S``: bucket ``KORINET_S`` whose ``ttl`` (max age) is the space's.
* signal subject ``X``: ``korinet.sig.X``.

Address: ``nats://host:port[,host:port...][?replicas=N&dedup=SECONDS]``; the
replica count applies to the streams and buckets this bus creates (a cluster
of 3 wants 3: see docs/CLUSTER.md for what each setting promises).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from korinet.cluster import Appended, BusError, KeySpace, LogEntry, Retention, valid_name

__all__ = ["NatsBus", "parse_address"]

logger = logging.getLogger(__name__)

#: how long one operation (an append with its msg_id, so never twice; making a
#: stream, a consumer or a key space) keeps retrying while the bus is unreachable
#: or electing a leader, or a replicated create takes longer than one request's
#: timeout (a cluster under load)
PATIENCE = 30.0

#: seconds an unsubscribe may take before we stop waiting for it (a JetStream
#: consumer's may need the server, which a shutdown or a node loss can keep away)
UNSUBSCRIBE_PATIENCE = 2.0

#: seconds ``read`` waits for the next entry before it checks whether it was removed
READ_PATIENCE = 1.0

_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionClosedError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)


@dataclass(frozen=True)
class BusAddress:
    servers: list[str]
    replicas: int = 1
    dedup: float = 120.0


def parse_address(address: str) -> BusAddress:
    """``nats://a:4222,b:4222?replicas=3`` -> servers, replicas, dedup window."""
    rest, _, query = address.partition("?")
    scheme, sep, hosts = rest.partition("://")
    if not sep or scheme not in ("nats", "tls") or not hosts:
        raise BusError(f"not a NATS address: {address!r} (nats://HOST:PORT[,HOST:PORT...])")
    servers = [h if "://" in h else f"{scheme}://{h}" for h in hosts.split(",") if h]
    params = parse_qs(query)
    try:
        replicas = int(params.get("replicas", ["1"])[0])
        dedup = float(params.get("dedup", ["120"])[0])
    except ValueError as exc:
        raise BusError(f"bad setting in {address!r}: {exc}") from None
    if not 1 <= replicas <= 5 or dedup <= 0:
        raise BusError(f"bad setting in {address!r}: replicas 1-5, dedup > 0 seconds")
    return BusAddress(servers, replicas, dedup)


@contextlib.contextmanager
def _failing(what: str) -> Iterator[None]:
    """The contract says every method raises BusError: the client library's own
    errors (a timeout while the server is away, a closed connection) become one."""
    try:
        yield
    except BusError:
        raise
    except (nats.errors.Error, OSError) as exc:  # nats' TimeoutError is an OSError too
        raise BusError(f"cannot {what}: {exc!r}") from exc


_T = TypeVar("_T")


def _name(kind: str, name: str) -> str:
    if not valid_name(name):
        raise BusError(f"not a valid {kind} name: {name!r} (letters, digits, - and _ only)")
    return name


class NatsBus:
    """The cluster bus on a NATS server or cluster with JetStream enabled."""

    def __init__(self, address: str, *, connect_timeout: float = 5.0) -> None:
        self.address = address
        self.settings = parse_address(address)
        self.connect_timeout = connect_timeout
        self._nc: Any = None
        self._js: Any = None
        self._streams: set[str] = set()
        self._retention: dict[str, Retention] = {}  # log -> its limits, as retain() set them
        self._closed = False  # close() was called: nothing waits out a "transient" error then

    def __repr__(self) -> str:
        return f"<NatsBus {self.address}>"

    # ------------------------------------------------------------------ link

    async def connect(self) -> None:
        """Connect within ``connect_timeout``; once connected, reconnect for ever (a hub
        never gives up on its bus), saying so once per outage."""
        warned = [False]
        connected = [False]

        async def failed(exc: Exception) -> None:
            if connected[0] and not warned[0]:  # before: connect() raises BusError saying it
                warned[0] = True
                logger.warning("cluster bus %s: %s (reconnecting)", self.address, exc)

        async def reconnected() -> None:
            if warned[0]:
                warned[0] = False
                logger.warning("cluster bus %s: reconnected", self.address)

        try:
            async with asyncio.timeout(self.connect_timeout):
                self._nc = await nats.connect(
                    servers=self.settings.servers,
                    connect_timeout=self.connect_timeout,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    error_cb=failed,
                    reconnected_cb=reconnected,
                )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise BusError(
                f"cannot reach the cluster bus at {self.address}: "
                f"{str(exc) or f'no answer within {self.connect_timeout:g} s'}"
            ) from exc
        connected[0] = True
        self._js = self._nc.jetstream()
        try:
            await self._js.account_info()
        except nats.js.errors.Error as exc:
            await self.close()
            raise BusError(
                f"the NATS server at {self.address} has no JetStream (start it with -js): {exc}"
            ) from exc

    async def close(self) -> None:
        self._closed = True
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            with contextlib.suppress(Exception):
                await self._nc.close()

    @property
    def js(self) -> Any:
        if self._js is None:
            raise BusError("the cluster bus is not connected (call connect() first)")
        return self._js

    async def _patiently(self, what: str, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """``attempt()``, again after an error that passes (see ``_TRANSIENT``) for up
        to ``PATIENCE`` seconds; anything else, or patience run out, is a BusError
        that says ``cannot {what}``. An attempt must be safe to repeat: the one that
        timed out may have been done all the same."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + PATIENCE
        with _failing(f"{what} on {self.address}"):
            while True:
                try:
                    return await attempt()
                except _TRANSIENT:
                    if self._closed or loop.time() > give_up:
                        raise
                    await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ logs

    @staticmethod
    def _stream(log: str) -> tuple[str, str]:
        _name("log", log)
        return f"KORINET_{log}", f"korinet.log.{log}"

    def _limited(self, config: Any, log: str) -> Any:
        """``config`` with the log's retention as the stream's limits (0 / -1: none)."""
        keep = self._retention.get(log, Retention())
        dedup = self.settings.dedup
        if keep.max_age is not None:
            dedup = min(dedup, keep.max_age)  # NATS: the window may not outlast the entries
        return dataclasses.replace(
            config,
            max_age=keep.max_age or 0,
            max_bytes=keep.max_bytes or -1,
            max_msgs=keep.max_entries or -1,
            duplicate_window=dedup,
        )

    async def _ensure_stream(self, log: str) -> tuple[str, str]:
        stream, subject = self._stream(log)
        if stream not in self._streams:
            config = api.StreamConfig(
                name=stream,
                subjects=[subject],
                storage=api.StorageType.FILE,
                num_replicas=self.settings.replicas,
            )
            try:
                await self.js.add_stream(self._limited(config, log))
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code == 10005:  # a replicas-N stream needs N servers up to be made
                    raise BusError(
                        f"cannot make the log {log!r} with replicas={self.settings.replicas} on "
                        f"{self.address}: fewer servers up than replicas ({exc.description})"
                    ) from exc
                info = await self.js.stream_info(stream)  # exists with other settings: use it...
                if log in self._retention:  # ...with the limits its owner asked for
                    await self.js.update_stream(self._limited(info.config, log))
            self._streams.add(stream)
        return stream, subject

    async def retain(self, log: str, retention: Retention) -> None:
        self._retention[_name("log", log)] = retention
        self._streams.discard(self._stream(log)[0])  # made or changed with the limits now
        await self._patiently(f"set the retention of {log!r}", lambda: self._ensure_stream(log))

    async def append(self, log: str, data: bytes, *, msg_id: str) -> Appended:
        async def attempt() -> Appended:  # the same msg_id each time: stored once whatever happened
            stream, subject = await self._ensure_stream(log)
            ack = await self.js.publish(subject, data, stream=stream, headers={"Nats-Msg-Id": msg_id})
            return Appended(int(ack.seq), bool(ack.duplicate))

        return await self._patiently(f"append to {log!r}", attempt)

    async def _state(self, log: str) -> tuple[int, int]:
        """(first, last): the numbers of the first entry kept and of the last one."""
        stream, _ = self._stream(log)
        with _failing(f"read the head of {log!r} on {self.address}"):
            try:
                info = await self.js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                return 1, 0
        return int(info.state.first_seq), int(info.state.last_seq)

    async def head(self, log: str) -> int:
        return (await self._state(log))[1]

    async def read(self, log: str, after: int, limit: int = 1000) -> list[LogEntry]:
        first, head = await self._state(log)
        last = min(head, max(after, first - 1) + limit)
        if last < max(after + 1, first):
            return []
        entries: list[LogEntry] = []

        async def collect() -> None:
            async for entry in self.follow(log, after):
                if entry.seq > last:
                    return
                entries.append(entry)
                if entry.seq == last:
                    return

        collecting = asyncio.get_running_loop().create_task(collect())
        try:
            while True:
                done, _ = await asyncio.wait({collecting}, timeout=READ_PATIENCE)
                if done:
                    collecting.result()
                    break
                # nothing for a while: the entries still wanted may have been removed
                # meanwhile (retention), and then none will ever come
                if (await self._state(log))[0] > last:
                    break
        finally:
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
        return entries

    async def _subscribe(self, log: str, subject: str, config: Any) -> Any:
        """An ordered consumer, retried while the cluster elects a leader (making a
        consumer needs JetStream's meta leader: a node kill can take it)."""
        return await self._patiently(
            f"follow {log!r}",
            lambda: self.js.subscribe(subject, ordered_consumer=True, config=config, idle_heartbeat=2.0),
        )

    async def follow(self, log: str, after: int) -> AsyncGenerator[LogEntry, None]:
        _, subject = await self._patiently(f"follow {log!r}", lambda: self._ensure_stream(log))
        # An ordered consumer: the client library re-creates it from the last
        # sequence it saw whenever a gap, a missed heartbeat or a reconnect shows,
        # so what we yield has no gap and no repeat. If it gives up instead (its
        # message iterator ends: seen while a node of a cluster was killed), we
        # subscribe again from the next entry we owe.
        expected = max(after, 0) + 1
        while True:
            config = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=expected
            )
            sub = await self._subscribe(log, subject, config)
            try:
                async for msg in sub.messages:
                    seq = int(msg.metadata.sequence.stream)
                    if seq < expected:
                        continue  # already yielded (belt and braces over the library's check)
                    if seq > expected:  # entries removed by the stream's limits: say so
                        logger.warning(
                            "cluster bus: log %r skips %d..%d (no longer kept)", log, expected, seq - 1
                        )
                    expected = seq + 1
                    yield LogEntry(seq, msg.data)
            finally:
                with contextlib.suppress(Exception):  # bounded: a shutdown must not wait on it
                    async with asyncio.timeout(UNSUBSCRIBE_PATIENCE):
                        await sub.unsubscribe()
            if self._closed:
                return  # the messages ended because we closed the bus
            logger.warning("cluster bus: following %r stopped at %d; following again", log, expected)
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ keys

    async def key_space(self, name: str, ttl: float) -> KeySpace:
        bucket = f"KORINET_{_name('key space', name)}"

        async def attempt() -> Any:
            try:
                return await self.js.create_key_value(
                    api.KeyValueConfig(bucket=bucket, ttl=ttl, history=1, replicas=self.settings.replicas)
                )
            except nats.js.errors.BadRequestError:
                # exists already: another hub made it, or our own create that timed out did
                return await self.js.key_value(bucket)

        kv = await self._patiently(f"open the key space {name!r}", attempt)
        return _NatsKeySpace(kv, ttl, f"{name!r} on {self.address}")

    # ------------------------------------------------------------------ signals

    async def signal(self, subject: str, data: bytes) -> None:
        if self._nc is None:
            raise BusError("the cluster bus is not connected (call connect() first)")
        with _failing(f"signal on {self.address}"):
            await self._nc.publish(f"korinet.sig.{_name('signal', subject)}", data)

    async def listen(self, subject: str) -> _NatsListener:
        if self._nc is None:
            raise BusError("the cluster bus is not connected (call connect() first)")
        with _failing(f"listen on {self.address}"):
            sub = await self._nc.subscribe(f"korinet.sig.{_name('signal', subject)}")
            await self._nc.flush()  # the server has the subscription when we return
        return _NatsListener(sub)


class _NatsListener:
    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for msg in self._sub.messages:
            yield msg.data

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()


_ABSENT = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.NotFoundError)


class _NatsKeySpace:
    def __init__(self, kv: Any, ttl: float, where: str = "") -> None:
        self.kv = kv
        self.ttl = ttl
        self.where = where

    async def _entry(self, key: str) -> Any:
        with _failing(f"read a key of {self.where}"):
            try:
                return await self.kv.get(_name("key", key))
            except _ABSENT:
                return None

    async def claim(self, key: str, value: bytes) -> bool:
        with _failing(f"claim a key of {self.where}"):
            try:
                await self.kv.create(_name("key", key), value)
            except nats.js.errors.KeyWrongLastSequenceError:
                return False
        return True

    async def renew(self, key: str, value: bytes) -> bool:
        entry = await self._entry(key)
        if entry is None or entry.value != value:
            return False
        with _failing(f"renew a key of {self.where}"):
            try:
                await self.kv.update(key, value, last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return False  # someone changed it meanwhile: it is theirs
        return True

    async def release(self, key: str, value: bytes) -> None:
        entry = await self._entry(key)
        if entry is not None and entry.value == value:
            with _failing(f"release a key of {self.where}"):
                with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                    await self.kv.delete(key, last=entry.revision)

    async def get(self, key: str) -> bytes | None:
        entry = await self._entry(key)
        return None if entry is None else bytes(entry.value)

    async def items(self) -> dict[str, bytes]:
        with _failing(f"list the keys of {self.where}"):
            try:
                keys = await self.kv.keys()
            except nats.js.errors.NoKeysError:
                return {}
        found = {}
        for key in keys:
            value = await self.get(key)
            if value is not None:
                found[key] = value
        return found
