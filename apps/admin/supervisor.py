"""The supervisor of one job, and the launcher that forks supervisors.

Each job runs under a supervisor of its own, in a session of its own, so that it
outlives the agent that started it (killed, crashed, upgraded): the supervisor
starts the command, appends its output to files in the job directory as it comes
and, when the command has ended and its output is closed, writes the exit status to
a file. A restarted agent finds the job there (see :class:`korinet_admin.jobs.JobTable`).

The agent runs ``python -m korinet_admin.supervisor --launcher`` once and writes each
new job directory to it (:func:`launch_forever`); ``python -m
korinet_admin.supervisor JOB_DIR`` supervises one job in the foreground (by hand).

The job directory (the agent creates it, mode 0700; every file is 0600):

==================  ===========================================================
``spec.json``       what to run (the agent writes it before starting us)
``stdout``          stream 1, byte N of the stream at file offset N
``stderr``          stream 2 (empty for a ``--tty`` job: the terminal is one stream)
``supervisor.json`` our pid and start time, the command's pid (once it runs)
``status.json``     the exit (returncode, timed_out, error), written last
``control``         FIFO, agent to us: ``signal N``, ``resize C R``, ``eof``, ``limit S N``
``stdin``           FIFO, the command's stdin (the agent writes it)
``events``          FIFO, us to the agent: a byte whenever a file above changed
==================  ===========================================================

``limit S N`` is flow control: we read stream S only while its file is shorter
than N, so a command nobody reads blocks on write (backpressure, never loss).

The agent also keeps ``state.json`` and ``stdin.offset`` there (see jobs.py).
Only the standard library: the launcher starts with every agent.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CONTROL",
    "EVENTS",
    "SPEC",
    "STATUS",
    "STDIN",
    "STREAM_FILES",
    "SUPERVISOR",
    "launch_forever",
    "main",
    "process_start",
    "supervise",
    "write_json",
]

SPEC: Final = "spec.json"
STATUS: Final = "status.json"
SUPERVISOR: Final = "supervisor.json"
CONTROL: Final = "control"
STDIN: Final = "stdin"
EVENTS: Final = "events"
#: The file of stream 1 and of stream 2.
STREAM_FILES: Final = ("stdout", "stderr")

#: Bytes per read from the command's output.
READ_SIZE: Final = 1024 * 1024
#: Capacity asked for the command's output pipes (Linux F_SETPIPE_SZ): fewer wake-ups.
PIPE_SIZE: Final = 1024 * 1024


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically (a reader sees the old file or the new one), mode 0600."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), or None if unknown:
    with the pid it names one process, whatever pid reuse happens later."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count from its end
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


class Supervisor:
    def __init__(self, job_dir: Path) -> None:
        self.dir = job_dir
        self.spec: dict[str, Any] = json.loads((job_dir / SPEC).read_text(encoding="utf-8"))
        self.sel = selectors.DefaultSelector()
        self.files = [
            os.open(job_dir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) for name in STREAM_FILES
        ]
        self.written = [os.fstat(fd).st_size for fd in self.files]
        limit = int(self.spec.get("limit", 1 << 62))
        self.limits = [limit, limit]
        self.outputs: dict[int, int] = {}  # fd -> stream index, while open
        self.paused: set[int] = set()
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.timed_out = False
        self.error: str | None = None
        self.master: int | None = None  # a --tty job's pseudo-terminal
        self.stdin_fifo: int | None = None  # a --tty job's stdin, copied to the terminal
        self.stdin_keeper: int | None = None  # our write end: no EOF until the agent says so
        self.pending_input = b""
        self.events: int | None = None
        self.deadlines: list[tuple[float, int]] = []
        self.control = os.open(job_dir / CONTROL, os.O_RDWR | os.O_NONBLOCK)
        self.control_buffer = b""
        self.sel.register(self.control, selectors.EVENT_READ, "control")

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        spec = self.spec
        argv: list[str] = spec["argv"]
        env = {**os.environ, "TERM": spec["term"]} if spec.get("term") else None
        stdin: Any = subprocess.DEVNULL
        child_stdin: int | None = None
        if spec.get("stdin", True):
            # a reader first, so that our keeper (a writer) can open without blocking
            child_stdin = os.open(self.dir / STDIN, os.O_RDONLY | os.O_NONBLOCK)
            self.stdin_keeper = os.open(self.dir / STDIN, os.O_WRONLY | os.O_NONBLOCK)
            os.set_blocking(child_stdin, True)
            stdin = child_stdin
        try:
            if spec.get("tty"):
                self._start_pty(argv, env, child_stdin)
            else:
                self.proc = subprocess.Popen(
                    argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    env=env, start_new_session=True,  # its own group: signals reach its children
                )  # fmt: skip
                for index, pipe in enumerate((self.proc.stdout, self.proc.stderr)):
                    assert pipe is not None
                    fd = pipe.fileno()
                    with contextlib.suppress(OSError, AttributeError):
                        import fcntl

                        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
                    os.set_blocking(fd, False)
                    self.outputs[fd] = index
                    self.sel.register(fd, selectors.EVENT_READ, "output")
        except OSError as exc:
            self.error = f"{argv[0]}: {exc.strerror or exc}"
            self.returncode = 127 if isinstance(exc, FileNotFoundError) else 126
            self._append(1, f"korinet-admin agent: cannot run {self.error}\n".encode())
        finally:
            if child_stdin is not None and not spec.get("tty"):
                os.close(child_stdin)  # the command has it
        write_json(
            self.dir / SUPERVISOR,
            {"pid": os.getpid(), "start": process_start(os.getpid()),
             "child": self.proc.pid if self.proc is not None else None},
        )  # fmt: skip
        timeout = spec.get("timeout")
        if timeout and self.proc is not None:
            self.deadlines.append((time.monotonic() + float(timeout), signal.SIGTERM))
        self.notify()

    def _start_pty(self, argv: list[str], env: dict[str, str] | None, stdin: int | None) -> None:
        import fcntl
        import pty
        import struct
        import termios

        master, slave = pty.openpty()
        if self.spec.get("cols") and self.spec.get("rows"):
            size = struct.pack("HHHH", self.spec["rows"], self.spec["cols"], 0, 0)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, size)

        def controlling_terminal() -> None:  # in the child, after setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        try:
            self.proc = subprocess.Popen(
                argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                start_new_session=True, preexec_fn=controlling_terminal,
            )  # fmt: skip
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        self.outputs[master] = 0
        self.sel.register(master, selectors.EVENT_READ, "output")
        os.close(self.files[1])
        self.files[1] = -1
        if stdin is not None:
            self.stdin_fifo = stdin
            os.set_blocking(stdin, False)
            self.sel.register(stdin, selectors.EVENT_READ, "stdin")

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        self.start()
        self._reap()
        while not self._finished():
            timeout = None
            if self.deadlines:
                timeout = max(0.0, min(d for d, _ in self.deadlines) - time.monotonic())
            if self.pending_input:
                timeout = min(timeout if timeout is not None else 0.01, 0.01)
            for key, _ in self.sel.select(timeout):
                what = key.data
                if what == "output":
                    self._read_output(int(key.fd))
                elif what == "control":
                    self._read_control()
                elif what == "stdin":
                    self._read_stdin()
                elif what == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 512):
                            pass
            if self.pending_input:
                self._write_input()
            self._reap()
            self._fire_deadlines()
        self._write_status()

    def _finished(self) -> bool:
        return self.returncode is not None and not self.outputs

    def _read_output(self, fd: int) -> None:
        index = self.outputs[fd]
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: a terminal whose last holder closed it
                raise
            data = b""
        if not data:
            self._close_output(fd)
            return
        self._append(index, data)
        if self.written[index] >= self.limits[index]:
            self.sel.unregister(fd)
            self.paused.add(fd)

    def _append(self, index: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.files[index], view)
            view = view[n:]
        self.written[index] += len(data)
        self.notify()

    def _close_output(self, fd: int) -> None:
        self.outputs.pop(fd, None)
        if fd in self.paused:
            self.paused.discard(fd)
        else:
            self.sel.unregister(fd)
        os.close(fd)
        if fd == self.master:
            self.master = None
            if self.stdin_fifo is not None:  # nothing reads the terminal's input now
                with contextlib.suppress(KeyError):
                    self.sel.unregister(self.stdin_fifo)
                os.close(self.stdin_fifo)
                self.stdin_fifo = None

    def _reap(self) -> None:
        if self.proc is None or self.returncode is not None:
            return
        code = self.proc.poll()
        if code is None:
            return
        self.returncode = code
        self.deadlines.clear()
        self._drain_master()

    def _drain_master(self) -> None:
        """After the command's exit, take what its terminal holds now, then close it:
        a background child may keep the terminal open, but the job is the command."""
        master = self.master
        if master is None or master not in self.outputs:
            return
        while master not in self.paused:
            try:
                data = os.read(master, READ_SIZE)
            except OSError:  # EAGAIN: nothing more now; EIO: nobody holds it
                break
            if not data:
                break
            self._append(0, data)
            if self.written[0] >= self.limits[0]:
                self.sel.unregister(master)
                self.paused.add(master)
        if master not in self.paused:
            self._close_output(master)

    def _fire_deadlines(self) -> None:
        now = time.monotonic()
        for deadline, sig in [d for d in self.deadlines if d[0] <= now]:
            self.deadlines.remove((deadline, sig))
            if self.returncode is None:
                self.timed_out = True
                self._signal(sig)
                if sig == signal.SIGTERM:
                    grace = float(self.spec.get("kill_grace", 2.0))
                    self.deadlines.append((now + grace, signal.SIGKILL))

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, sig)

    # ------------------------------------------------------------------ from the agent

    def _read_control(self) -> None:
        try:
            self.control_buffer += os.read(self.control, 65536)
        except BlockingIOError:
            return
        *lines, self.control_buffer = self.control_buffer.split(b"\n")
        for line in lines:
            words = line.decode("ascii", "replace").split()
            try:
                self._command(words)
            except (ValueError, IndexError, OSError):
                pass  # a malformed line: the agent is ours, so this is a bug elsewhere

    def _command(self, words: list[str]) -> None:
        if words[0] == "signal":
            self._signal(int(words[1]))
        elif words[0] == "resize" and self.master is not None:
            import fcntl
            import struct
            import termios

            size = struct.pack("HHHH", int(words[2]), int(words[1]), 0, 0)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
        elif words[0] == "eof":
            if self.stdin_keeper is not None:
                os.close(self.stdin_keeper)
                self.stdin_keeper = None
        elif words[0] == "limit":
            index, limit = int(words[1]) - 1, int(words[2])
            self.limits[index] = max(self.limits[index], limit)
            for fd in [fd for fd in self.paused if self.outputs.get(fd) == index]:
                if self.written[index] < self.limits[index]:
                    self.paused.discard(fd)
                    self.sel.register(fd, selectors.EVENT_READ, "output")
            if self.returncode is not None:
                self._drain_master()

    def _read_stdin(self) -> None:
        """A --tty job: stdin bytes go to the terminal."""
        if self.stdin_fifo is None:
            return
        try:
            data = os.read(self.stdin_fifo, 65536)
        except BlockingIOError:
            return
        if not data:  # every writer closed: the agent said eof and let go
            self.sel.unregister(self.stdin_fifo)
            os.close(self.stdin_fifo)
            self.stdin_fifo = None
            data = b"\x04"  # a terminal's EOF is ^D
        self.pending_input += data
        self._write_input()

    def _write_input(self) -> None:
        """Write what is pending to the terminal; while it takes no more, stop reading
        stdin (the run loop retries every 10 ms: a terminal's input is rarely full)."""
        if self.master is None:
            self.pending_input = b""
        else:
            try:
                n = os.write(self.master, self.pending_input)
            except BlockingIOError:
                n = 0
            except OSError:
                n = len(self.pending_input)  # the terminal is gone: nobody reads it
            self.pending_input = self.pending_input[n:]
        fifo = self.stdin_fifo
        if fifo is None:
            return
        reading = fifo in self.sel.get_map()
        if self.pending_input and reading:
            self.sel.unregister(fifo)
        elif not self.pending_input and not reading:
            self.sel.register(fifo, selectors.EVENT_READ, "stdin")

    # ------------------------------------------------------------------ to the agent

    def notify(self) -> None:
        """A byte on the events FIFO: the agent, if there is one now, looks at the files."""
        if self.events is None:
            try:
                self.events = os.open(self.dir / EVENTS, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return  # ENXIO: no agent holds it (it is restarting); it will look by itself
        try:
            os.write(self.events, b".")
        except BlockingIOError:
            pass  # full: the agent has a wake-up waiting already
        except OSError:
            os.close(self.events)  # EPIPE: the agent went away
            self.events = None

    def _write_status(self) -> None:
        for fd in self.files:
            if fd >= 0:
                os.close(fd)
        write_json(
            self.dir / STATUS,
            {"returncode": self.returncode, "timed_out": self.timed_out, "error": self.error,
             "finished": time.time()},
        )  # fmt: skip
        self.notify()


def supervise(job_dir: Path) -> None:
    """Run the job in ``job_dir`` to its end (this process is its supervisor)."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # the command gets the default back (Popen)
    supervisor = Supervisor(job_dir)
    # a SIGTERM or SIGHUP meant for the job (someone stopping it by hand) goes to the command
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda signum, _: supervisor._signal(signum))
    supervisor.run()


def launch_forever() -> None:
    """The launcher: one small process, started with the agent, that forks a supervisor
    for each job directory the agent writes on our stdin (one path a line).

    Forking this process costs a millisecond where starting Python costs tens; and a
    supervisor forked from it is small, where one forked from the agent would hold a
    copy of the agent's memory once the agent is gone. Each supervisor starts a
    session of its own; we reap the ones that end while we run. At EOF (the agent is
    gone) the launcher exits: its supervisors, adopted by init, run on.
    """
    import fcntl  # noqa: F401  (imported once here: every supervisor needs them)
    import pty  # noqa: F401
    import struct  # noqa: F401
    import termios  # noqa: F401

    def reap(*_: object) -> None:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    signal.signal(signal.SIGCHLD, reap)
    for line in sys.stdin.buffer:
        job_dir = Path(os.fsdecode(line.rstrip(b"\n")))
        if os.fork():
            continue
        code = 1
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            log = os.open(job_dir / "supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.dup2(log, 2)
            os.close(null)
            os.close(log)
            sys.stdin = sys.stdout = open(os.devnull, "w")
            supervise(job_dir)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--launcher"]:
        launch_forever()
        return 0
    if len(args) != 1:
        print("usage: python -m korinet_admin.supervisor (--launcher | JOB_DIR)", file=sys.stderr)
        return 2
    supervise(Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
