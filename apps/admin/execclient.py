"""The client side of exec, attach, status, jobs, put and get.

:class:`AdminConnection` is one KoriNet session with one agent. It reads the
session's inbox and hands each job's output and exit to its :class:`JobRun`. The
runtime resumes the session by itself after a dropped connection (nothing lost,
nothing repeated); if the session itself is gone (the agent's TTL passed, the
laptop slept), the connection re-attaches every job from the bytes it already has.
A :class:`JobRun` drops any byte below its offsets, so output is never repeated
whatever the agent re-sends, and takes the first exit notice only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from korinet import ConnectionClosed, KoriNetError, KoriNetTimeout, MessageRejected, SessionExpired
from korinet.runtime.client import Client

from . import protocol as p

if TYPE_CHECKING:
    from korinet.plugins import PluginManager
    from korinet.security import ClientTLS

__all__ = [
    "AdminConnection",
    "JobError",
    "JobRun",
    "OutputClosed",
    "Sink",
    "Target",
    "admin_plugins",
    "explain",
    "new_job_id",
    "parse_targets",
]

logger = logging.getLogger(__name__)

#: Bytes of stdin per request.
STDIN_CHUNK: Final = 256 * 1024

#: Where output goes: ``sink(stream, data)`` with stream 1 (stdout) or 2 (stderr).
Sink = Callable[[int, bytes], None]


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Target:
    """An agent: listening at ``host:port``, or, with ``agent``, parked at the relay
    ``host:port`` under that name (reached by dial-home, relay.py)."""

    host: str
    port: int
    agent: str | None = None

    @property
    def label(self) -> str:
        if self.agent is not None:
            relay = self.host if self.port == DEFAULT_RELAY_PORT else f"{self.host}:{self.port}"
            return f"{relay}/{self.agent}"
        return self.host if self.port == _default_port() else f"{self.host}:{self.port}"


#: An agent's name at a relay: it travels as the TLS server name (a DNS-like label).
_AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


DEFAULT_RELAY_PORT: Final = p.DEFAULT_RELAY_PORT


def _default_port() -> int:
    return p.DEFAULT_AGENT_PORT


def parse_targets(text: str) -> list[Target]:
    """``HOST[:PORT][,HOST[:PORT]...]`` to targets (``[V6]:PORT`` for IPv6);
    ``RELAY[:PORT]/AGENT``: the agent AGENT, parked at that relay.

    Raises:
        ValueError: an empty or malformed item.
    """
    from korinet.cli import parse_address

    targets = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty host in {text!r}")
        item, slash, agent = item.partition("/")
        if slash and not _AGENT_NAME.match(agent):
            raise ValueError(f"bad agent name {agent!r} in {text!r} (letters, digits, '.', '_', '-')")
        try:
            host, port = parse_address(item, DEFAULT_RELAY_PORT if slash else _default_port())
        except Exception as exc:  # argparse.ArgumentTypeError
            raise ValueError(str(exc)) from None
        targets.append(Target(host, port, agent or None))
    return targets


def explain(error: BaseException) -> str:
    """An error as the user should read it: the runtime's words, plus what to do when
    the fix is on the agent's side."""
    text = str(error)
    if "is not authorized" in text and "--name NAME)" in text:
        text = text.replace("--name NAME)", "--name NAME --role admin)")
    elif "requires the role 'admin'" in text:
        text += "; on the agent: korinet authorize FINGERPRINT --name NAME --role admin"
    return text


def admin_plugins() -> PluginManager:
    """A plugin manager with the built-ins and this app only: a client needs no other
    app, and loading them all costs start-up time."""
    from korinet.plugins import PluginManager

    from . import plugin

    return PluginManager.load(entry_points=False, extra=[plugin])


class JobError(KoriNetError):
    """The agent refused or lost a job (the message says why)."""


class OutputClosed(JobError):
    """Our stdout (or stderr) was closed, as by ``| head``: the job's output has nowhere to go."""


class JobRun:
    """A job seen from the client: the bytes received so far per stream, the exit."""

    def __init__(
        self, conn: AdminConnection, job_id: str, sink: Sink, offsets: list[int] | None = None
    ) -> None:
        self.conn = conn
        self.id = job_id
        self.sink = sink
        self.offsets = list(offsets) if offsets is not None else [0, 0]
        self.exit: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        #: the agent confirmed the job exists (the exec or attach reply arrived)
        self.confirmed = False
        self.request: dict[str, Any] | None = None  # the exec request, re-sent if never confirmed
        self.stdin_offset = 0
        self.reply: dict[str, Any] = {}
        #: bytes of each stream that another session acknowledged and that we never got
        self.skipped = [0, 0]
        #: exit notices received (the first one counts; more would mean a re-delivery)
        self.exit_notices = 0
        self._held: list[dict[str, Any]] | None = []  # held until the first reply

    def _output(self, data: dict[str, Any]) -> None:
        if self._held is not None:  # the reply saying where the streams start is not in yet
            self._held.append(data)
            return
        index = data["stream"] - 1
        have = self.offsets[index]
        offset = data["offset"]
        chunk: bytes = data["data"]
        if offset > have:
            self._fail(
                JobError(f"job {self.id}: output of stream {index + 1} skipped from {have} to {offset}")
            )
            return
        skip = have - offset
        if skip >= len(chunk):
            return  # already have it (sent again after a re-attach)
        if skip:
            chunk = chunk[skip:]
        self.offsets[index] = have + len(chunk)
        try:
            self.sink(index + 1, chunk)
        except BrokenPipeError:
            self._fail(OutputClosed(f"job {self.id}: the local {('stdout', 'stderr')[index]} was closed"))

    def _exited(self, notice: dict[str, Any]) -> None:
        if self._held is not None:
            self._held.append(notice)
            return
        self.exit_notices += 1
        if not self.exit.done():
            self.exit.set_result(notice)

    def _fail(self, error: BaseException) -> None:
        if not self.exit.done():
            self.exit.set_exception(error)
            self.exit.exception()  # whoever waits gets it; nobody waiting is no error

    def _hold(self) -> None:
        """Keep what arrives until the next exec or attach reply: the agent's pump may
        overtake the reply, whose offsets say where the streams start."""
        if self._held is None:
            self._held = []

    def _release(self) -> None:
        held, self._held = self._held or [], None
        for item in held:
            self._output(item) if "stream" in item else self._exited(item)

    def _confirm(self, reply: dict[str, Any]) -> None:
        self.confirmed = True
        self.reply = reply
        self.stdin_offset = int(reply.get("stdin_offset") or 0)
        offsets = reply.get("offsets")
        if offsets is not None:
            # the agent starts a stream later than asked when a retention bound discarded
            # those bytes: say so, with counts, rather than print less than was written
            skipped = [max(0, int(o) - have) for o, have in zip(offsets, self.offsets, strict=True)]
            self.skipped = [a + b for a, b in zip(self.skipped, skipped, strict=True)]
            self.offsets = [max(int(o), have) for o, have in zip(offsets, self.offsets, strict=True)]
            why = reply.get("discarded") or "retention"
            for name, count, start in zip(("stdout", "stderr"), skipped, self.offsets, strict=True):
                if count:
                    self.conn.notify(
                        f"{count:,} bytes of {name} are no longer kept on the host ({why}); "
                        f"showing from byte {start:,}"
                    )
        self._release()

    async def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """The exit notice (see protocol.ExitNotice)."""
        async with asyncio.timeout(timeout):
            return await asyncio.shield(self.exit)

    async def signal(self, sig: int) -> bool:
        reply = await self.conn.client.request({"job": self.id, "signal": int(sig)}, p.SIGNAL, timeout=10)
        return bool(reply.get("delivered"))

    async def resize(self, cols: int, rows: int) -> None:
        await self.conn.client.request({"job": self.id, "cols": cols, "rows": rows}, p.RESIZE, timeout=10)

    async def send_stdin(self, data: bytes, eof: bool = False) -> None:
        """Send stdin bytes (and the EOF); waits until the agent took them. Survives a
        new session: the agent skips bytes it already has."""
        offset = self.stdin_offset
        request = {"job": self.id, "offset": offset, "data": data, "eof": eof}
        for _ in range(100):
            try:
                reply = await self.conn.client.request(request, p.STDIN)
                break
            except SessionExpired:
                await self.conn.reattached.wait()
        else:
            raise JobError("could not send stdin")
        self.stdin_offset = max(offset + len(data), int(reply.get("offset", 0)))

    async def forward_stdin(self, fd: int = 0) -> None:
        """Forward ``fd`` until its EOF (then close the remote stdin)."""
        reader = _ThreadReader(fd, STDIN_CHUNK)
        while True:
            data = await reader.get()
            await self.send_stdin(data, eof=not data)
            if not data:
                return


def _terminal_type() -> str | None:
    term = os.environ.get("TERM", "")
    return term if term and len(term) <= 64 and all(c.isalnum() or c in "._+-" for c in term) else None


class _ThreadReader:
    """Chunks read from ``fd`` by a daemon thread (files, pipes and terminals alike),
    at most a few ahead of the consumer; ``b""`` at EOF.

    The thread hands chunks over with ``call_soon_threadsafe`` and never builds a
    coroutine: one made for a loop that closes before running it would be reported
    as never awaited, on the user's stderr, as the command exits."""

    AHEAD = 4

    def __init__(self, fd: int, size: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._room = threading.Semaphore(self.AHEAD)
        threading.Thread(target=self._run, args=(fd, size), name="korinet-admin-stdin", daemon=True).start()

    def _run(self, fd: int, size: int) -> None:
        while True:
            self._room.acquire()
            try:
                data = os.read(fd, size)
            except OSError:
                data = b""
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, data)
            except RuntimeError:
                return  # the loop is closed: we are exiting
            if not data:
                return

    async def get(self) -> bytes:
        data = await self._queue.get()
        self._room.release()
        return data


class AdminConnection:
    """One session with one agent.

    Open with :meth:`open`; :meth:`exec`, :meth:`attach`, :meth:`request`; :meth:`close`.
    """

    def __init__(self, client: Client, target: Target) -> None:
        self.client = client
        self.target = target
        self.runs: dict[str, JobRun] = {}
        self.reattached = asyncio.Event()
        self.reattached.set()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self._tasks: set[asyncio.Task[Any]] = set()
        #: called with a line to tell the user about the connection (lost, back, re-attached)
        self.notify: Callable[[str], None] = lambda line: None

    @classmethod
    async def open(
        cls,
        target: Target,
        *,
        tls: ClientTLS | None,
        plugins: PluginManager | None = None,
        open_timeout: float = 10.0,
        **client_kwargs: Any,
    ) -> AdminConnection:
        """Connect to an agent.

        Raises:
            KoriNetError: no session (refused key, no agent, timeout: the message says).
        """
        if target.agent is not None:
            # The relay must not be trusted with the agent's key: no pinning on first use.
            if tls is None:
                raise KoriNetError(f"{target.label}: a relay is reached over TLS only, not in plaintext")
            if tls.fingerprint is None:
                raise KoriNetError(
                    f"{target.label}: an agent behind a relay needs its key pinned: give it a"
                    ' [hosts.NAME] entry with address and key = "SHA256:..." in hosts.toml'
                )
            client_kwargs["server_hostname"] = target.agent  # the name the relay routes by
        client = Client(
            target.host, target.port, plugins=plugins or admin_plugins(), tls=tls, **client_kwargs
        )
        client.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + open_timeout
        try:
            while True:
                try:
                    # short waits: a refused connection is reported at once, as ssh does,
                    # while other errors (a host still booting, a lossy link) are retried
                    await client.wait_connected(min(0.1, max(0.0, deadline - loop.time())))
                    client._raise_if_closed()  # woken because the session was refused
                    break
                except KoriNetTimeout:
                    if target.agent is not None and "UNRECOGNIZED_NAME" in str(client.last_error):
                        raise KoriNetError(
                            f"{target.agent} is not connected to the relay {target.host}:{target.port}"
                        ) from None
                    if isinstance(client.last_error, ConnectionRefusedError):
                        raise KoriNetError(
                            f"connection to {target.host}:{target.port} refused (is the agent running?)"
                        ) from None
                    if isinstance(client.last_error, socket.gaierror):
                        raise KoriNetError(f"cannot resolve {target.host}: {client.last_error}") from None
                    if loop.time() >= deadline:
                        raise KoriNetTimeout(
                            f"no session with {target.host}:{target.port} within {open_timeout:g}s"
                            + (f" (last error: {client.last_error})" if client.last_error else "")
                        ) from None
        except BaseException:
            await client.abort()
            raise
        return cls(client, target)

    async def close(self) -> None:
        self._reader.cancel()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, KoriNetError):
            await self._reader
        with contextlib.suppress(KoriNetError, OSError):
            await self.client.close(timeout=2.0)

    async def request(self, obj: Any, mtype: str, timeout: float | None = 30.0) -> Any:
        return await self.client.request(obj, mtype, timeout=timeout)

    async def exec(
        self,
        argv: list[str],
        sink: Sink,
        *,
        job_id: str | None = None,
        shell: bool = False,
        tty: bool = False,
        timeout: float | None = None,
        stdin: bool = True,
        size: tuple[int, int] = (0, 0),
        offsets: list[int] | None = None,
    ) -> JobRun:
        """Start a job (or, for an id the agent knows, attach to it).

        Raises:
            MessageRejected: the agent refused (policy, role, a bad request).
        """
        run = JobRun(self, job_id or new_job_id(), sink, offsets)
        run.request = {
            "job": run.id,
            "argv": list(argv),
            "shell": shell,
            "tty": tty,
            "timeout": timeout,
            "stdin": stdin,
            "cols": size[0],
            "rows": size[1],
            "term": _terminal_type() if tty else None,
            "offsets": list(run.offsets),
        }
        self.runs[run.id] = run
        try:
            reply = await self._send_exec(run)
        except BaseException:
            self.runs.pop(run.id, None)
            raise
        run._confirm(reply)
        return run

    async def _send_exec(self, run: JobRun) -> dict[str, Any]:
        assert run.request is not None
        for _ in range(100):
            try:
                return dict(await self.client.request({**run.request, "offsets": list(run.offsets)}, p.EXEC))
            except SessionExpired:
                continue  # the request may not have reached the agent: the same id is safe to resend
        raise JobError("the session kept expiring")

    async def attach(self, job_id: str, sink: Sink, offsets: list[int] | None = None) -> JobRun:
        """Re-join a job; ``offsets`` None starts from the oldest bytes the agent holds.

        Raises:
            MessageRejected: unknown job, another identity's job, discarded offsets.
        """
        run = JobRun(self, job_id, sink, offsets)
        self.runs[job_id] = run
        try:
            reply = await self.client.request({"job": job_id, "offsets": offsets}, p.ATTACH, timeout=30)
        except BaseException:
            self.runs.pop(job_id, None)
            raise
        run._confirm(dict(reply))
        return run

    async def _read(self) -> None:
        client = self.client
        while True:
            try:
                msg = await client.recv_message()
            except SessionExpired:
                self.notify("the session expired; re-attaching from the bytes already received")
                self._spawn(self._reattach_all())
                continue
            except (ConnectionClosed, KoriNetError) as exc:
                for failed in self.runs.values():
                    failed._fail(exc)
                return
            data = msg.data
            run = self.runs.get(str(data.get("job"))) if isinstance(data, dict) else None
            if run is None:
                continue
            try:
                if msg.type == p.OUTPUT:
                    run._output(data)
                elif msg.type == p.EXIT:
                    run._exited(data)
            except Exception as exc:  # a failing sink ends its job, not the whole connection
                logger.exception("job %s: cannot take its output", run.id)
                run._fail(JobError(f"job {run.id}: cannot take its output: {exc!r}"))

    async def _reattach_all(self) -> None:
        self.reattached.clear()
        try:
            for run in list(self.runs.values()):
                if run.exit.done():
                    continue
                run._hold()
                try:
                    if run.confirmed:
                        reply = await self.client.request(
                            {"job": run.id, "offsets": list(run.offsets)}, p.ATTACH, timeout=30
                        )
                    else:
                        reply = await self._send_exec(run)
                    run._confirm(dict(reply))
                except MessageRejected as exc:
                    run._fail(JobError(f"cannot re-attach job {run.id}: {exc}"))
                except KoriNetError as exc:
                    run._fail(exc)
        finally:
            self.reattached.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# ---------------------------------------------------------------------- sinks


class StdSink:
    """Writes stream 1 to our stdout and 2 to our stderr, bytes as they are."""

    def __init__(self) -> None:
        self.out = sys.stdout.buffer
        self.err = sys.stderr.buffer

    def __call__(self, stream: int, data: bytes) -> None:
        target = self.out if stream == 1 else self.err
        target.write(data)
        target.flush()

    def close(self) -> None:
        pass


class PrefixSink:
    """Prefixes every line with ``label: `` (fan-out); a last line without a newline
    is completed at :meth:`close`."""

    def __init__(self, label: str, write: Callable[[int, bytes], None] | None = None) -> None:
        self.prefix = f"{label}: ".encode()
        self.write = write or _write_std
        self._partial: dict[int, bytes] = {1: b"", 2: b""}

    def __call__(self, stream: int, data: bytes) -> None:
        data = self._partial[stream] + data
        lines = data.split(b"\n")
        self._partial[stream] = lines.pop()
        if lines:
            self.write(stream, b"".join(self.prefix + line + b"\n" for line in lines))

    def close(self) -> None:
        for stream, rest in self._partial.items():
            if rest:
                self.write(stream, self.prefix + rest + b"\n")
        self._partial = {1: b"", 2: b""}


def _write_std(stream: int, data: bytes) -> None:
    target = sys.stdout.buffer if stream == 1 else sys.stderr.buffer
    target.write(data)
    target.flush()
