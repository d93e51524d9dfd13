"""One ``exec`` on one host, start to exit code: what the CLI runs per host and what
tests drive in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from korinet import KoriNetError, KoriNetTimeout, MessageRejected

from .execclient import AdminConnection, JobRun, OutputClosed, Sink, Target, explain, new_job_id
from .protocol import exit_status

if TYPE_CHECKING:
    from korinet.plugins import PluginManager
    from korinet.security import ClientTLS

__all__ = ["FAILURE", "OUTAGE_LIMIT", "STATES", "HostResult", "describe", "outage_message", "run_on_host"]

#: ssh's exit code when the tool itself failed.
FAILURE = 255
#: Seconds without a connection to the agent before a client gives up (--outage-limit).
OUTAGE_LIMIT = 60.0


#: How a host's run ended (docs/ADMIN.md, "Fleet"): ``done`` the command exited
#: (``code`` is its exit status); ``unreachable`` no session (connect or TLS failed);
#: ``lost`` reached, then gone past the outage limit (the job keeps running there);
#: ``refused`` the agent or its key said no (key, role, policy).
STATES = ("done", "unreachable", "lost", "refused")


@dataclass(frozen=True, slots=True)
class HostResult:
    code: int
    note: str = ""
    state: str = "done"
    signal: int | None = None
    #: the job id when the agent was asked to run it (for ``attach``)
    job: str | None = None


def outage_message(host: str, job_id: str, limit: float | None, started: bool = True) -> str:
    """What a client says when it gives up on an unreachable agent: the job is not lost."""
    state = "keeps running" if started else "may be running"
    return (
        f"{host}: agent unreachable for {limit or 0:g} s; job {job_id} {state} on the host; "
        f"`korinet-admin attach {host} {job_id}` to resume"
    )


def describe(notice: dict[str, Any], timeout: float | None = None) -> str:
    """A few words on how a job ended, for the fan-out summary."""
    if notice.get("error"):
        # 127/126: the command could not start; no code: its supervisor vanished
        return f"cannot run: {notice['error']}" if notice.get("code") is not None else str(notice["error"])
    if notice.get("timed_out"):
        return f"timed out after {timeout:g}s, killed" if timeout else "timed out, killed"
    sig = notice.get("signal")
    if sig:
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return ""


async def run_on_host(
    target: Target,
    argv: list[str],
    sink: Sink,
    *,
    tls: ClientTLS | None,
    connect_timeout: float = 10.0,
    shell: bool = False,
    tty: bool = False,
    timeout: float | None = None,
    stdin: bool = True,
    stdin_fd: int = 0,
    job_id: str | None = None,
    plugins: PluginManager | None = None,
    on_started: Callable[[JobRun], None] | None = None,
    report: Callable[[str], None] = lambda line: None,
    label: str | None = None,
    outage_limit: float | None = OUTAGE_LIMIT,
    **client_kwargs: Any,
) -> HostResult:
    """Run ``argv`` on ``target`` and wait for its exit. Never raises for a KoriNet
    failure: that is exit code 255 with a note (and a line given to ``report``).
    After ``outage_limit`` seconds without a connection it gives up (255), saying
    how to re-attach: the job runs on."""
    name = label or target.label
    job_id = job_id or new_job_id()
    run: JobRun | None = None
    try:
        conn = await AdminConnection.open(
            target, tls=tls, plugins=plugins, open_timeout=connect_timeout, outage_limit=outage_limit,
            **client_kwargs,
        )  # fmt: skip
    except (KoriNetError, OSError) as exc:
        report(f"{name}: {explain(exc)}")
        if _refused_key(exc):
            return HostResult(FAILURE, f"key: {explain(exc)}", "refused")
        return HostResult(FAILURE, f"no session: {exc}", "unreachable")
    from .plugin import watch_links

    within = f" for up to {outage_limit:g} s" if outage_limit else ""

    def link_event(event: str, detail: str) -> None:
        if event == "lost":
            report(f"{name}: connection lost ({detail}); reconnecting{within}, the command keeps running")
        else:
            report(f"{name}: reconnected; continuing where the output stopped")

    watch_links(conn.client, link_event)
    conn.notify = lambda line: report(f"{name}: {line}")
    stdin_task: asyncio.Task[None] | None = None
    restore_terminal: Callable[[], None] | None = None
    loop = asyncio.get_running_loop()
    try:
        size = (0, 0)
        if tty:
            with contextlib.suppress(OSError):
                columns, lines = os.get_terminal_size(stdin_fd)
                size = (columns, lines)
            restore_terminal = _raw_mode(stdin_fd)
        run = await conn.exec(argv, sink, job_id=job_id, shell=shell, tty=tty, timeout=timeout,
                              stdin=stdin, size=size)  # fmt: skip
        if on_started is not None:
            on_started(run)
        if stdin:
            stdin_task = loop.create_task(run.forward_stdin(stdin_fd))
        if tty:
            loop.add_signal_handler(signal.SIGWINCH, lambda: _resize(run, stdin_fd))
        notice = await run.wait()
        code = exit_status(notice)
        note = describe(notice, timeout)
        sig = notice.get("signal") or None
        if notice.get("timed_out"):
            report(f"{name}: timed out after {timeout:g}s: the command was killed")
        elif notice.get("error"):
            report(f"{name}: {notice['error']}")
        return HostResult(code, note, "done", sig, job_id)
    except OutputClosed:
        # as in a local pipeline (cmd | head): the writer gets SIGPIPE, silently
        if run is not None:
            with contextlib.suppress(KoriNetError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await run.signal(signal.SIGPIPE)
        return HostResult(128 + signal.SIGPIPE, "local output closed", "done", signal.SIGPIPE, job_id)
    except MessageRejected as exc:
        report(f"{name}: refused: {explain(exc)}")
        kind = "role" if "requires the role" in str(exc) else "policy"
        return HostResult(FAILURE, f"{kind}: {explain(exc)}", "refused", job=job_id)
    except KoriNetTimeout as exc:
        if not conn.client.is_closed:
            report(f"{name}: {exc}")
            return HostResult(FAILURE, str(exc), "lost", job=job_id)
        # the client's outage limit ended the session: the agent is gone, the job is not
        report(outage_message(label or target.label, job_id, outage_limit, started=run is not None))
        return HostResult(FAILURE, f"agent unreachable for {outage_limit or 0:g} s", "lost", job=job_id)
    except KoriNetError as exc:
        # reached, then the session or the job went away: the job may run on
        report(f"{name}: {exc}")
        return HostResult(FAILURE, str(exc), "lost", job=job_id)
    finally:
        if tty:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGWINCH)
        if restore_terminal is not None:
            restore_terminal()
        if stdin_task is not None:
            stdin_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, KoriNetError):
                await stdin_task
        await conn.close()


def _refused_key(exc: BaseException) -> bool:
    """Whether a failed open was a key refused (theirs by our pin, ours by the agent)
    rather than a host we could not reach."""
    from korinet.exceptions import AuthenticationError, ConnectionClosed
    from korinet.session import CloseCode

    if isinstance(exc, AuthenticationError):
        return True
    return isinstance(exc, ConnectionClosed) and getattr(exc, "code", None) == CloseCode.AUTH_FAILED


def _resize(run: JobRun, fd: int) -> None:
    with contextlib.suppress(OSError):
        columns, lines = os.get_terminal_size(fd)
        task = asyncio.get_running_loop().create_task(run.resize(columns, lines))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _raw_mode(fd: int) -> Callable[[], None] | None:
    """Put our terminal in raw mode (keys go to the remote pty as typed, Ctrl-C too);
    returns how to restore it. None when ``fd`` is no terminal."""
    if not os.isatty(fd):
        return None
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)

    def restore() -> None:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sys.stdout.flush()

    return restore
