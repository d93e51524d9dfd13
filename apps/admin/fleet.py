"""``exec`` on a fleet: the hosts a selection names, run with a bounded fan-out, each
ending in exactly one state, shown live on a terminal, written for scripts.

:func:`resolve` turns a selection (``@web,db*,!db2,10.0.0.7:1400``) into hosts with
their addresses and pinned keys (inventory.py); :class:`Fleet` runs one command on
them (runner.py does one host) and hands each :class:`Outcome` over as it is known;
:func:`fleet_exit_code` is the code of the whole run. docs/ADMIN.md, "Fleet".
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from .execclient import JobRun, PrefixSink, Sink, StdSink, Target, new_job_id, parse_targets
from .inventory import Inventory
from .runner import FAILURE, HostResult, run_on_host

if TYPE_CHECKING:
    from korinet.security import ClientTLS

__all__ = [
    "INLINE_LIMIT",
    "Fleet",
    "FleetHost",
    "HostOutput",
    "Outcome",
    "Progress",
    "attach_command",
    "fleet_exit_code",
    "resolve",
]

#: Output per stream kept for ``--json`` (beyond it: ``null``, use ``--output-dir``).
INLINE_LIMIT: Final = 64 * 1024
#: The live line names the hosts still running when this few are left.
NAME_THE_LAST: Final = 5


@dataclass(frozen=True, slots=True)
class FleetHost:
    name: str  # what the user reads and types: the inventory name, or HOST[:PORT]
    target: Target
    key: str | None = None  # the agent key pinned in the inventory


def resolve(selection: str, inventory: Inventory) -> list[FleetHost]:
    """The hosts of a selection, in order.

    Raises:
        InventoryError, ValueError: the one line to show (unknown group, bad address).
    """
    hosts = []
    for host in inventory.select(selection):
        (target,) = parse_targets(host.address)
        hosts.append(FleetHost(host.name if host.known else target.label, target, host.key))
    return hosts


def _address(target: Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"{host}:{target.port}" + (f"/{target.agent}" if target.agent else "")


def attach_command(name: str, job: str) -> str:
    return f"korinet-admin attach {shlex.quote(name)} {job}"


@dataclass
class Outcome:
    """How one host's run ended (one JSON line with ``--json``)."""

    host: str
    address: str
    state: str  # runner.STATES, or "skipped" (never tried: the run was interrupted first)
    exit_code: int | None
    signal: int | None
    reason: str
    job: str | None
    bytes_out: int
    bytes_err: int
    started: float | None
    duration_s: float
    extra: dict[str, Any] = field(default_factory=dict)  # stdout/stderr/encoding or the files

    def record(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        data.update(self.extra)
        return data

    @property
    def detail(self) -> str:
        """A few words for the summary and the last-seen file."""
        if self.state == "done":
            return f"exit {self.exit_code}" + (f" ({self.reason})" if self.reason else "")
        return self.reason


def fleet_exit_code(outcomes: list[Outcome]) -> int:
    """255 when any host did not run the command to its end (unreachable, lost, refused,
    skipped), as pdsh and ssh say "the tool failed"; else the first non-zero exit code
    in host order; else 0."""
    if any(o.state != "done" for o in outcomes):
        return FAILURE
    return next((o.exit_code for o in outcomes if o.exit_code), 0)


class HostOutput:
    """One host's output: counted; written to ``DIR/HOST.out`` and ``.err`` (0600) as
    it comes; kept for JSON up to :data:`INLINE_LIMIT`; passed on to ``forward``."""

    def __init__(self, name: str, *, output_dir: Path | None, keep: bool, forward: Sink | None) -> None:
        self.counts = [0, 0]
        self.forward = forward
        self.kept: list[bytearray | None] | None = [bytearray(), bytearray()] if keep else None
        self.paths: list[Path] | None = None
        self._fds: list[int] = []
        if output_dir is not None:
            self.paths = [output_dir / f"{name}.out", output_dir / f"{name}.err"]
            for path in self.paths:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
                fd = os.open(path, flags, 0o600)
                os.fchmod(fd, 0o600)  # an older file of the same name may be more open
                self._fds.append(fd)

    def __call__(self, stream: int, data: bytes) -> None:
        index = stream - 1
        self.counts[index] += len(data)
        if self._fds:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fds[index], view) :]
        if self.kept is not None:
            kept = self.kept[index]
            if kept is not None:
                kept += data
                if len(kept) > INLINE_LIMIT:
                    self.kept[index] = None
        if self.forward is not None:
            self.forward(stream, data)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        close = getattr(self.forward, "close", None)
        if close is not None:
            close()

    def fields(self) -> dict[str, Any]:
        """stdout/stderr as text (utf-8 when both decode, else base64; ``null`` above
        the limit), or the files they went to."""
        if self.paths is not None:
            return {"stdout_file": str(self.paths[0]), "stderr_file": str(self.paths[1])}
        if self.kept is None:
            return {}
        streams = [None if k is None else bytes(k) for k in self.kept]
        try:
            texts = [None if s is None else s.decode("utf-8") for s in streams]
            encoding = "utf-8"
        except UnicodeDecodeError:
            texts = [None if s is None else base64.b64encode(s).decode() for s in streams]
            encoding = "base64"
        return {"stdout": texts[0], "stderr": texts[1], "encoding": encoding}


class Progress:
    """The live line on a terminal: ``12/200 running · 180 done · 3 unreachable ·
    1 lost · 4 refused``, and the hosts still running when few are. Whoever writes to
    the terminal meanwhile goes through :meth:`write`, which clears the line first."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total = total
        self.stream = stream  # None: not a terminal, say nothing
        self.running: dict[str, None] = {}
        self.counts: dict[str, int] = {}
        self.paused = False
        self._shown = False
        self._last = 0.0
        self._pending: asyncio.TimerHandle | None = None

    def line(self) -> str:
        parts = [f"{len(self.running)}/{self.total} running"]
        parts += [f"{n} {state}" for state, n in self.counts.items() if n]
        text = " · ".join(parts)
        waiting = self.total - len(self.running) - sum(self.counts.values())
        if self.running and not waiting and len(self.running) <= NAME_THE_LAST:
            text += " · still running: " + ", ".join(self.running)
        return text

    def started(self, name: str) -> None:
        self.running[name] = None
        self._changed()

    def ended(self, name: str, state: str) -> None:
        self.running.pop(name, None)
        self.counts[state] = self.counts.get(state, 0) + 1
        self._changed()

    def write(self, stream: int, data: bytes) -> None:
        self.clear()
        target = sys.stdout.buffer if stream == 1 else sys.stderr.buffer
        target.write(data)
        target.flush()
        self._changed()

    def say(self, line: str) -> None:
        self.write(2, f"korinet-admin: {line}\n".encode())

    def clear(self) -> None:
        if self.stream is not None and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def draw(self) -> None:
        self._pending = None
        if self.stream is None or self.paused:
            return
        self.stream.write("\r\x1b[K" + self.line())
        self.stream.flush()
        self._shown = True
        self._last = time.monotonic()

    def _changed(self) -> None:
        if self.stream is None or self.paused or self._pending is not None:
            return
        wait = self._last + 0.1 - time.monotonic()  # at most ten redraws a second
        if wait <= 0:
            self.draw()
        else:
            self._pending = asyncio.get_running_loop().call_later(wait, self.draw)

    def finish(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self.clear()


@dataclass
class FleetOptions:
    argv: list[str]
    fanout: int = 32
    connect_timeout: float = 10.0
    outage_limit: float | None = 60.0
    shell: bool = False
    tty: bool = False
    timeout: float | None = None
    stdin: bool = False
    job_id: str | None = None
    json: bool = False
    output_dir: Path | None = None


class Fleet:
    """One command on many hosts (or one: the same path, without prefixes)."""

    def __init__(
        self,
        hosts: list[FleetHost],
        options: FleetOptions,
        tls: ClientTLS | None,
        *,
        on_outcome: Callable[[Outcome], None] = lambda outcome: None,
        terminal: TextIO | None = None,
        **client_kwargs: Any,
    ) -> None:
        self.hosts = hosts
        self.options = options
        self.tls = tls
        self.on_outcome = on_outcome
        self.several = len(hosts) > 1
        self.progress = Progress(len(hosts), terminal if self.several else None)
        self.outcomes: dict[str, Outcome] = {}
        self.runs: dict[str, JobRun] = {}
        self.client_kwargs = client_kwargs
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel_reason = "interrupted"
        #: the last signal Ctrl-C asked for: a job whose start the client learns of
        #: later (the agent had started it when the key was pressed) gets it too
        self._signalled: int | None = None
        self._late_signals: set[asyncio.Task[None]] = set()

    def say(self, line: str) -> None:
        self.progress.say(line)

    async def run(self) -> list[Outcome]:
        semaphore = asyncio.Semaphore(max(1, self.options.fanout))
        loop = asyncio.get_running_loop()
        for host in self.hosts:
            self._tasks[host.name] = loop.create_task(self._one(host, semaphore))
        try:
            results = await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        finally:
            self.progress.finish()
        for host, result in zip(self.hosts, results, strict=True):
            if isinstance(result, BaseException) and host.name not in self.outcomes:
                # cancelled (a quit, a detach) before it ended, or a bug: it still gets a state
                if isinstance(result, asyncio.CancelledError):
                    reason = f"{self._cancel_reason} before its turn"
                else:
                    reason = f"internal error: {result!r}"
                    self.say(f"{host.name}: {reason}")
                nothing = HostOutput(host.name, output_dir=None, keep=False, forward=None)
                self._end(host, None, "skipped", reason, None, nothing, None)
        return [self.outcomes[h.name] for h in self.hosts]

    def cancel(self, reason: str) -> None:
        """Stop waiting for every host (the jobs run on): a quit or a detach."""
        self._cancel_reason = reason
        for task in self._tasks.values():
            task.cancel()

    def signal_all(self, sig: int) -> list[asyncio.Task[None]]:
        self._signalled = sig
        loop = asyncio.get_running_loop()
        return [loop.create_task(self._signal(name, run, sig)) for name, run in self.runs.items()]

    def _started(self, name: str, run: JobRun) -> None:
        self.runs[name] = run
        if self._signalled is not None:  # Ctrl-C came before we knew this job ran
            task = asyncio.get_running_loop().create_task(self._signal(name, run, self._signalled))
            self._late_signals.add(task)
            task.add_done_callback(self._late_signals.discard)

    async def _signal(self, name: str, run: JobRun, sig: int) -> None:
        try:
            await run.signal(sig)
        except Exception as exc:
            self.say(f"{name}: could not signal the job: {exc}")

    async def _one(self, host: FleetHost, semaphore: asyncio.Semaphore) -> None:
        opts = self.options
        job_id = opts.job_id or new_job_id()
        forward: Sink | None = None
        if not opts.json and opts.output_dir is None:
            forward = PrefixSink(host.name, self.progress.write) if self.several else StdSink()
        tls = self.tls
        if tls is not None and host.key is not None:
            tls = dataclasses.replace(tls, fingerprint=host.key)
        async with semaphore:
            started = time.time()
            clock = time.monotonic()
            keep = opts.json and opts.output_dir is None  # with files, JSON names them
            output = HostOutput(host.name, output_dir=opts.output_dir, keep=keep, forward=forward)
            self.progress.started(host.name)
            result: HostResult | None = None
            try:
                result = await run_on_host(
                    host.target,
                    opts.argv,
                    output,
                    tls=tls,
                    connect_timeout=opts.connect_timeout,
                    shell=opts.shell,
                    tty=opts.tty,
                    timeout=opts.timeout,
                    stdin=opts.stdin,
                    job_id=job_id,
                    on_started=lambda run: self._started(host.name, run),
                    report=self.say,
                    label=host.name,
                    outage_limit=opts.outage_limit,
                    **self.client_kwargs,
                )
            except asyncio.CancelledError:
                started_job = host.name in self.runs
                why = self._cancel_reason
                if started_job:
                    reason = f"{why}; job {job_id} keeps running: {attach_command(host.name, job_id)}"
                    self._end(host, None, "lost", reason, job_id, output, started, clock)
                else:
                    reason = f"{why} before the job started (job {job_id} may be running)"
                    self._end(host, None, "skipped", reason, job_id, output, started, clock)
                return
            finally:
                output.close()
                self.runs.pop(host.name, None)
            reason = result.note
            if result.state == "lost" and result.job:
                reason = f"{reason}; job {result.job} keeps running: {attach_command(host.name, result.job)}"
            code = result.code if result.state == "done" else None
            self._end(host, code, result.state, reason, result.job, output, started, clock, result.signal)

    def _end(
        self,
        host: FleetHost,
        code: int | None,
        state: str,
        reason: str,
        job: str | None,
        output: HostOutput,
        started: float | None,
        clock: float | None = None,
        sig: int | None = None,
    ) -> None:
        outcome = Outcome(
            host=host.name,
            address=_address(host.target),
            state=state,
            exit_code=code,
            signal=sig,
            reason=reason,
            job=job,
            bytes_out=output.counts[0],
            bytes_err=output.counts[1],
            started=started,
            duration_s=round(time.monotonic() - clock, 3) if clock is not None else 0.0,
            extra=output.fields(),
        )
        self.outcomes[host.name] = outcome
        self.progress.ended(host.name, state)
        self.on_outcome(outcome)

    def summary(self) -> str:
        """The table for stderr after a fan-out."""
        outcomes = [self.outcomes[h.name] for h in self.hosts]
        width = max(len("HOST"), *(len(o.host) for o in outcomes))
        lines = [f"{'HOST':<{width}}  {'STATE':<11}  EXIT  NOTE"]
        for o in outcomes:
            code = "" if o.exit_code is None else str(o.exit_code)
            note = o.reason
            lines.append(f"{o.host:<{width}}  {o.state:<11}  {code:>4}  {note}".rstrip())
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.state] = counts.get(o.state, 0) + 1
        failed = sum(1 for o in outcomes if o.state == "done" and o.exit_code)
        parts = [f"{n} {state}" + (f" ({failed} non-zero)" if state == "done" and failed else "")
                 for state, n in counts.items()]  # fmt: skip
        lines.append(f"{len(outcomes)} host(s): " + ", ".join(parts))
        return "\n".join(lines)


def interrupt_keys(answer: bytes) -> str:
    """The choice in what the user typed at the Ctrl-C question: s(top), d(etach), c(ontinue)."""
    text = answer.decode(errors="replace").strip().lower()
    return text[:1] if text[:1] in ("s", "d", "c") else "s"
