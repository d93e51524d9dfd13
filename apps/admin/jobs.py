"""Jobs on the agent: each runs under a supervisor process of its own, its output in
files at absolute byte offsets, independent of any connection and of the agent.

Theory of operation: a :class:`Job` is created once per client-chosen id. The agent
writes what to run to a job directory (``STATE_DIR/jobs/ID``, see
:mod:`korinet_admin.supervisor` for its files) and starts a supervisor there, in a
session of its own. The supervisor runs the command, appends its stdout and stderr
to two files as they come and writes the exit status last, so a job keeps running
when the agent is killed, crashes or is upgraded; an agent started again over the
same state directory re-adopts every job it finds (:meth:`JobTable.adopt`).

Byte N of a stream is byte N of its file, so a client asks for output at any
offset it has. Output is kept after clients acknowledged it (``attach --from``
works for any offset) until one of the retention bounds says otherwise: a job
finished longer than ``retention`` ago is removed; beyond ``job_cap`` bytes in one
job, or ``total_cap`` in all, the oldest *acknowledged* bytes are discarded (holes
punched in the files, offsets unchanged). Unacknowledged bytes are never discarded:
past ``max_retained`` of them in a stream, the supervisor stops reading the
command's pipe and the command blocks on write (backpressure, never loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal as signal_module
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from . import supervisor as sv

__all__ = [
    "Job",
    "JobConflict",
    "JobSpec",
    "JobTable",
    "OutputDiscarded",
    "OutputFile",
    "UnknownJob",
]

logger = logging.getLogger(__name__)

#: Unacknowledged bytes of a stream before the command's pipe is paused.
MAX_RETAINED: Final = 1024 * 1024 * 1024
#: Output bytes (both streams) kept per job; beyond, the oldest acknowledged ones go.
JOB_CAP: Final = 2 * 1024 * 1024 * 1024
#: Output bytes kept for all jobs together; beyond, the oldest acknowledged ones go.
TOTAL_CAP: Final = 10 * 1024 * 1024 * 1024
#: Seconds a finished job (its output, its exit) is kept, collected or not.
RETENTION: Final = 24 * 3600.0
#: Seconds between SIGTERM and SIGKILL when a job's --timeout fires (its supervisor does it).
KILL_GRACE: Final = 2.0
#: Capacity asked for a command's stdin pipe (Linux): stdin the agent took and the
#: command did not read yet waits there, where it outlives the agent.
STDIN_PIPE_SIZE: Final = 1024 * 1024
#: Seconds the supervisor gets to start the command and say so.
START_TIMEOUT: Final = 30.0
#: The agent's own record of a job (acknowledged offsets, stdin closed, collected).
STATE: Final = "state.json"
#: The stdin offset taken, rewritten in place at each stdin request.
STDIN_OFFSET: Final = "stdin.offset"


class OutputDiscarded(Exception):
    """The bytes asked for are no longer kept (a retention bound discarded them)."""

    def __init__(self, offset: int, start: int) -> None:
        super().__init__(f"output before offset {start} is no longer kept (asked {offset})")
        self.offset = offset
        self.start = start


class UnknownJob(LookupError):
    """No such job on this agent (never started, or removed after its retention)."""


class JobConflict(ValueError):
    """A job id given again with another command."""


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of ``[offset, offset+length)`` keeping the file's size and
    offsets (Linux fallocate PUNCH_HOLE|KEEP_SIZE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    return bool(fallocate(fd, 0x02 | 0x01, offset, length) == 0)


class OutputFile:
    """One output stream as the agent sees it: the file its supervisor appends to.

    Offsets ``[start, end)`` are held; ``start`` moves up only when a retention bound
    discards bytes (:meth:`discard`).
    """

    def __init__(self, path: Path, start: int = 0) -> None:
        self.path = path
        self.start = start
        self.end = 0
        self.eof = False
        self._fd: int | None = None

    @property
    def retained(self) -> int:
        """Bytes held on disk."""
        return self.end - self.start

    def _open(self) -> int | None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                return None
        return self._fd

    def refresh(self) -> bool:
        """Take the file's size as the end; True if it grew."""
        fd = self._open()
        if fd is None:
            return False
        size = os.fstat(fd).st_size
        if size > self.end:
            self.end = size
            return True
        return False

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes from ``offset`` (empty at the end).

        Raises:
            OutputDiscarded: ``offset`` is below what is kept.
            ValueError: ``offset`` is beyond the end.
        """
        if offset < self.start:
            raise OutputDiscarded(offset, self.start)
        if offset > self.end:
            raise ValueError(f"offset {offset} is beyond the end of the output ({self.end})")
        fd = self._open() if offset < self.end else None
        if fd is None:
            return b""
        return os.pread(fd, min(max_bytes, self.end - offset), offset)

    def discard(self, upto: int) -> int:
        """Stop keeping the bytes below ``upto``; returns how many went."""
        upto = min(upto, self.end)
        if upto <= self.start:
            return 0
        gone = upto - self.start
        fd = self._open()
        if fd is not None and not _punch_hole(fd, self.start, gone):
            logger.debug("%s: cannot punch a hole; the disk space is freed with the job", self.path)
        self.start = upto
        return gone

    def close(self) -> None:
        """Close the file (reads open it again): an agent holding 1000 finished jobs
        must not hold 2000 descriptors."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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


class _StdinProtocol(asyncio.Protocol):
    def __init__(self, job: Job) -> None:
        self.job = job

    def resume_writing(self) -> None:
        self.job._stdin_space.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.job._stdin_space.wake()


class Job:
    """One command under its supervisor, from start to removal. Create through
    :class:`JobTable` (``start`` for a new job, ``adopt`` for one found on disk)."""

    def __init__(self, spec: JobSpec, job_dir: Path, max_retained: int, started: float) -> None:
        self.spec = spec
        self.id = spec.job_id
        self.dir = job_dir
        self.started = started
        self.finished: float | None = None
        self.max_retained = max_retained
        self.pid: int | None = None  # the command's
        self.supervisor_pid: int | None = None
        self._supervisor_start: int | None = None  # its start time: a pid names it only with this
        self.returncode: int | None = None
        self.timed_out = False
        self.error: str | None = None
        self.stdin_offset = 0  # bytes of stdin taken so far (a client resumes from here)
        self.stdin_closed = False
        #: set once a client acknowledged the exit notice
        self.exit_delivered = False
        #: per stream, the offset every attached client had acknowledged (flow control)
        self.acked = [0, 0]
        #: the agent audited the exit (an adopting agent does it for a job that ended meanwhile)
        self.exit_audited = False
        #: why bytes were discarded, for the notice a client prints
        self.discard_reason: str | None = None
        self.changed = _Waiters()
        self.started_event = asyncio.Event()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.out = OutputFile(job_dir / sv.STREAM_FILES[0])
        self.err = OutputFile(job_dir / sv.STREAM_FILES[1])
        self._stdin_space = _Waiters()
        self._stdin_writer: asyncio.WriteTransport | None = None
        self._readers: dict[object, list[int]] = {}
        self._limits = [max_retained, max_retained]
        self._events: int | None = None
        self._control: int | None = None
        self._pidfd: int | None = None
        self._poll_timer: asyncio.TimerHandle | None = None
        self._save_timer: asyncio.TimerHandle | None = None
        self._stdin_record: int | None = None

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.spec.argv[:3]!r} {self.state}>"

    @property
    def state(self) -> str:
        if self.done.done():
            return "exited"
        return "running" if self.pid is not None else "starting"

    @property
    def stream_buffers(self) -> tuple[OutputFile, OutputFile]:
        return self.out, self.err

    def paused(self, stream: int) -> bool:
        """Whether the supervisor stopped reading stream ``stream`` (flow control)."""
        return not self.done.done() and self.stream_buffers[stream - 1].end >= self._limits[stream - 1]

    def exit_notice(self) -> dict[str, Any]:
        rc = self.returncode
        return {
            "job": self.id,
            "code": rc if rc is not None and rc >= 0 else None,
            "signal": -rc if rc is not None and rc < 0 else None,
            "timed_out": self.timed_out,
            "error": self.error,
        }

    # ------------------------------------------------------------------ starting, adopting

    async def start(self, launcher: Launcher) -> None:
        """Write the job directory and have ``launcher`` start its supervisor; returns once
        the command runs (or could not start: an exited job with code 127 or 126, as a
        shell says)."""
        self.dir.mkdir(mode=0o700, parents=True)
        spec = {
            **asdict(self.spec),
            "started": self.started,
            "limit": self.max_retained,
            "kill_grace": KILL_GRACE,
        }
        sv.write_json(self.dir / sv.SPEC, spec)
        for fifo in (sv.CONTROL, sv.EVENTS, *((sv.STDIN,) if self.spec.stdin else ())):
            os.mkfifo(self.dir / fifo, 0o600)
        self._save()
        self._watch_events()
        launcher.launch(self.dir)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self.started_event.wait()
        except TimeoutError:
            self._lost("its supervisor did not start the command in time")

    def adopt(self) -> None:
        """Take over a job found on disk: read what the agent recorded, then follow the
        supervisor (running: by its pid and start time; finished: its status file)."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            state = json.loads((self.dir / STATE).read_text(encoding="utf-8"))
            self.stdin_offset = int(state.get("stdin_offset", 0))
            self.stdin_closed = bool(state.get("stdin_closed", False))
            self.exit_delivered = bool(state.get("collected", False))
            self.acked = [int(o) for o in state.get("acked", [0, 0])]
            self.out.start, self.err.start = (int(o) for o in state.get("start", [0, 0]))
            self.discard_reason = state.get("discard_reason")
            self.exit_audited = bool(state.get("exit_audited", False))
        with contextlib.suppress(FileNotFoundError, ValueError):
            recorded = int((self.dir / STDIN_OFFSET).read_bytes() or b"0")
            self.stdin_offset = max(self.stdin_offset, recorded)
        self._limits = [a + self.max_retained for a in self.acked]
        if self.spec.tty:
            self.err.eof = True
        self._refresh()
        if self.done.done():
            return
        if self.supervisor_pid is None and time.time() - self.started < START_TIMEOUT:
            # the earlier agent stopped while this job was starting: its supervisor may
            # still come (the launcher forks what it was given before it exits)
            self._watch_events()
            asyncio.get_running_loop().call_later(START_TIMEOUT, self._check_started)
            self._refresh()
            return
        if self.supervisor_pid is None or not _alive(self.supervisor_pid, self._supervisor_start):
            self._lost("its supervisor is gone (killed?) and left no exit status")
            return
        self._watch_events()
        self._watch_supervisor()
        for stream in (1, 2):
            self._send_limit(stream, force=True)
        self._refresh()  # anything written before we held the events FIFO

    def _check_started(self) -> None:
        if not self.done.done() and self.supervisor_pid is None:
            self._lost("its supervisor did not start the command in time")

    def _watch_events(self) -> None:
        # read-write: the FIFO never reports EOF when a supervisor lets go of it
        self._events = os.open(self.dir / sv.EVENTS, os.O_RDWR | os.O_NONBLOCK)
        asyncio.get_running_loop().add_reader(self._events, self._on_events)

    def _watch_supervisor(self) -> None:
        """Know when the supervisor ends: a pidfd where there is one, else a poll."""
        assert self.supervisor_pid is not None
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self.supervisor_pid)
        except (OSError, AttributeError):
            self._poll_timer = loop.call_later(1.0, self._poll_supervisor)
            return
        loop.add_reader(self._pidfd, self._supervisor_ended)

    def _poll_supervisor(self) -> None:
        self._poll_timer = None
        if self.done.done():
            return
        if self.supervisor_pid is not None and _alive(self.supervisor_pid, self._supervisor_start):
            pass
        else:
            self._supervisor_ended()
            return
        self._poll_timer = asyncio.get_running_loop().call_later(1.0, self._poll_supervisor)

    def _supervisor_ended(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._refresh()
        if not self.done.done():
            self._lost("its supervisor ended (killed?) without an exit status")

    def _on_events(self) -> None:
        assert self._events is not None
        with contextlib.suppress(BlockingIOError):
            while os.read(self._events, 65536):
                pass
        self._refresh()

    def _refresh(self) -> None:
        """Look at the job directory: the supervisor's pids, the output sizes, the exit."""
        if self.supervisor_pid is None or self.pid is None:
            with contextlib.suppress(FileNotFoundError, ValueError):
                info = json.loads((self.dir / sv.SUPERVISOR).read_text(encoding="utf-8"))
                known = self.supervisor_pid is not None
                self.supervisor_pid = int(info["pid"])
                self._supervisor_start = info.get("start")
                self.pid = info.get("child")
                self.started_event.set()
                if not known and self._events is not None:  # a job we started: follow it now
                    self._watch_supervisor()
        grew = self.out.refresh() | self.err.refresh()
        if not self.done.done():
            try:
                status = json.loads((self.dir / sv.STATUS).read_text(encoding="utf-8"))
            except (FileNotFoundError, ValueError):
                status = None
            if status is not None:
                self.out.refresh()
                self.err.refresh()
                self.returncode = status.get("returncode")
                self.timed_out = bool(status.get("timed_out"))
                self.error = status.get("error")
                self._finish(float(status.get("finished") or time.time()))
                return
        if grew:
            self.changed.wake()

    def _lost(self, why: str) -> None:
        """The job ended without an exit status we can read."""
        logger.warning("%r: %s", self, why)
        self.error = f"the job's exit status is unknown: {why}"
        self.out.refresh()
        self.err.refresh()
        self._finish(time.time())

    def _finish(self, finished: float) -> None:
        self.out.eof = self.err.eof = True
        self.finished = finished
        self.started_event.set()
        self._stop_watching()
        self._drop_stdin()
        if not self.done.done():
            self.done.set_result(None)
        self._stdin_space.wake()
        self.changed.wake()

    def _stop_watching(self) -> None:
        loop = asyncio.get_running_loop()
        if self._events is not None:
            loop.remove_reader(self._events)
            os.close(self._events)
            self._events = None
        if self._pidfd is not None:
            loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        if self._control is not None:
            os.close(self._control)
            self._control = None
        if self._stdin_record is not None:
            os.close(self._stdin_record)
            self._stdin_record = None

    # ------------------------------------------------------------------ flow control

    def add_reader(self, reader: object, offsets: list[int]) -> None:
        """A client streams this job from ``offsets`` (what it has): flow control waits
        for the slowest attached client, so a fast terminal never starves a slow one."""
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
        index = stream - 1
        offset = min(offset, self.stream_buffers[index].end)
        if offset <= self.acked[index]:
            return
        self.acked[index] = offset
        self._send_limit(stream)
        self._save_soon()

    def _send_limit(self, stream: int, force: bool = False) -> None:
        index = stream - 1
        limit = self.acked[index] + self.max_retained
        sent = self._limits[index]
        if self.done.done() or not (force or limit > sent):
            return
        # a supervisor paused near the old limit needs the news now; otherwise batch them
        near = self.stream_buffers[index].end + sv.READ_SIZE >= sent
        if force or near or limit - sent >= self.max_retained // 4:
            if self._send(f"limit {stream} {limit}"):
                self._limits[index] = limit

    def _send(self, line: str) -> bool:
        """A line to the supervisor; False if there is none to hear it."""
        if self.done.done() and not line.startswith("signal"):
            return False
        try:
            if self._control is None:
                self._control = os.open(self.dir / sv.CONTROL, os.O_WRONLY | os.O_NONBLOCK)
            os.write(self._control, line.encode("ascii") + b"\n")
        except OSError:
            if self._control is not None:
                os.close(self._control)
                self._control = None
            return False
        return True

    # ------------------------------------------------------------------ control

    def send_signal(self, sig: int) -> bool:
        """Signal the job's process group (through its supervisor); False if it is gone."""
        if self.done.done() or self.returncode is not None:
            return False
        return self._send(f"signal {int(sig)}")

    def resize(self, cols: int, rows: int) -> None:
        if self.spec.tty:
            self._send(f"resize {cols} {rows}")

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
        writer = await self._stdin() if (fresh or eof) and not self.stdin_closed else None
        if fresh and writer is not None:
            writer.write(fresh)
        self.stdin_offset += len(fresh)
        # reply once the bytes are in the pipe: the kernel keeps them for the command
        # (its supervisor holds the pipe open) even if this agent is killed next
        while (
            writer is not None
            and not writer.is_closing()
            and not self.done.done()
            and writer.get_write_buffer_size()
        ):
            await self._stdin_space.wait()
        if eof and not self.stdin_closed:
            self.stdin_closed = True
            if writer is not None:
                writer.close()
                self._stdin_writer = None
            self._send("eof")
            self._save()
        self._record_stdin()
        return self.stdin_offset

    def _drop_stdin(self) -> None:
        writer, self._stdin_writer = self._stdin_writer, None
        if writer is not None and not writer.is_closing():  # closed already when the reader left
            writer.abort()

    async def _stdin(self) -> asyncio.WriteTransport | None:
        if self._stdin_writer is not None and not self._stdin_writer.is_closing():
            return self._stdin_writer
        if not self.spec.stdin or self.done.done():
            return None
        try:
            fd = os.open(self.dir / sv.STDIN, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return None  # ENXIO: nobody reads it any more (the command closed its stdin)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, AttributeError):
            import fcntl

            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), STDIN_PIPE_SIZE)
        pipe = os.fdopen(fd, "wb")
        self._stdin_writer, _ = await loop.connect_write_pipe(lambda: _StdinProtocol(self), pipe)
        self._stdin_writer.set_write_buffer_limits(high=0)  # told when the buffer is empty
        return self._stdin_writer

    # ------------------------------------------------------------------ the agent's record

    def _record_stdin(self) -> None:
        """The stdin offset taken, for the next agent: one pwrite of a fixed-width number
        per request (state.json, rewritten and renamed, would cost more per chunk)."""
        try:
            if self._stdin_record is None:
                self._stdin_record = os.open(self.dir / STDIN_OFFSET, os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(self._stdin_record, b"%020d\n" % self.stdin_offset, 0)
        except OSError as exc:
            logger.debug("%r: cannot record its stdin offset: %s", self, exc)

    def _save_soon(self) -> None:
        if self._save_timer is None:
            self._save_timer = asyncio.get_running_loop().call_later(1.0, self._save)

    def _save(self) -> None:
        if self._save_timer is not None:
            self._save_timer.cancel()
            self._save_timer = None
        state = {
            "stdin_offset": self.stdin_offset,
            "stdin_closed": self.stdin_closed,
            "collected": self.exit_delivered,
            "acked": self.acked,
            "start": [self.out.start, self.err.start],
            "discard_reason": self.discard_reason,
            "exit_audited": self.exit_audited,
        }
        try:
            sv.write_json(self.dir / STATE, state)
        except OSError as exc:  # removed meanwhile, or a full disk: the job runs on
            logger.debug("%r: cannot save its state: %s", self, exc)

    def discard(self, budget: int, reason: str) -> int:
        """Discard up to ``budget`` of the oldest acknowledged bytes; returns how many."""
        freed = 0
        for index, buffer in enumerate(self.stream_buffers):
            if freed >= budget:
                break
            freed += buffer.discard(min(self.acked[index], buffer.start + budget - freed))
        if freed:
            self.discard_reason = reason
            self._save()
        return freed

    @property
    def held(self) -> int:
        return self.out.retained + self.err.retained

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

    def close(self, kill: bool = False) -> None:
        """Let go of the job (it keeps running unless ``kill``)."""
        if kill and not self.done.done():
            self.send_signal(signal_module.SIGKILL)
        if self._save_timer is not None:
            self._save()
        self._drop_stdin()
        self._stop_watching()
        self.out.close()
        self.err.close()


class Launcher:
    """The agent's side of ``python -m korinet_admin.supervisor --launcher`` (see
    :func:`korinet_admin.supervisor.launch_forever`): started once, it forks a
    supervisor per job in a millisecond. Started again if it died."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self.log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "korinet_admin.supervisor", "--launcher"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True,  # a signal to the agent's group is not for the jobs
            )  # fmt: skip
        finally:
            os.close(log)

    def launch(self, job_dir: Path) -> None:
        for attempt in range(2):
            self.start()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(os.fsencode(job_dir) + b"\n")
                self._proc.stdin.flush()
                return
            except BrokenPipeError:
                logger.warning("the job launcher died (see %s); starting it again", self.log)
                self._proc.wait()
                if attempt:
                    raise

    def close(self) -> None:
        """Let the launcher go (at EOF it exits; the jobs it started run on)."""
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def _alive(pid: int, start: int | None) -> bool:
    """Whether ``pid`` still names the process that started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or sv.process_start(pid) in (start, None)


class JobTable:
    """Every job of an agent, by id. A job id is used once: a second submission with
    the same id gets the existing job (the client then attaches), never a second run.

    Ids are also appended to ``state_dir/job-ids``, so that an agent never runs an id
    again, even after the job was removed.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        max_retained: int = MAX_RETAINED,
        max_jobs: int = 1024,
        retention: float = RETENTION,
        job_cap: int = JOB_CAP,
        total_cap: int = TOTAL_CAP,
    ) -> None:
        self.state_dir = state_dir
        self.jobs_dir = state_dir / "jobs"
        self.max_retained = max_retained
        self.max_jobs = max_jobs
        self.retention = retention
        self.job_cap = job_cap
        self.total_cap = total_cap
        self.jobs: dict[str, Job] = {}
        self._ids_path = state_dir / "job-ids"
        self._past_ids = self._load_ids()
        self._ids_file: IO[str] | None = None
        self.on_finished: Callable[[Job], None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.launcher = Launcher(state_dir / "launcher.log")

    def _load_ids(self) -> set[str]:
        try:
            return set(self._ids_path.read_text(encoding="ascii").split())
        except FileNotFoundError:
            return set()

    def adopt(self) -> list[Job]:
        """Take over the jobs an earlier agent left in the state directory; returns them."""
        adopted = []
        for job_dir in sorted(self.jobs_dir.glob("*")) if self.jobs_dir.is_dir() else []:
            try:
                raw = json.loads((job_dir / sv.SPEC).read_text(encoding="utf-8"))
                started = float(raw.pop("started"))
                raw.pop("limit", None)
                raw.pop("kill_grace", None)
                spec = JobSpec(**raw)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                logger.warning("%s: not a job directory (%s); left alone", job_dir, exc)
                continue
            job = Job(spec, job_dir, self.max_retained, started)
            job.adopt()
            self._past_ids.add(job.id)
            self.jobs[job.id] = job
            self._follow(job)
            adopted.append(job)
        self._sweep()
        self.launcher.start()  # now, not when the first job waits for it
        return adopted

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            if job_id in self._past_ids:
                raise UnknownJob(
                    f"job {job_id} is no longer kept on the host (removed {self.retention / 3600:g} h after "
                    "it finished): its output is gone"
                )
            raise UnknownJob(f"no job {job_id} on this agent")
        return job

    async def submit(self, spec: JobSpec) -> tuple[Job, bool]:
        """The job with this id, started now if new. Returns ``(job, created)``.

        Raises:
            UnknownJob: the id was used before, by a job since removed.
            RuntimeError: too many jobs.
        """
        job = self.jobs.get(spec.job_id)
        if job is not None:
            return job, False
        if spec.job_id in self._past_ids:
            raise UnknownJob(
                f"job {spec.job_id} already ran and is no longer kept on the host; it is not run again"
            )
        if len(self.jobs) >= self.max_jobs:
            # make room by the oldest job whose exit was collected, before its retention ends
            collected = [j for j in self.jobs.values() if j.done.done() and j.exit_delivered]
            if not collected:
                raise RuntimeError(f"this agent holds {len(self.jobs)} jobs already; try again later")
            self.remove(min(collected, key=lambda j: j.finished or 0).id)
        self._record_id(spec.job_id)
        job = Job(spec, self.jobs_dir / spec.job_id, self.max_retained, time.time())
        self.jobs[spec.job_id] = job
        self.jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        await job.start(self.launcher)
        self._follow(job)
        return job, True

    def _follow(self, job: Job) -> None:
        job.done.add_done_callback(lambda _: self._finished(job))
        if self._sweeper is None:
            self._schedule_sweep()

    def _record_id(self, job_id: str) -> None:
        self._past_ids.add(job_id)
        try:
            if self._ids_file is None:
                self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self._ids_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.fchmod(fd, 0o600)  # an older agent made it 0644
                self._ids_file = os.fdopen(fd, "a", encoding="ascii")
            self._ids_file.write(job_id + "\n")
            self._ids_file.flush()
        except OSError as exc:
            logger.warning("cannot record job ids in %s: %s", self._ids_path, exc)

    def _finished(self, job: Job) -> None:
        if self.on_finished is not None and self.jobs.get(job.id) is job and not job.exit_audited:
            self.on_finished(job)
            job.exit_audited = True
            job._save()

    def collected(self, job: Job) -> None:
        """A client acknowledged the exit (kept until the retention period ends)."""
        if not job.exit_delivered:
            job.exit_delivered = True
            job._save()

    def enforce_caps(self, job: Job | None = None) -> None:
        """Discard the oldest acknowledged bytes of ``job`` beyond the per-job cap; with
        no job, of the oldest jobs beyond the total cap."""
        if job is not None:
            if job.held > self.job_cap:
                job.discard(job.held - self.job_cap, f"over the {_size(self.job_cap)} kept per job")
            return
        excess = sum(j.held for j in self.jobs.values()) - self.total_cap
        for old in sorted(self.jobs.values(), key=lambda j: j.started):
            if excess <= 0:
                break
            excess -= old.discard(excess, f"over the {_size(self.total_cap)} kept for all jobs")

    def _schedule_sweep(self) -> None:
        period = max(0.05, min(60.0, self.retention / 4))
        self._sweeper = asyncio.get_running_loop().call_later(period, self._sweep_and_reschedule)

    def _sweep_and_reschedule(self) -> None:
        self._sweep()
        self._schedule_sweep()

    def _sweep(self) -> None:
        """Remove the jobs finished longer than the retention period ago; keep the caps."""
        now = time.time()
        for job in list(self.jobs.values()):
            if job.finished is not None and now - job.finished >= self.retention:
                self.remove(job.id)
            elif job.done.done() and not job._readers:
                job.out.close()
                job.err.close()
        self.enforce_caps()

    def remove(self, job_id: str) -> None:
        """Forget a finished job and delete its directory (its id stays used)."""
        job = self.jobs.pop(job_id, None)
        if job is not None:
            job.close()
            shutil.rmtree(job.dir, ignore_errors=True)

    def close(self, kill: bool = True) -> None:
        """Let go of every job: kill the running ones if ``kill`` (else they keep
        running, for the next agent to adopt)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for job in list(self.jobs.values()):
            job.close(kill=kill)
        self.jobs.clear()
        self.launcher.close()
        if self._ids_file is not None:
            self._ids_file.close()
            self._ids_file = None


def _size(n: int) -> str:
    """A size as the user set it: whole GiB, MiB or KiB, else bytes."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n:,} bytes"
