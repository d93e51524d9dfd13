"""put and get: files in chunks, checked with SHA-256, resumable.

The receiving side writes into ``.NAME.korinet-part-HASH`` next to the destination
(``HASH``: the first 16 hex digits of the file's SHA-256), checks the whole file's
SHA-256 at the end and only then renames it over the destination. A transfer that
was cut (a lost session, a killed client) starts again from the partial file's
length; a partial file of other content has another name, so it is never resumed
by mistake. Within a session the runtime already delivers every chunk exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from . import protocol as p

if TYPE_CHECKING:
    from .audit import AuditLog
    from .policy import Policy

__all__ = ["CHUNK", "AgentTransfers", "TransferError", "get_file", "partial_path", "put_file", "sha256_file"]

#: Bytes per chunk, and chunks in flight at once (pipelined requests).
CHUNK: Final = 1024 * 1024
IN_FLIGHT: Final = 8


class TransferError(Exception):
    """A transfer failed for a reason the user must see (checksum, missing file...)."""


def partial_path(destination: Path, sha256: str) -> Path:
    return destination.with_name(f".{destination.name}.korinet-part-{sha256[:16]}")


def sha256_file(path: Path, limit: int | None = None) -> str:
    """The SHA-256 of a file (of its first ``limit`` bytes), hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while remaining is None or remaining > 0:
            block = f.read(4 * 1024 * 1024 if remaining is None else min(remaining, 4 * 1024 * 1024))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()


def _resolve(path: str) -> Path:
    """A remote path: ``~`` expands, a relative path is relative to the agent's home
    directory (as scp does)."""
    expanded = Path(os.path.expanduser(path))
    return expanded if expanded.is_absolute() else Path.home() / expanded


def _owner(peer: Any) -> str:
    return str(getattr(getattr(peer, "identity", None), "fingerprint", None) or "anonymous")


class AgentTransfers:
    """The agent's side of put and get."""

    def __init__(self, policy: Policy, audit: AuditLog) -> None:
        self.policy = policy
        self.audit = audit
        # (owner fingerprint, path, sha256) -> (fd, mode): only who opened an upload may feed it
        self._writing: dict[tuple[str, str, str], tuple[int, int]] = {}
        self._reading: dict[str, int] = {}
        # the paths each session may read: get.open checked the policy for them
        self._opened: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()

    def _allow(self, peer: Any, event: str, path: str, **fields: Any) -> None:
        identity = getattr(peer, "identity", None)
        decision = self.policy.check_files(getattr(identity, "roles", ()) or ())
        self.audit.record(
            event,
            path=path,
            decision="allowed" if decision.allowed else "denied",
            who=getattr(identity, "name", None),
            fingerprint=getattr(identity, "fingerprint", None),
            peer=getattr(peer, "peername", None),
            **fields,
        )
        if not decision.allowed:
            raise PermissionError(decision.reason)

    # ------------------------------------------------------------------ put

    async def put_open(self, peer: Any, req: dict[str, Any]) -> dict[str, Any]:
        path, sha, size = req["path"], req["sha256"], int(req["size"])
        self._allow(peer, "put", path, size=size, sha256=sha)
        destination = _resolve(path)
        if destination.is_dir():
            raise IsADirectoryError(f"{destination} is a directory: end DST with / to copy into it")
        if not destination.parent.is_dir():
            raise FileNotFoundError(f"no directory {destination.parent}")
        part = partial_path(destination, sha)
        key = (_owner(peer), path, sha)
        if key in self._writing:
            os.close(self._writing.pop(key)[0])
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        have = os.fstat(fd).st_size
        if have > size:
            os.ftruncate(fd, 0)
            have = 0
        self._writing[key] = (fd, int(req.get("mode", 0o644)) & 0o7777)
        return {"offset": have}

    async def put_chunk(self, peer: Any, req: dict[str, Any]) -> dict[str, Any]:
        entry = self._writing.get((_owner(peer), req["path"], req["sha256"]))
        if entry is None:
            raise LookupError("no upload open for this file (send admin.put.open first)")
        fd = entry[0]
        offset, data = int(req["offset"]), req["data"]
        size = os.fstat(fd).st_size
        if offset > size:
            raise ValueError(f"chunk at {offset} leaves a gap after {size} bytes")
        os.pwrite(fd, data, offset)
        return {"size": max(size, offset + len(data))}

    async def put_close(self, peer: Any, req: dict[str, Any]) -> dict[str, Any]:
        path, sha = req["path"], req["sha256"]
        entry = self._writing.pop((_owner(peer), path, sha), None)
        if entry is None:
            raise LookupError("no upload open for this file")
        fd, mode = entry
        destination = _resolve(path)
        part = partial_path(destination, sha)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        actual = await asyncio.to_thread(sha256_file, part)
        if actual != sha:
            part.unlink(missing_ok=True)
            self.audit.record(
                "put-failed", path=path, reason="checksum mismatch", expected=sha, actual=actual
            )
            raise ValueError(
                f"checksum mismatch: expected {sha}, received {actual}; the upload was discarded"
            )
        os.chmod(part, mode)
        os.replace(part, destination)
        self.audit.record("put-done", path=str(destination), sha256=sha, size=part.stat().st_size
                          if part.exists() else destination.stat().st_size)  # fmt: skip
        return {"path": str(destination), "sha256": actual}

    # ------------------------------------------------------------------ get

    async def get_open(self, peer: Any, req: dict[str, Any]) -> dict[str, Any]:
        path = req["path"]
        self._allow(peer, "get", path)
        source = _resolve(path)
        st = source.stat()
        if not source.is_file():
            raise IsADirectoryError(f"{source} is not a regular file")
        sha = await asyncio.to_thread(sha256_file, source, st.st_size)
        paths = self._opened.setdefault(peer, set())
        if len(paths) > 1024:
            paths.clear()
        paths.add(path)
        return {"path": str(source), "size": st.st_size, "mode": st.st_mode & 0o7777, "sha256": sha}

    async def get_chunk(self, peer: Any, req: dict[str, Any]) -> bytes:
        path = req["path"]
        if path not in self._opened.get(peer, ()):
            raise PermissionError("open the file with admin.get.open first (that is where access is checked)")
        fd = self._reading.get(path)
        if fd is None:
            fd = os.open(_resolve(path), os.O_RDONLY)
            if len(self._reading) > 64:
                self.close_reading()
            self._reading[path] = fd
        return os.pread(fd, int(req["length"]), int(req["offset"]))

    def close_reading(self) -> None:
        for fd in self._reading.values():
            os.close(fd)
        self._reading.clear()

    def close(self) -> None:
        self.close_reading()
        for fd, _ in self._writing.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._writing.clear()


# ---------------------------------------------------------------------- client side

Progress = Callable[[int, int], None]


async def put_file(
    peer: Any, source: Path, remote: str, *, progress: Progress | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Upload ``source`` to ``remote`` on the agent behind ``peer``; resumes a partial
    upload of the same content. Returns the agent's final answer (path, sha256).

    Raises:
        MessageRejected: the agent refused (policy, checksum, path).
    """
    sha = await asyncio.to_thread(sha256_file, source)
    size = source.stat().st_size
    mode = source.stat().st_mode & 0o7777
    opened = await peer.request({"path": remote, "size": size, "sha256": sha, "mode": mode}, p.PUT_OPEN,
                                timeout=timeout)  # fmt: skip
    offset = int(opened["offset"])
    pending: set[asyncio.Task[Any]] = set()
    with open(source, "rb") as f:
        while offset < size:
            data = os.pread(f.fileno(), CHUNK, offset)
            if not data:
                raise TransferError(f"{source} shrank while being sent")
            request = {"path": remote, "sha256": sha, "offset": offset, "data": data}
            pending.add(asyncio.ensure_future(peer.request(request, p.PUT_CHUNK, timeout=timeout)))
            offset += len(data)
            if len(pending) >= IN_FLIGHT:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            if progress is not None:
                progress(offset, size)
        for task in pending:
            await task
    return dict(await peer.request({"path": remote, "sha256": sha}, p.PUT_CLOSE, timeout=timeout))


async def get_file(
    peer: Any,
    remote: str,
    destination: Path,
    *,
    progress: Progress | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Download ``remote`` into ``destination`` (a file path); resumes a partial
    download of the same content. Returns the agent's description of the file.

    Raises:
        TransferError: the bytes received do not have the announced SHA-256.
        MessageRejected: the agent refused (policy, missing file).
    """
    info = dict(await peer.request({"path": remote}, p.GET_OPEN, timeout=timeout))
    size, sha = int(info["size"]), str(info["sha256"])
    part = partial_path(destination, sha)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        have = os.fstat(fd).st_size
        if have > size:
            os.ftruncate(fd, 0)
            have = 0
        digest = hashlib.sha256()
        if have:
            with open(part, "rb") as f:
                while block := f.read(4 * 1024 * 1024):
                    digest.update(block)
        offset = have
        queue: deque[tuple[int, asyncio.Future[Any]]] = deque()
        while offset < size or queue:
            while offset < size and len(queue) < IN_FLIGHT:
                length = min(CHUNK, size - offset)
                request = {"path": remote, "offset": offset, "length": length}
                queue.append(
                    (offset, asyncio.ensure_future(peer.request(request, p.GET_CHUNK, timeout=timeout)))
                )
                offset += length
            at, task = queue.popleft()
            data = await task
            if not isinstance(data, bytes) or not data:
                raise TransferError(f"{remote} shrank on the agent while being read")
            os.pwrite(fd, data, at)
            digest.update(data)
            if progress is not None:
                progress(at + len(data), size)
        os.fsync(fd)
    finally:
        os.close(fd)
    if digest.hexdigest() != sha:
        part.unlink(missing_ok=True)
        raise TransferError(
            f"checksum mismatch for {remote}: expected {sha}, got {digest.hexdigest()} "
            "(did it change during the copy?); the partial file was discarded"
        )
    os.chmod(part, int(info.get("mode", 0o644)) & 0o777)
    os.replace(part, destination)
    return info
