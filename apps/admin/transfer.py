"""put and get: files in chunks, checked with SHA-256, resumable, never redirected.

The receiving side (the agent for put, the client for get) writes into
``.NAME.korinet-part-HASH`` next to the destination (``HASH``: the first 16 hex
digits of the file's SHA-256), checks the whole file's SHA-256 at the end and only
then renames it over the destination. A transfer that was cut (a lost session, a
killed client) starts again from the partial file's length; a partial file of other
content has another name, so it is never resumed by mistake. Within a session the
runtime already delivers every chunk exactly once.

The agent usually runs as root and the destination's directory may be writable by
others, so nothing is done through a name someone else could have planted
(``Receiver``): the directory is opened once and everything happens relative to that
descriptor; the partial file is created with ``O_EXCL | O_NOFOLLOW``, and one that
already exists is resumed only if it is a regular file of ours with a single link
that nobody else may write; its mode is set with ``fchmod``; the rename replaces a
link at the destination instead of following it, and is checked to have moved our
file. Setuid, setgid and sticky bits are dropped unless asked for (``preserve_setid``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import stat
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from . import protocol as p

if TYPE_CHECKING:
    from .audit import AuditLog
    from .policy import Policy

__all__ = [
    "CHUNK",
    "AgentTransfers",
    "Receiver",
    "TransferError",
    "file_mode",
    "get_file",
    "partial_path",
    "put_file",
    "sha256_file",
]

#: Bytes per chunk, and chunks in flight at once (pipelined requests).
CHUNK: Final = 1024 * 1024
IN_FLIGHT: Final = 8
#: Uploads one agent keeps open at once (each holds two descriptors).
MAX_UPLOADS: Final = 64

_BLOCK: Final = 4 * 1024 * 1024
# O_NONBLOCK: opening a FIFO or a device someone planted must not hang; it is refused after fstat
_NOFOLLOW: Final = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class TransferError(Exception):
    """A transfer failed for a reason the user must see (checksum, missing file...)."""


def partial_path(destination: Path, sha256: str) -> Path:
    return destination.with_name(_partial_name(destination.name, sha256))


def _partial_name(name: str, sha256: str) -> str:
    return f".{name}.korinet-part-{sha256[:16]}"


def file_mode(mode: int, preserve_setid: bool) -> int:
    """The permission bits a received file gets: setuid, setgid and sticky only on request."""
    return mode & (0o7777 if preserve_setid else 0o777)


def sha256_file(path: Path, limit: int | None = None) -> str:
    """The SHA-256 of a file (of its first ``limit`` bytes), hex."""
    with open(path, "rb") as f:
        return _sha256_fd(f.fileno(), limit)


def _sha256_fd(fd: int, limit: int | None = None) -> str:
    return _digest_fd(fd, limit).hexdigest()


def _digest_fd(fd: int, limit: int | None = None) -> hashlib._Hash:
    """A SHA-256 of an open file's first ``limit`` bytes (all of them), read with pread;
    it can go on with what follows."""
    digest = hashlib.sha256()
    offset = 0
    while limit is None or offset < limit:
        block = os.pread(fd, _BLOCK if limit is None else min(limit - offset, _BLOCK), offset)
        if not block:
            break
        digest.update(block)
        offset += len(block)
    return digest


def _fd_path(fd: int, fallback: str) -> str:
    """Where an open file or directory really is (Linux: /proc/self/fd), so that a
    component swapped for a symbolic link after ``realpath`` is still caught."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return fallback


def _check_name(name: str, path: str) -> None:
    if name in ("", ".", ".."):
        raise IsADirectoryError(f"{path}: not a file name")


class Receiver:
    """A file being received beside its destination, as described in the module
    docstring. ``Receiver.open`` returns it with the bytes already there (resumed).

    Args:
        dir_fd: the destination's directory, opened (the receiver owns and closes it).
        directory: its path, for messages.
        name: the destination's name in it.
    """

    def __init__(self, dir_fd: int, directory: str, name: str, sha256: str) -> None:
        self.dir_fd = dir_fd
        self.directory = directory
        self.name = name
        self.part = _partial_name(name, sha256)
        self.fd = -1

    @property
    def destination(self) -> str:
        return os.path.join(self.directory, self.name)

    @classmethod
    def open(
        cls, directory: str, name: str, sha256: str, size: int, check: Callable[[str], None] | None = None
    ) -> tuple[Receiver, int]:
        """Open (or resume) the partial file for ``directory/name``. ``check`` is called
        with where the opened directory really is, before anything is created in it.

        Raises:
            TransferError: a partial file is there that we must not write into.
            OSError: no such directory, the destination is a directory...
        """
        _check_name(name, os.path.join(directory, name))
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        receiver = cls(dir_fd, directory, name, sha256)
        try:
            if check is not None:
                check(_fd_path(dir_fd, directory))
            with contextlib.suppress(FileNotFoundError):  # a link to a directory is refused too:
                if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd).st_mode):  # DST/ says "into it"
                    raise IsADirectoryError(
                        f"{receiver.destination} is a directory: end DST with / to copy into it"
                    )
            receiver.fd = receiver._open_partial()
            have = os.fstat(receiver.fd).st_size
            if have > size:
                os.ftruncate(receiver.fd, 0)
                have = 0
        except BaseException:
            receiver.close()
            raise
        return receiver, have

    def _open_partial(self) -> int:
        flags = os.O_RDWR | _NOFOLLOW
        with contextlib.suppress(FileExistsError):
            return os.open(self.part, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self.dir_fd)
        where = os.path.join(self.directory, self.part)
        try:
            fd = os.open(self.part, flags, dir_fd=self.dir_fd)
        except OSError as exc:
            why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror})"
            raise TransferError(f"partial file {where} {why}: refusing to resume into it; "
                                "remove it if you did not make it") from None  # fmt: skip
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_uid != os.geteuid():
            problem = f"belongs to uid {st.st_uid}, not to us (uid {os.geteuid()})"
        elif st.st_nlink != 1:
            problem = f"has {st.st_nlink} hard links"
        elif st.st_mode & 0o022:
            problem = f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
        if problem is not None:
            os.close(fd)
            raise TransferError(f"partial file {where} {problem}: refusing to resume into it; "
                                "remove it if you did not make it")  # fmt: skip
        os.set_blocking(fd, True)
        return fd

    def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` (no gap allowed); returns the partial file's size."""
        size = os.fstat(self.fd).st_size
        if offset > size:
            raise ValueError(f"chunk at {offset} leaves a gap after {size} bytes")
        os.pwrite(self.fd, data, offset)
        return max(size, offset + len(data))

    def sha256(self) -> str:
        return _sha256_fd(self.fd)

    def finish(self, mode: int) -> int:
        """Give the verified partial file ``mode`` and rename it over the destination
        (a link there is replaced, not followed). Returns its size.

        Raises:
            TransferError: the partial file's name no longer held our file.
        """
        os.fsync(self.fd)
        os.fchmod(self.fd, mode)
        mine = os.fstat(self.fd)
        os.rename(self.part, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        placed = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        if (placed.st_dev, placed.st_ino) != (mine.st_dev, mine.st_ino):
            raise TransferError(
                f"{os.path.join(self.directory, self.part)} was replaced by something else during the "
                f"transfer: {self.destination} is NOT the verified file; check who can write to "
                f"{self.directory}"
            )
        with contextlib.suppress(OSError):
            os.fsync(self.dir_fd)
        return mine.st_size

    def discard(self) -> None:
        """Remove the partial file, if its name still holds our file."""
        with contextlib.suppress(OSError):
            there = os.stat(self.part, dir_fd=self.dir_fd, follow_symlinks=False)
            mine = os.fstat(self.fd)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.part, dir_fd=self.dir_fd)

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.dir_fd = -1


def _resolve(path: str) -> Path:
    """A remote path: ``~`` expands, a relative path is relative to the agent's home
    directory (as scp does)."""
    expanded = Path(os.path.expanduser(path))
    return expanded if expanded.is_absolute() else Path.home() / expanded


def _owner(peer: Any) -> str:
    return str(getattr(getattr(peer, "identity", None), "fingerprint", None) or "anonymous")


def _roles(peer: Any) -> tuple[str, ...]:
    return tuple(getattr(getattr(peer, "identity", None), "roles", ()) or ())


class AgentTransfers:
    """The agent's side of put and get. Every path is resolved (symbolic links
    followed) before the policy sees it, and the file or directory actually opened
    is checked again (``_fd_path``), so a link swapped in between is caught."""

    def __init__(self, policy: Policy, audit: AuditLog) -> None:
        self.policy = policy
        self.audit = audit
        # (owner fingerprint, path, sha256) -> (receiver, mode): only who opened an upload may feed it
        self._writing: dict[tuple[str, str, str], tuple[Receiver, int]] = {}
        # (real path, device, inode) -> descriptor, shared by every session reading that file
        self._reading: dict[tuple[str, int, int], int] = {}
        # what each session may read: get.open checked the policy for these paths
        self._opened: weakref.WeakKeyDictionary[Any, dict[str, tuple[str, int, int]]] = (
            weakref.WeakKeyDictionary()
        )

    def _allow(self, peer: Any, event: str, path: str, real: str | None, **fields: Any) -> None:
        """Check the policy (whether files at all when ``real`` is None, else that
        path) and audit the decision; a refusal raises PermissionError."""
        roles = _roles(peer)
        decision = self.policy.check_files(roles)
        if decision.allowed and real is not None:
            decision = self.policy.check_path(roles, real)
        elif decision.allowed:
            return  # the path is checked (and audited) once resolved
        identity = getattr(peer, "identity", None)
        self.audit.record(
            event,
            path=path,
            real=real,
            decision="allowed" if decision.allowed else "denied",
            reason=decision.reason,
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
        preserve = bool(req.get("setid", False))
        fields = {"size": size, "sha256": sha, "setid": preserve}
        self._allow(peer, "put", path, None, **fields)
        destination = _resolve(path)
        _check_name(destination.name, path)
        directory = os.path.realpath(destination.parent)
        if not os.path.isdir(directory):
            self._allow(peer, "put", path, os.path.join(directory, destination.name), **fields)
            raise FileNotFoundError(f"no directory {destination.parent}")
        real = os.path.join(directory, destination.name)
        self._allow(peer, "put", path, real, **fields)
        key = (_owner(peer), path, sha)
        if key not in self._writing and len(self._writing) >= MAX_UPLOADS:
            raise OSError(f"{MAX_UPLOADS} uploads are open on this agent: try again later")

        def check(opened: str) -> None:
            if opened != directory:  # a component became a link after realpath: check where it led
                self._allow(peer, "put", path, os.path.join(opened, destination.name), **fields)

        receiver, have = Receiver.open(directory, destination.name, sha, size, check)
        old = self._writing.pop(key, None)
        if old is not None:
            old[0].close()
        self._writing[key] = (receiver, file_mode(int(req.get("mode", 0o644)), preserve))
        return {"offset": have}

    async def put_chunk(self, peer: Any, req: dict[str, Any]) -> dict[str, Any]:
        entry = self._writing.get((_owner(peer), req["path"], req["sha256"]))
        if entry is None:
            raise LookupError("no upload open for this file (send admin.put.open first)")
        return {"size": entry[0].write(int(req["offset"]), req["data"])}

    async def put_close(self, peer: Any, req: dict[str, Any]) -> dict[str, Any]:
        path, sha = req["path"], req["sha256"]
        entry = self._writing.pop((_owner(peer), path, sha), None)
        if entry is None:
            raise LookupError("no upload open for this file")
        receiver, mode = entry
        try:
            actual = await asyncio.to_thread(receiver.sha256)
            if actual != sha:
                receiver.discard()
                self.audit.record(
                    "put-failed", path=path, reason="checksum mismatch", expected=sha, actual=actual
                )
                raise ValueError(
                    f"checksum mismatch: expected {sha}, received {actual}; the upload was discarded"
                )
            try:
                size = await asyncio.to_thread(receiver.finish, mode)
            except TransferError as exc:
                self.audit.record("put-failed", path=path, reason=str(exc))
                raise PermissionError(str(exc)) from None
        finally:
            receiver.close()
        self.audit.record("put-done", path=receiver.destination, sha256=sha, size=size, mode=f"{mode:o}")
        return {"path": receiver.destination, "sha256": actual}

    # ------------------------------------------------------------------ get

    async def get_open(self, peer: Any, req: dict[str, Any]) -> dict[str, Any]:
        path = req["path"]
        self._allow(peer, "get", path, None)
        real = os.path.realpath(_resolve(path))
        self._allow(peer, "get", path, real)
        fd = os.open(real, os.O_RDONLY | _NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(f"{real} is not a regular file")
            opened = _fd_path(fd, real)
            if opened != real:  # a component became a link after realpath: check where it led
                self._allow(peer, "get", path, opened)
            sha = await asyncio.to_thread(_sha256_fd, fd, st.st_size)
        finally:
            os.close(fd)
        paths = self._opened.setdefault(peer, {})
        if len(paths) > 1024:
            paths.clear()
        paths[path] = (real, st.st_dev, st.st_ino)
        return {"path": real, "size": st.st_size, "mode": st.st_mode & 0o7777, "sha256": sha}

    async def get_chunk(self, peer: Any, req: dict[str, Any]) -> bytes:
        path = req["path"]
        key = self._opened.get(peer, {}).get(path)
        if key is None:
            raise PermissionError("open the file with admin.get.open first (that is where access is checked)")
        fd = self._reading.get(key)
        if fd is None:
            replaced = FileNotFoundError(f"{key[0]} was replaced since it was opened: get it again")
            try:
                fd = os.open(key[0], os.O_RDONLY | _NOFOLLOW)
            except OSError:  # gone, or a link now (O_NOFOLLOW)
                raise replaced from None
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != key[1:]:  # only the file get.open checked
                os.close(fd)
                raise replaced
            if len(self._reading) > 64:
                self.close_reading()
            self._reading[key] = fd
        return os.pread(fd, int(req["length"]), int(req["offset"]))

    def close_reading(self) -> None:
        for fd in self._reading.values():
            os.close(fd)
        self._reading.clear()

    def close(self) -> None:
        self.close_reading()
        for receiver, _ in self._writing.values():
            receiver.close()
        self._writing.clear()


# ---------------------------------------------------------------------- client side

Progress = Callable[[int, int], None]


async def put_file(
    peer: Any,
    source: Path,
    remote: str,
    *,
    progress: Progress | None = None,
    timeout: float | None = None,
    preserve_setid: bool = False,
) -> dict[str, Any]:
    """Upload ``source`` to ``remote`` on the agent behind ``peer``; resumes a partial
    upload of the same content. Returns the agent's final answer (path, sha256).
    The agent drops setuid, setgid and sticky bits unless ``preserve_setid``.

    Raises:
        MessageRejected: the agent refused (policy, checksum, path).
    """
    sha = await asyncio.to_thread(sha256_file, source)
    size = source.stat().st_size
    mode = source.stat().st_mode & 0o7777
    opened = await peer.request({"path": remote, "size": size, "sha256": sha, "mode": mode,
                                 "setid": preserve_setid}, p.PUT_OPEN, timeout=timeout)  # fmt: skip
    offset = int(opened["offset"])
    confirmed = offset  # bytes the agent has written (what progress shows)
    if progress is not None:
        progress(confirmed, size)
    pending: dict[asyncio.Future[Any], int] = {}

    async def settle(when: str) -> None:
        nonlocal confirmed
        done, _ = await asyncio.wait(pending, return_when=when)
        for task in done:
            task.result()
            confirmed += pending.pop(task)
        if progress is not None:
            progress(confirmed, size)

    with open(source, "rb") as f:
        while offset < size:
            data = os.pread(f.fileno(), CHUNK, offset)
            if not data:
                raise TransferError(f"{source} shrank while being sent")
            request = {"path": remote, "sha256": sha, "offset": offset, "data": data}
            pending[asyncio.ensure_future(peer.request(request, p.PUT_CHUNK, timeout=timeout))] = len(data)
            offset += len(data)
            if len(pending) >= IN_FLIGHT:
                await settle(asyncio.FIRST_COMPLETED)
        if pending:
            await settle(asyncio.ALL_COMPLETED)
    return dict(await peer.request({"path": remote, "sha256": sha}, p.PUT_CLOSE, timeout=timeout))


async def get_file(
    peer: Any,
    remote: str,
    destination: Path,
    *,
    progress: Progress | None = None,
    timeout: float | None = None,
    preserve_setid: bool = False,
) -> dict[str, Any]:
    """Download ``remote`` into ``destination`` (a file path); resumes a partial
    download of the same content. Returns the agent's description of the file.
    The partial file and the rename are as safe as the agent's (``Receiver``);
    setuid, setgid and sticky bits are dropped unless ``preserve_setid``.

    Raises:
        TransferError: the bytes received do not have the announced SHA-256, or a
            partial file is there that must not be written into.
        MessageRejected: the agent refused (policy, missing file).
    """
    info = dict(await peer.request({"path": remote}, p.GET_OPEN, timeout=timeout))
    size, sha = int(info["size"]), str(info["sha256"])
    receiver, have = Receiver.open(str(destination.parent), destination.name, sha, size)
    try:
        digest = _digest_fd(receiver.fd, have)  # of what a resumed partial already holds
        offset = have
        if progress is not None:
            progress(have, size)
        queue: deque[tuple[int, asyncio.Future[Any]]] = deque()
        try:
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
                receiver.write(at, data)
                digest.update(data)
                if progress is not None:
                    progress(at + len(data), size)
        finally:
            for _, task in queue:
                task.cancel()
        if digest.hexdigest() != sha:
            receiver.discard()
            raise TransferError(
                f"checksum mismatch for {remote}: expected {sha}, got {digest.hexdigest()} "
                "(did it change during the copy?); the partial file was discarded"
            )
        receiver.finish(file_mode(int(info.get("mode", 0o644)), preserve_setid))
    finally:
        receiver.close()
    return info
