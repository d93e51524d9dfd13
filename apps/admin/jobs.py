"""Jobs on the agent: a command's process, its output kept at absolute byte offsets,
and its exit, all independent of any connection.

Theory of operation: a :class:`Job` is created once per client-chosen id and runs
whether or not anyone is attached. Each output stream is an :class:`OutputBuffer`:
bytes are numbered from 0 as the command writes them; readers ask for bytes at an
offset; acknowledged bytes are forgotten. The newest bytes stay in memory up to a
bound; older unacknowledged ones spill to a file under the agent's state directory;
past a second bound (``max_retained``) the agent stops reading the command's pipe,
so the command blocks on write until a client catches up (backpressure, never loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal as signal_module
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

__all__ = ["Job", "JobSpec", "JobTable", "OutputBuffer", "OutputDiscarded", "UnknownJob"]

logger = logging.getLogger(__name__)

#: Bytes of a stream kept in memory before older ones spill to disk.
MEMORY_LIMIT: Final = 4 * 1024 * 1024
#: Unacknowledged bytes of a stream (memory + disk) before the command's pipe is paused.
MAX_RETAINED: Final = 1024 * 1024 * 1024
#: Appends smaller than this extend the last chunk, so tiny writes do not make tiny chunks.
COALESCE: Final = 64 * 1024
#: Seconds between SIGTERM and SIGKILL when --timeout fires.
KILL_GRACE: Final = 2.0
#: Finished jobs whose exit was delivered are forgotten after this many seconds.
KEEP_FINISHED: Final = 600.0
#: Finished jobs nobody collected are forgotten after this many seconds.
KEEP_UNCOLLECTED: Final = 24 * 3600.0
#: Capacity asked for the command's output pipes (Linux F_SETPIPE_SZ).
PIPE_SIZE: Final = 1024 * 1024
#: Bytes written to a command's stdin and not yet taken by it before stdin writes wait.
STDIN_HIGH_WATER: Final = 1024 * 1024


class OutputDiscarded(Exception):
    """The bytes asked for were acknowledged and forgotten."""

    def __init__(self, offset: int, start: int) -> None:
        super().__init__(f"output before offset {start} was acknowledged and discarded (asked {offset})")
        self.offset = offset
        self.start = start


class UnknownJob(Exception):
    """No such job on this agent (never started, or collected and forgotten)."""


class OutputBuffer:
    """One output stream: bytes at absolute offsets, memory first, then a spill file.

    Offsets ``[start, end)`` are held: ``[start, mem_start)`` in the spill file and
    ``[mem_start, end)`` in memory chunks. :meth:`acknowledge` moves ``start`` up.
    """

    def __init__(self, spill_path: Path, memory_limit: int = MEMORY_LIMIT) -> None:
        self.spill_path = spill_path
        self.memory_limit = memory_limit
        self.start = 0
        self.end = 0
        self.eof = False
        self._chunks: deque[bytes | bytearray] = deque()
        self._mem_start = 0
        self._mem_bytes = 0
        self._file: IO[bytes] | None = None
        self._file_origin = 0  # the absolute offset of byte 0 of the spill file
        #: bytes ever written to the spill file (for tests and `jobs`)
        self.spilled = 0

    @property
    def retained(self) -> int:
        """Bytes held (in memory and on disk): appended, not yet acknowledged."""
        return self.end - self.start

    @property
    def in_memory(self) -> int:
        return self._mem_bytes

    @property
    def on_disk(self) -> int:
        if self._file is None:
            return 0
        return max(0, self._mem_start - max(self.start, self._file_origin))

    def append(self, data: bytes) -> None:
        if not data:
            return
        last = self._chunks[-1] if self._chunks else None
        if isinstance(last, bytearray) and len(last) < COALESCE:
            last += data
        elif len(data) >= COALESCE:
            self._chunks.append(data)  # kept as is: a read of the whole chunk copies nothing
        else:
            self._chunks.append(bytearray(data))
        self.end += len(data)
        self._mem_bytes += len(data)
        if self._mem_bytes > self.memory_limit:
            self._spill(self.memory_limit // 2)

    def _spill(self, keep: int) -> None:
        """Move the oldest memory chunks to the file until at most ``keep`` bytes remain."""
        if self._file is None:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.spill_path, "w+b", buffering=0)
            self._file_origin = self._mem_start
        while self._chunks and self._mem_bytes > keep:
            chunk = self._chunks.popleft()
            skip = max(0, self.start - self._mem_start)  # acknowledged bytes never reach the disk
            if skip < len(chunk):
                self._file.seek(self._mem_start + skip - self._file_origin)
                self._file.write(memoryview(chunk)[skip:])
                self.spilled += len(chunk) - skip
            self._mem_start += len(chunk)
            self._mem_bytes -= len(chunk)

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes from ``offset`` (empty at the end).

        Raises:
            OutputDiscarded: ``offset`` was acknowledged already.
            ValueError: ``offset`` is beyond the end.
        """
        if offset < self.start:
            raise OutputDiscarded(offset, self.start)
        if offset > self.end:
            raise ValueError(f"offset {offset} is beyond the end of the output ({self.end})")
        if offset < self._mem_start:
            assert self._file is not None
            size = min(max_bytes, self._mem_start - offset)
            return os.pread(self._file.fileno(), size, offset - self._file_origin)
        parts: list[bytes] = []
        position = self._mem_start
        wanted = max_bytes
        for chunk in self._chunks:
            chunk_end = position + len(chunk)
            if chunk_end > offset:
                lo = max(0, offset - position)
                if lo == 0 and len(chunk) <= wanted and isinstance(chunk, bytes):
                    piece = chunk
                else:
                    piece = bytes(memoryview(chunk)[lo : lo + wanted])
                parts.append(piece)
                wanted -= len(piece)
                if wanted <= 0:
                    break
            position = chunk_end
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def acknowledge(self, offset: int) -> None:
        """Forget everything below ``offset`` (a client has it)."""
        offset = min(offset, self.end)
        if offset <= self.start:
            return
        self.start = offset
        while self._chunks and self._mem_start + len(self._chunks[0]) <= offset:
            chunk = self._chunks.popleft()
            self._mem_start += len(chunk)
            self._mem_bytes -= len(chunk)
        if self._file is not None and self.start >= self._mem_start:
            # the reader caught up with the disk: give the space back
            self._file.truncate(0)
            self._file_origin = self._mem_start

    def close(self) -> None:
        """Free memory and delete the spill file."""
        self._chunks.clear()
        self._mem_bytes = 0
        if self._file is not None:
            self._file.close()
            self._file = None
            with contextlib.suppress(FileNotFoundError):
                self.spill_path.unlink()


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a client asked to run."""

    job_id: str
    argv: list[str]
    owner: str  # the identity's fingerprint (or "anonymous")
    owner_name: str
    tty: bool = False
    timeout: float | None = None
    stdin: bool = True
    cols: int = 0
    rows: int = 0
    shell: bool = False
    term: str | None = None


@dataclass
class _Waiters:
    futures: list[asyncio.Future[None]] = field(default_factory=list)

    def wait(self) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut

    def wake(self) -> None:
        futures, self.futures = self.futures, []
        for fut in futures:
            if not fut.done():
                fut.set_result(None)


class _JobProtocol(asyncio.SubprocessProtocol):
    def __init__(self, job: Job) -> None:
        self.job = job

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # before subprocess_exec returns: a quick command may exit before that
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.job._transport = transport
        self.job.pid = transport.get_pid()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.job._output(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in (1, 2):
            self.job._stream_closed(fd)

    def pause_writing(self) -> None:
        self.job._stdin_paused = True

    def resume_writing(self) -> None:
        self.job._stdin_paused = False
        self.job._stdin_space.wake()

    def process_exited(self) -> None:
        self.job._process_exited()


class _PtyReader(asyncio.Protocol):
    """Reads a pseudo-terminal's master side: stream 1. EIO means the slave is gone."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def data_received(self, data: bytes) -> None:
        self.job._output(1, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.job._stream_closed(1)


class Job:
    """One command, from start to collected exit. Create through :class:`JobTable`."""

    def __init__(self, spec: JobSpec, state_dir: Path, memory_limit: int, max_retained: int) -> None:
        self.spec = spec
        self.id = spec.job_id
        self.started = time.time()
        self.finished: float | None = None
        self.out = OutputBuffer(state_dir / f"{self.id}.stdout", memory_limit)
        self.err = OutputBuffer(state_dir / f"{self.id}.stderr", memory_limit)
        self.max_retained = max_retained
        self.pid: int | None = None
        self.returncode: int | None = None
        self.timed_out = False
        self.error: str | None = None
        self.stdin_offset = 0  # bytes of stdin taken so far (a client resumes from here)
        self.stdin_closed = False
        #: set once a client acknowledged the exit notice
        self.exit_delivered = False
        self.changed = _Waiters()
        self._stdin_space = _Waiters()
        self._stdin_paused = False
        self._transport: asyncio.SubprocessTransport | None = None
        self._open_streams = {1, 2}
        self._exited = False
        self._paused_streams: set[int] = set()
        self._readers: dict[object, list[int]] = {}
        self._timers: list[asyncio.TimerHandle] = []
        self._pty_master: int | None = None
        self._pty_reader: asyncio.ReadTransport | None = None
        self._pty_writer: asyncio.WriteTransport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.spec.argv[:3]!r} {self.state}>"

    @property
    def state(self) -> str:
        if self.done.done():
            return "exited"
        return "running" if self.pid is not None else "starting"

    @property
    def stream_buffers(self) -> tuple[OutputBuffer, OutputBuffer]:
        return self.out, self.err

    def exit_notice(self) -> dict[str, Any]:
        rc = self.returncode
        return {
            "job": self.id,
            "code": rc if rc is not None and rc >= 0 else None,
            "signal": -rc if rc is not None and rc < 0 else None,
            "timed_out": self.timed_out,
            "error": self.error,
        }

    # ------------------------------------------------------------------ starting

    async def start(self) -> None:
        """Start the process; a command that cannot start becomes an exited job with
        code 127 (not found) or 126 (not executable), as a shell reports it."""
        loop = asyncio.get_running_loop()
        stdin: int = asyncio.subprocess.PIPE if self.spec.stdin else asyncio.subprocess.DEVNULL
        try:
            if self.spec.tty:
                await self._start_pty(loop)
            else:
                transport, _ = await loop.subprocess_exec(
                    lambda: _JobProtocol(self),
                    *self.spec.argv,
                    stdin=stdin,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,  # its own process group: signals reach its children
                )
                self._transport = transport
                self.pid = transport.get_pid()
                for fd in (1, 2):
                    _widen_pipe(transport.get_pipe_transport(fd))
        except OSError as exc:
            self.error = f"{self.spec.argv[0]}: {exc.strerror or exc}"
            self.returncode = 127 if isinstance(exc, FileNotFoundError) else 126
            self.err.append(f"korinet-admin agent: cannot run {self.error}\n".encode())
            self._open_streams.clear()
            self._exited = True
            self._maybe_done()
            return
        if self.spec.timeout is not None:
            self._timers.append(loop.call_later(self.spec.timeout, self._time_out))

    async def _start_pty(self, loop: asyncio.AbstractEventLoop) -> None:
        import fcntl
        import pty
        import struct
        import termios

        master, slave = pty.openpty()
        if self.spec.cols and self.spec.rows:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", self.spec.rows, self.spec.cols, 0, 0))

        def controlling_terminal() -> None:  # runs in the child, after setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        try:
            transport, _ = await loop.subprocess_exec(
                lambda: _JobProtocol(self),
                *self.spec.argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env={**os.environ, "TERM": self.spec.term} if self.spec.term else None,
                start_new_session=True,
                preexec_fn=controlling_terminal,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self._transport = transport
        self.pid = transport.get_pid()
        self._pty_master = master
        self._open_streams = {1}
        self.err.eof = True
        os.set_blocking(master, False)
        reader_fd = os.dup(master)
        self._pty_reader, _ = await loop.connect_read_pipe(
            lambda: _PtyReader(self), os.fdopen(reader_fd, "rb")
        )
        writer_fd = os.dup(master)
        self._pty_writer, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(writer_fd, "wb"))

    # ------------------------------------------------------------------ process events

    def _output(self, fd: int, data: bytes) -> None:
        buffer = self.out if fd == 1 else self.err
        buffer.append(data)
        if buffer.retained > self.max_retained:
            self._pause(fd)
        self.changed.wake()

    def _pause(self, fd: int) -> None:
        transport = self._read_transport(fd)
        if transport is not None and fd not in self._paused_streams:
            logger.info("%r: %d bytes of stream %d unacknowledged: pausing it", self, self.max_retained, fd)
            transport.pause_reading()
            self._paused_streams.add(fd)

    def _read_transport(self, fd: int) -> asyncio.ReadTransport | None:
        if self._pty_reader is not None:
            return self._pty_reader if fd == 1 else None
        if self._transport is None:
            return None
        pipe = self._transport.get_pipe_transport(fd)
        return pipe if isinstance(pipe, asyncio.ReadTransport) else None

    def add_reader(self, reader: object, offsets: list[int]) -> None:
        """A client streams this job from ``offsets`` (what it has): bytes are forgotten
        only once every reader has them, so a fast terminal never starves a slow one."""
        self._readers[reader] = list(offsets)

    def remove_reader(self, reader: object) -> None:
        self._readers.pop(reader, None)

    def acknowledge(self, stream: int, offset: int, reader: object = None) -> None:
        """A client (``reader``, see :meth:`add_reader`) has stream ``stream`` (1 or 2)
        up to ``offset``."""
        acked = self._readers.get(reader) if reader is not None else None
        if acked is not None:
            acked[stream - 1] = max(acked[stream - 1], offset)
            offset = min(r[stream - 1] for r in self._readers.values())
        buffer = self.out if stream == 1 else self.err
        buffer.acknowledge(offset)
        if stream in self._paused_streams and buffer.retained <= self.max_retained // 2:
            self._paused_streams.discard(stream)
            transport = self._read_transport(stream)
            if transport is not None:
                transport.resume_reading()

    def _stream_closed(self, fd: int) -> None:
        self._open_streams.discard(fd)
        (self.out if fd == 1 else self.err).eof = True
        self._maybe_done()

    def _process_exited(self) -> None:
        self._exited = True
        if self._transport is not None:
            self.returncode = self._transport.get_returncode()
        if self._pty_master is not None:
            # the slave may be held open by a background child; the job is its process
            self._close_pty()
        self._maybe_done()

    def _close_pty(self) -> None:
        if self._pty_writer is not None:
            self._pty_writer.close()
            self._pty_writer = None
        if self._pty_master is not None:
            os.close(self._pty_master)
            self._pty_master = None

    def _maybe_done(self) -> None:
        if self._exited and not self._open_streams and not self.done.done():
            self.out.eof = self.err.eof = True
            self.finished = time.time()
            for timer in self._timers:
                timer.cancel()
            if self._transport is not None:
                self._transport.close()
            self._close_pty()
            self.done.set_result(None)
            self._stdin_space.wake()
            self.changed.wake()

    # ------------------------------------------------------------------ control

    def send_signal(self, sig: int) -> bool:
        """Signal the job's process group; False if it is gone."""
        if self.pid is None or self.done.done() or self._exited:
            return False
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            os.kill(self.pid, sig)
        return True

    def _time_out(self) -> None:
        if self._exited:
            return
        self.timed_out = True
        logger.info("%r: timed out after %ss, sending SIGTERM", self, self.spec.timeout)
        self.send_signal(signal_module.SIGTERM)
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(KILL_GRACE, lambda: self.send_signal(signal_module.SIGKILL)))

    def resize(self, cols: int, rows: int) -> None:
        if self._pty_master is None:
            return
        import fcntl
        import struct
        import termios

        fcntl.ioctl(self._pty_master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    async def write_stdin(self, offset: int, data: bytes, eof: bool) -> int:
        """Take stdin bytes at an absolute offset (repeats are skipped, so a client that
        re-sends after a new session does not duplicate input); waits while the command
        does not read. Returns the stdin offset now taken.

        Raises:
            ValueError: ``offset`` leaves a gap.
        """
        if offset > self.stdin_offset:
            raise ValueError(f"stdin offset {offset} leaves a gap (have {self.stdin_offset})")
        fresh = data[self.stdin_offset - offset :]
        writer = self._stdin_writer()
        if fresh and writer is not None and not writer.is_closing():
            writer.write(fresh)
        self.stdin_offset += len(fresh)
        if eof and not self.stdin_closed:
            self.stdin_closed = True
            if writer is not None and not writer.is_closing():
                if self._pty_writer is not None:
                    writer.write(b"\x04")  # a terminal's EOF is ^D
                else:
                    writer.close()
        while (
            writer is not None
            and not writer.is_closing()
            and not self.done.done()
            and (self._stdin_paused or writer.get_write_buffer_size() > STDIN_HIGH_WATER)
        ):
            await self._stdin_space.wait()
        return self.stdin_offset

    def _stdin_writer(self) -> asyncio.WriteTransport | None:
        if self._pty_writer is not None:
            return self._pty_writer
        if self._transport is None:
            return None
        pipe = self._transport.get_pipe_transport(0)
        return pipe if isinstance(pipe, asyncio.WriteTransport) else None

    def info(self) -> dict[str, Any]:
        """What `korinet-admin jobs` shows."""
        return {
            "job": self.id,
            "argv": self.spec.argv,
            "owner": self.spec.owner_name,
            "state": self.state,
            "pid": self.pid,
            "started": self.started,
            "finished": self.finished,
            "exit": self.exit_notice() if self.done.done() else None,
            "stdout": self.out.end,
            "stderr": self.err.end,
            "collected": self.exit_delivered,
        }

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        if not self.done.done():
            self.send_signal(signal_module.SIGKILL)
        if self._pty_reader is not None:
            self._pty_reader.close()
        self._close_pty()
        if self._transport is not None:
            self._transport.close()
        self.out.close()
        self.err.close()


def _widen_pipe(transport: asyncio.BaseTransport | None) -> None:
    """Give a pipe 1 MiB instead of 64 KiB (Linux): a command writing fast wakes us
    16 times less often, which is most of the cost of streaming its output."""
    pipe = transport.get_extra_info("pipe") if transport is not None else None
    if pipe is None:
        return
    import fcntl

    with contextlib.suppress(OSError, AttributeError, ValueError):  # ValueError: closed already
        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)


class JobTable:
    """Every job of an agent, by id. A job id is used once: a second submission with
    the same id gets the existing job (the client then attaches), never a second run.

    Ids are also appended to ``state_dir/job-ids``, so that an agent restarted after a
    crash refuses to run a resubmitted id again (its output is lost, its effect is not).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        memory_limit: int = MEMORY_LIMIT,
        max_retained: int = MAX_RETAINED,
        max_jobs: int = 1024,
        keep_finished: float = KEEP_FINISHED,
    ) -> None:
        self.state_dir = state_dir
        self.output_dir = state_dir / "output"
        self.memory_limit = memory_limit
        self.max_retained = max_retained
        self.max_jobs = max_jobs
        self.keep_finished = keep_finished
        self.jobs: dict[str, Job] = {}
        self._ids_path = state_dir / "job-ids"
        self._past_ids = self._load_ids()
        self._ids_file: IO[str] | None = None
        self.on_finished: Callable[[Job], None] | None = None

    def _load_ids(self) -> set[str]:
        try:
            return set(self._ids_path.read_text(encoding="ascii").split())
        except FileNotFoundError:
            return set()

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            if job_id in self._past_ids:
                raise UnknownJob(
                    f"job {job_id} is no longer held (collected and forgotten, or run by an earlier agent "
                    "process): its output is gone"
                )
            raise UnknownJob(f"no job {job_id} on this agent")
        return job

    async def submit(self, spec: JobSpec) -> tuple[Job, bool]:
        """The job with this id, started now if new. Returns ``(job, created)``.

        Raises:
            UnknownJob: the id was used before (by a job since forgotten, or by an
                earlier agent process over the same state directory).
            RuntimeError: too many jobs.
        """
        job = self.jobs.get(spec.job_id)
        if job is not None:
            return job, False
        if spec.job_id in self._past_ids:
            raise UnknownJob(
                f"job {spec.job_id} already ran (it is forgotten now, or it ran under an earlier agent "
                "process); it is not run again"
            )
        if len(self.jobs) >= self.max_jobs:
            raise RuntimeError(f"this agent holds {len(self.jobs)} jobs already; try again later")
        self._record_id(spec.job_id)
        job = Job(spec, self.output_dir, self.memory_limit, self.max_retained)
        self.jobs[spec.job_id] = job
        await job.start()
        job.done.add_done_callback(lambda _: self._finished(job))
        return job, True

    def _record_id(self, job_id: str) -> None:
        self._past_ids.add(job_id)
        try:
            if self._ids_file is None:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                self._ids_file = open(self._ids_path, "a", encoding="ascii")
            self._ids_file.write(job_id + "\n")
            self._ids_file.flush()
        except OSError as exc:
            logger.warning("cannot record job ids in %s: %s", self._ids_path, exc)

    def _finished(self, job: Job) -> None:
        if self.on_finished is not None:
            self.on_finished(job)
        loop = asyncio.get_running_loop()
        loop.call_later(KEEP_UNCOLLECTED, self._forget, job.id)

    def collected(self, job: Job) -> None:
        """A client acknowledged the exit: keep the job a while for `jobs`, then forget it."""
        if not job.exit_delivered:
            job.exit_delivered = True
            asyncio.get_running_loop().call_later(self.keep_finished, self._forget, job.id)

    def _forget(self, job_id: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            job.close()

    def close(self) -> None:
        """Kill every running job (the agent is stopping) and free everything."""
        for job in list(self.jobs.values()):
            job.close()
        self.jobs.clear()
        if self._ids_file is not None:
            self._ids_file.close()
            self._ids_file = None
