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

from korinet import KoriNetError, MessageRejected

from .execclient import AdminConnection, JobRun, OutputClosed, Sink, Target, explain
from .protocol import exit_status

if TYPE_CHECKING:
    from korinet.plugins import PluginManager
    from korinet.security import ClientTLS

__all__ = ["FAILURE", "HostResult", "describe", "run_on_host"]

#: ssh's exit code when the tool itself failed.
FAILURE = 255


@dataclass(frozen=True, slots=True)
class HostResult:
    code: int
    note: str = ""


def describe(notice: dict[str, Any], timeout: float | None = None) -> str:
    """A few words on how a job ended, for the fan-out summary."""
    if notice.get("error"):
        return f"cannot run: {notice['error']}"
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
    **client_kwargs: Any,
) -> HostResult:
    """Run ``argv`` on ``target`` and wait for its exit. Never raises for a KoriNet
    failure: that is exit code 255 with a note (and a line given to ``report``)."""
    name = label or target.label
    try:
        conn = await AdminConnection.open(
            target, tls=tls, plugins=plugins, open_timeout=connect_timeout, **client_kwargs
        )
    except (KoriNetError, OSError) as exc:
        report(f"{name}: {explain(exc)}")
        return HostResult(FAILURE, f"no session: {exc}")
    from .plugin import watch_links

    def link_event(event: str, detail: str) -> None:
        if event == "lost":
            report(f"{name}: connection lost ({detail}); reconnecting, the command keeps running")
        else:
            report(f"{name}: reconnected; continuing where the output stopped")

    watch_links(conn.client, link_event)
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
        if notice.get("timed_out"):
            report(f"{name}: timed out after {timeout:g}s: the command was killed")
        elif notice.get("error"):
            report(f"{name}: {notice['error']}")
        return HostResult(code, note)
    except OutputClosed:
        # as in a local pipeline (cmd | head): the writer gets SIGPIPE, silently
        with contextlib.suppress(KoriNetError, TimeoutError):
            await asyncio.wait_for(run.signal(signal.SIGPIPE), 2.0)
        return HostResult(128 + signal.SIGPIPE, "local output closed")
    except MessageRejected as exc:
        report(f"{name}: refused: {explain(exc)}")
        return HostResult(FAILURE, f"refused: {exc}")
    except KoriNetError as exc:
        report(f"{name}: {exc}")
        return HostResult(FAILURE, str(exc))
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
