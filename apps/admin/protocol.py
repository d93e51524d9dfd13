"""The korinet-admin messages: names, payload shapes and their validation.

Pure code, imported by the plugin module of every KoriNet process: nothing heavy here.

Client to agent (each needs the ``admin`` role, checked by the runtime before any
handler runs; docs/ADMIN.md says what the policy adds on top):

========================  =======================================================
``admin.exec``            request: start job ``job`` (or attach to it if it exists)
``admin.attach``          request: stream job ``job`` from the given offsets
``admin.stdin``           request: bytes for the job's stdin at an absolute offset
``admin.signal``          request: send a signal to the job's process group
``admin.resize``          request: a new terminal size for a ``--tty`` job
``admin.jobs``            request: list the jobs this identity owns
``admin.status``          request: uptime, load, memory, disks
``admin.put.open``        request: begin (or resume) an upload; answers the offset
``admin.put.chunk``       request: bytes of an upload at an offset
``admin.put.close``       request: check the upload's sha256 and move it in place
``admin.get.open``        request: size, mode and sha256 of a file to download
``admin.get.chunk``       request: bytes of that file at an offset
========================  =======================================================

Agent to client: ``admin.output`` (bytes of stream 1 or 2 at an absolute offset)
and ``admin.exit`` (sent once all output has been sent).
"""

from __future__ import annotations

import re
from typing import Any, Final, TypedDict

__all__ = [
    "ADMIN_ROLE",
    "ATTACH",
    "DEFAULT_AGENT_PORT",
    "DEFAULT_RELAY_PORT",
    "EXEC",
    "EXIT",
    "GET_CHUNK",
    "GET_OPEN",
    "JOBS",
    "MAX_ARGV_BYTES",
    "MAX_CHUNK",
    "OUTPUT",
    "PUT_CHUNK",
    "PUT_CLOSE",
    "PUT_OPEN",
    "RESIZE",
    "SIGNAL",
    "STATUS",
    "STDERR",
    "STDIN",
    "STDOUT",
    "AttachRequest",
    "ExecRequest",
    "ExitNotice",
    "OutputChunk",
]

#: The agent's default port (korinet serve uses 1235).
DEFAULT_AGENT_PORT: Final = 1237
#: The relay's default port (agents that dial home park there; relay.py).
DEFAULT_RELAY_PORT: Final = 1238

#: The role every admin request needs (the runtime checks it: MessageType.required_role).
ADMIN_ROLE: Final = "admin"

EXEC: Final = "admin.exec"
ATTACH: Final = "admin.attach"
STDIN: Final = "admin.stdin"
SIGNAL: Final = "admin.signal"
RESIZE: Final = "admin.resize"
JOBS: Final = "admin.jobs"
STATUS: Final = "admin.status"
PUT_OPEN: Final = "admin.put.open"
PUT_CHUNK: Final = "admin.put.chunk"
PUT_CLOSE: Final = "admin.put.close"
GET_OPEN: Final = "admin.get.open"
GET_CHUNK: Final = "admin.get.chunk"
OUTPUT: Final = "admin.output"
EXIT: Final = "admin.exit"

STDOUT: Final = 1
STDERR: Final = 2

#: Largest payload of one chunk (stdin, output, file transfer): well under the frame limit.
MAX_CHUNK: Final = 1024 * 1024
#: Largest argv (all arguments together), as Linux's ARG_MAX order of magnitude.
MAX_ARGV_BYTES: Final = 1024 * 1024
MAX_PATH: Final = 4096

_JOB_ID: Final = re.compile(r"[0-9a-f]{32}")


class ExecRequest(TypedDict):
    job: str
    argv: list[str]
    shell: bool
    tty: bool
    timeout: float | None
    stdin: bool  # False: the command's stdin is closed at once
    cols: int
    rows: int
    term: str | None  # the client's TERM, for a --tty job
    offsets: list[int]  # [stdout, stderr] the client already has (a resubmission)


class AttachRequest(TypedDict):
    job: str
    offsets: list[int] | None


class OutputChunk(TypedDict):
    job: str
    stream: int
    offset: int
    data: bytes


class ExitNotice(TypedDict):
    job: str
    code: int | None  # None when killed by a signal
    signal: int | None
    timed_out: bool
    error: str | None  # the command could not be started (code 127 or 126 then)


# ---------------------------------------------------------------------- validators
# Each raises ValueError or TypeError: the runtime then rejects the message and the
# sender's request fails with MessageRejected (docs/PROTOCOL.md §5.5).


def _dict(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise TypeError("expected a map")
    return obj


def _job_id(value: Any) -> str:
    if not isinstance(value, str) or not _JOB_ID.fullmatch(value):
        raise ValueError("job must be 32 lowercase hex digits (a uuid4().hex)")
    return value


def _uint(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer")
    return value


def _offsets(value: Any) -> list[int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError("offsets must be [stdout, stderr]")
    return [_uint(value[0], "an offset"), _uint(value[1], "an offset")]


def _chunk(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError("data must be bytes")
    if len(value) > MAX_CHUNK:
        raise ValueError(f"a chunk holds at most {MAX_CHUNK} bytes")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_PATH or "\0" in value:
        raise ValueError("path must be a non-empty string without NUL")
    return value


def validate_exec(obj: Any) -> None:
    d = _dict(obj)
    _job_id(d.get("job"))
    argv = d.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a non-empty list of strings")
    if any("\0" in a for a in argv):
        raise ValueError("argv must not contain NUL characters")
    if sum(len(a) for a in argv) > MAX_ARGV_BYTES:
        raise ValueError("argv is too long")
    for flag in ("shell", "tty", "stdin"):
        if not isinstance(d.get(flag, False), bool):
            raise TypeError(f"{flag} must be a boolean")
    timeout = d.get("timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or not 0 < timeout < 10**9):
        raise ValueError("timeout must be a positive number of seconds")
    term = d.get("term")
    if term is not None and (not isinstance(term, str) or not re.fullmatch(r"[A-Za-z0-9._+-]{1,64}", term)):
        raise ValueError("term must be a terminal type name such as xterm-256color")
    _uint(d.get("cols", 0), "cols")
    _uint(d.get("rows", 0), "rows")
    _offsets(d.get("offsets", [0, 0]))


def validate_attach(obj: Any) -> None:
    d = _dict(obj)
    _job_id(d.get("job"))
    if d.get("offsets") is not None:  # None: from the oldest byte the agent still holds
        _offsets(d.get("offsets"))


def validate_stdin(obj: Any) -> None:
    d = _dict(obj)
    _job_id(d.get("job"))
    _uint(d.get("offset"), "offset")
    _chunk(d.get("data"))
    if not isinstance(d.get("eof", False), bool):
        raise TypeError("eof must be a boolean")


def validate_signal(obj: Any) -> None:
    d = _dict(obj)
    _job_id(d.get("job"))
    sig = d.get("signal")
    if not isinstance(sig, int) or isinstance(sig, bool) or not 1 <= sig <= 64:
        raise ValueError("signal must be a signal number (1-64)")


def validate_resize(obj: Any) -> None:
    d = _dict(obj)
    _job_id(d.get("job"))
    if not 0 < _uint(d.get("cols"), "cols") < 10000 or not 0 < _uint(d.get("rows"), "rows") < 10000:
        raise ValueError("cols and rows must be between 1 and 9999")


def validate_empty(obj: Any) -> None:
    if obj is not None and not isinstance(obj, dict):
        raise TypeError("expected a map or nothing")


def validate_put_open(obj: Any) -> None:
    d = _dict(obj)
    _path(d.get("path"))
    _uint(d.get("size"), "size")
    _sha256(d.get("sha256"))
    _uint(d.get("mode", 0o644), "mode")
    if not isinstance(d.get("setid", False), bool):  # keep setuid, setgid, sticky: only on request
        raise TypeError("setid must be a boolean")


def validate_put_chunk(obj: Any) -> None:
    d = _dict(obj)
    _sha256(d.get("sha256"))
    _path(d.get("path"))
    _uint(d.get("offset"), "offset")
    _chunk(d.get("data"))


def validate_put_close(obj: Any) -> None:
    d = _dict(obj)
    _path(d.get("path"))
    _sha256(d.get("sha256"))


def validate_get_open(obj: Any) -> None:
    _path(_dict(obj).get("path"))


def validate_get_chunk(obj: Any) -> None:
    d = _dict(obj)
    _path(d.get("path"))
    _uint(d.get("offset"), "offset")
    length = _uint(d.get("length"), "length")
    if not 0 < length <= MAX_CHUNK:
        raise ValueError(f"length must be between 1 and {MAX_CHUNK}")


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return value


def validate_output(obj: Any) -> None:
    d = _dict(obj)
    _job_id(d.get("job"))
    if d.get("stream") not in (STDOUT, STDERR):
        raise ValueError("stream must be 1 or 2")
    _uint(d.get("offset"), "offset")
    if not isinstance(d.get("data"), bytes):
        raise TypeError("data must be bytes")


def validate_exit(obj: Any) -> None:
    d = _dict(obj)
    _job_id(d.get("job"))
    for key in ("code", "signal"):
        value = d.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"{key} must be an integer or nil")


def exit_status(notice: ExitNotice | dict[str, Any]) -> int:
    """The local exit code for a remote exit, with ssh's conventions: the remote code,
    128+N when killed by signal N, 124 when ``--timeout`` killed it (as timeout(1))."""
    if notice.get("timed_out"):
        return 124
    signal = notice.get("signal")
    if signal:
        return 128 + int(signal)
    code = notice.get("code")
    return 255 if code is None else int(code)
