"""The agent: a KoriNet server hosting the admin plugin on a managed host.

Every request arrives through a handler of the plugin (plugin.py) after the runtime
has checked TLS, the client's key and the ``admin`` role; here the policy decides
what that identity may run, and every decision goes to the audit log.

A job's output reaches a client through an *attachment*: a task that posts the
job's bytes from the client's offsets, at most ``MAX_INFLIGHT_BYTES`` unacknowledged
at a time (flow control: a slow client slows the stream), then the exit notice once
everything before it was sent. The runtime's acknowledgement of each message moves
the job's acknowledged offset: how far its supervisor may read ahead, and which
bytes a retention bound may discard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from korinet import ConnectionClosed, KoriNetError, Message

from . import protocol as p
from .audit import AuditLog, Throttle, peer_address
from .jobs import (
    JOB_CAP,
    MAX_RETAINED,
    RETENTION,
    TOTAL_CAP,
    Job,
    JobConflict,
    JobSpec,
    JobTable,
    OutputDiscarded,
    UnknownJob,
)
from .policy import DEFAULT_POLICY, Policy
from .transfer import AgentTransfers

__all__ = ["DEFAULT_AGENT_PORT", "Agent"]

DEFAULT_AGENT_PORT = p.DEFAULT_AGENT_PORT

logger = logging.getLogger(__name__)

#: Output bytes posted to one client and not yet acknowledged, at most.
MAX_INFLIGHT_BYTES: Final = 8 * 1024 * 1024
MAX_INFLIGHT_MESSAGES: Final = 512
#: Bytes of output in one message.
OUTPUT_CHUNK: Final = 256 * 1024


class _Anonymous:
    """The identity of every client of an agent started with --insecure-plaintext."""

    name = "anonymous"
    fingerprint = "anonymous"
    roles = frozenset({p.ADMIN_ROLE})

    def has_role(self, role: str) -> bool:
        return role in self.roles


ANONYMOUS: Final = _Anonymous()


class Agent:
    """Jobs, policy and audit behind one or more KoriNet servers.

    Args:
        state_dir: the jobs (STATE_DIR/jobs), job ids and, by default, the audit log.
        policy: what each role may run.
        audit: the audit log.
        insecure: the server is plaintext: every client is the ``anonymous`` admin.
        keep_jobs: at :meth:`close`, leave running jobs running (for the next agent
            over this state directory to adopt); otherwise they are killed.
        retention, job_cap, total_cap, max_retained: see :mod:`korinet_admin.jobs`.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        policy: Policy = DEFAULT_POLICY,
        audit: AuditLog | None = None,
        insecure: bool = False,
        keep_jobs: bool = False,
        max_retained: int = MAX_RETAINED,
        retention: float = RETENTION,
        job_cap: int = JOB_CAP,
        total_cap: int = TOTAL_CAP,
    ) -> None:
        self.state_dir = state_dir
        self.policy = policy
        self.audit = audit or AuditLog(state_dir / "audit.log")
        self.insecure = insecure
        self.keep_jobs = keep_jobs
        self.jobs = JobTable(
            state_dir, max_retained=max_retained, retention=retention, job_cap=job_cap, total_cap=total_cap
        )
        self.jobs.on_finished = self._job_finished
        adopted = self.jobs.adopt()
        if adopted:
            running = sum(1 for job in adopted if not job.done.done())
            logger.info("adopted %d job(s) from %s, %d running", len(adopted), self.jobs.jobs_dir, running)
            self.audit.record("adopted", jobs=len(adopted), running=running)
        self.transfers = AgentTransfers(self.policy, self.audit)
        self._refusals = Throttle(self.audit)
        #: client ``HOST:PORT`` as a relay reported it -> the relay's, for relayed
        #: connections in their handshake (filled by dialhome.DialHome)
        self.relayed: dict[str, str] = {}
        self._attachments: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._hubs: list[Any] = []
        self._handlers: dict[str, Callable[[Any, dict[str, Any]], Awaitable[Any]]] = {
            p.EXEC: self._exec,
            p.ATTACH: self._attach_request,
            p.STDIN: self._stdin,
            p.SIGNAL: self._signal,
            p.RESIZE: self._resize,
            p.JOBS: self._jobs,
            p.STATUS: self._status,
            p.PUT_OPEN: self.transfers.put_open,
            p.PUT_CHUNK: self.transfers.put_chunk,
            p.PUT_CLOSE: self.transfers.put_close,
            p.GET_OPEN: self.transfers.get_open,
            p.GET_CHUNK: self.transfers.get_chunk,
        }

    # ------------------------------------------------------------------ wiring

    def bind(self, server: Any) -> None:
        """Serve admin requests arriving at ``server`` (a korinet Server or Hub)."""
        from .plugin import bind_agent

        _install_refusal_filter()
        hub = getattr(server, "hub", server)
        bind_agent(hub, self)
        self._hubs.append(hub)

    async def session(self, peer: Any) -> None:
        """The Hub's per-session handler: runs before the session's first message."""
        if self.insecure and getattr(peer, "identity", None) is None:
            peer.identity = ANONYMOUS
        # Clients never send output or exit notices; anything in the inbox is dropped.
        async for _ in peer:
            pass

    async def close(self) -> None:
        from .plugin import unbind_agent

        for hub in self._hubs:
            unbind_agent(hub)
        for task in list(self._attachments.values()):
            task.cancel()
        self._attachments.clear()
        if not self.keep_jobs:
            self.jobs.on_finished = None  # killed by the stop: recorded once as agent-stopped
        self.jobs.close(kill=not self.keep_jobs)
        self.transfers.close()
        self._refusals.close()
        self.audit.close()

    def refused(self, peername: str, fingerprint: str | None, reason: str, code: int) -> None:
        """A client refused by the runtime before it could send a request (hook
        ``korinet_session_refused`` of a hub this agent serves): a key refused, or a
        connection refused or dropped before authentication (limits, a failed or late
        TLS handshake, the wrong protocol). One line per address, code and key in an
        interval, then a summary (see :class:`~korinet_admin.audit.Throttle`)."""
        stage = "authentication" if code == 1007 else "connection"  # CloseCode.AUTH_FAILED
        relay = self.relayed.get(peername)
        where = _relayed(relay, peername) if relay is not None else {"peer": peername}
        self._refusals.record(
            (peer_address(peername), code, fingerprint),
            "refused",
            stage=stage,
            **where,
            fingerprint=fingerprint,
            reason=reason,
            code=code,
        )

    def rejected(self, peer: Any, message_type: str, reason: str) -> None:
        """A request the runtime rejected before our handler saw it: no admin role,
        unknown type, invalid fields (hook ``korinet_message_rejected``)."""
        self.audit.record("refused", stage="request", type=message_type, reason=reason, **self._who(peer))

    def handle(self, peer: Any, msg: Message) -> Awaitable[Any]:
        handler = self._handlers[msg.type]
        return handler(peer, msg.data)

    # ------------------------------------------------------------------ helpers

    def _who(self, peer: Any) -> dict[str, Any]:
        identity = getattr(peer, "identity", None)
        peername = getattr(peer, "peername", None)
        via = getattr(peer, "via", None)
        return {
            "who": getattr(identity, "name", None),
            "fingerprint": getattr(identity, "fingerprint", None),
            **(_relayed(via, peername) if via is not None else {"peer": peername}),
        }

    def _owned_job(self, peer: Any, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job.spec.owner != _fingerprint(peer):
            raise PermissionError(f"job {job_id} belongs to another identity")
        return job

    # ------------------------------------------------------------------ exec / attach

    async def _exec(self, peer: Any, req: dict[str, Any]) -> dict[str, Any]:
        job_id: str = req["job"]
        offsets = [int(o) for o in req.get("offsets", [0, 0])]
        argv: list[str] = req["argv"]
        shell = bool(req.get("shell", False))
        existing = self.jobs.jobs.get(job_id)
        if existing is not None:
            job = self._owned_job(peer, job_id)
            self._same_command(job, argv, shell)
            self.audit.record("exec", job=job_id, resubmitted=True, decision="attached", **self._who(peer))
            return self._job_reply(job, created=False, offsets=self._attach(peer, job, offsets))
        identity = getattr(peer, "identity", None)
        roles = getattr(identity, "roles", ()) or ()
        decision = self.policy.check_command(roles, argv, shell)
        self.audit.record(
            "exec",
            job=job_id,
            argv=argv,
            shell=shell,
            tty=bool(req.get("tty")),
            decision="allowed" if decision.allowed else "denied",
            reason=decision.reason,
            **self._who(peer),
        )
        if not decision.allowed:
            raise PermissionError(decision.reason)
        if shell:
            argv = ["/bin/sh", "-c", " ".join(argv)]
        spec = JobSpec(
            job_id=job_id,
            argv=argv,
            owner=_fingerprint(peer),
            owner_name=getattr(identity, "name", "anonymous"),
            tty=bool(req.get("tty", False)),
            timeout=req.get("timeout"),
            stdin=bool(req.get("stdin", True)),
            cols=int(req.get("cols", 0)),
            rows=int(req.get("rows", 0)),
            shell=shell,
            term=req.get("term"),
        )
        try:
            job, created = await self.jobs.submit(spec)
        except UnknownJob as exc:
            raise LookupError(str(exc)) from None
        if not created:  # submitted meanwhile by a concurrent copy of this request
            self._owned_job(peer, job_id)
            self._same_command(job, req["argv"], shell)
        return self._job_reply(job, created=created, offsets=self._attach(peer, job, offsets))

    @staticmethod
    def _same_command(job: Job, argv: list[str], shell: bool) -> None:
        """A job id given again must come with the same command (a retry), else it is a
        mistake the user must hear about, not a silent attach to another command."""
        if job.spec.shell:
            same = shell and job.spec.argv == ["/bin/sh", "-c", " ".join(argv)]
        else:
            same = not shell and job.spec.argv == argv
        if not same:
            asked = " ".join(argv) if shell else shlex.join(argv)
            had = job.spec.argv[2] if job.spec.shell else shlex.join(job.spec.argv)
            raise JobConflict(
                f"job {job.id} runs `{had}`, not `{asked}`: a job id names one command (choose a new --job)"
            )

    def _job_reply(self, job: Job, *, created: bool, offsets: list[int] | None = None) -> dict[str, Any]:
        return {
            "job": job.id,
            "created": created,
            "pid": job.pid,
            "stdin_offset": job.stdin_offset,
            "offsets": offsets,
            "collected": job.exit_delivered,
            "discarded": job.discard_reason,
        }

    async def _attach_request(self, peer: Any, req: dict[str, Any]) -> dict[str, Any]:
        try:
            job = self._owned_job(peer, req["job"])
        except UnknownJob as exc:
            self.audit.record("attach", job=req["job"], decision="unknown job", **self._who(peer))
            raise LookupError(str(exc)) from None
        offsets = req.get("offsets")
        if offsets is None:
            offsets = [job.out.start, job.err.start]
        self.audit.record("attach", job=job.id, offsets=offsets, decision="attached", **self._who(peer))
        return self._job_reply(job, created=False, offsets=self._attach(peer, job, [int(o) for o in offsets]))

    def _attach(self, peer: Any, job: Job, offsets: list[int]) -> list[int]:
        """Stream ``job`` to ``peer`` from ``offsets``, replacing an earlier attachment
        of the same session to the same job (the client filters what it already has).

        Bytes below a stream's start were acknowledged by some session already and are
        gone: the stream then starts there, and the reply tells the client so.
        Returns the offsets actually used.
        """
        offsets = list(offsets)
        for index, buffer in enumerate(job.stream_buffers):
            if offsets[index] > buffer.end:
                raise ValueError(
                    f"offset {offsets[index]} of stream {index + 1} is beyond its end ({buffer.end})"
                )
            offsets[index] = max(offsets[index], buffer.start)
        key = (id(peer), job.id)
        old = self._attachments.pop(key, None)
        if old is not None:
            old.cancel()
        job.add_reader(key, offsets)
        task = asyncio.get_running_loop().create_task(self._pump(peer, job, list(offsets), key))
        self._attachments[key] = task
        task.add_done_callback(lambda t: self._attachment_done(key, t))
        return offsets

    def _attachment_done(self, key: tuple[int, str], task: asyncio.Task[None]) -> None:
        if self._attachments.get(key) is task:
            del self._attachments[key]
            job = self.jobs.jobs.get(key[1])
            if job is not None:
                job.remove_reader(key)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, ConnectionClosed | KoriNetError):
                logger.error("attachment %s failed", key[1], exc_info=exc)

    async def _pump(self, peer: Any, job: Job, offsets: list[int], reader: object) -> None:
        inflight: deque[tuple[int, int, int, int]] = deque()  # (seq, stream, end offset, size)
        inflight_bytes = 0
        buffers = job.stream_buffers
        session = peer.session
        while True:
            acked = session.acked
            while inflight and inflight[0][0] <= acked:
                _, stream, end, size = inflight.popleft()
                inflight_bytes -= size
                job.acknowledge(stream, end, reader)
                self.jobs.enforce_caps(job)
            for index, buffer in enumerate(buffers):
                while (
                    offsets[index] < buffer.end
                    and inflight_bytes < MAX_INFLIGHT_BYTES
                    and len(inflight) < MAX_INFLIGHT_MESSAGES
                ):
                    offset = offsets[index]
                    try:
                        data = buffer.read(offset, OUTPUT_CHUNK)
                    except OutputDiscarded as exc:  # not expected (see Job.add_reader): the
                        offsets[index] = exc.start  # client reports the gap rather than hang
                        continue
                    seq = peer.post(
                        {"job": job.id, "stream": index + 1, "offset": offset, "data": data}, p.OUTPUT
                    )
                    offsets[index] = offset + len(data)
                    inflight.append((seq, index + 1, offsets[index], len(data)))
                    inflight_bytes += len(data)
            if inflight_bytes >= MAX_INFLIGHT_BYTES or len(inflight) >= MAX_INFLIGHT_MESSAGES:
                await peer.wait_acked(inflight[0][0])
                continue
            if job.done.done() and offsets[0] == buffers[0].end and offsets[1] == buffers[1].end:
                seq = peer.post(job.exit_notice(), p.EXIT)
                await peer.wait_acked(seq)
                for _, stream, end, _size in inflight:
                    job.acknowledge(stream, end, reader)
                self.jobs.enforce_caps(job)
                if not job.exit_delivered:
                    self.audit.record("collected", job=job.id, **self._who(peer))
                self.jobs.collected(job)
                return
            waits: list[asyncio.Future[Any]] = [job.changed.wait(), peer.closed]
            if inflight:
                waits.append(asyncio.ensure_future(peer.wait_acked(inflight[-1][0])))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if len(waits) > 2 and not waits[2].done():
                    waits[2].cancel()
            if peer.closed.done():
                return

    def _job_finished(self, job: Job) -> None:
        self.audit.record(
            "exit",
            job=job.id,
            who=job.spec.owner_name,
            argv=job.spec.argv,
            seconds=round((job.finished or time.time()) - job.started, 3),
            **{k: v for k, v in job.exit_notice().items() if k != "job"},
        )

    # ------------------------------------------------------------------ control

    async def _stdin(self, peer: Any, req: dict[str, Any]) -> dict[str, Any]:
        job = self._owned_job(peer, req["job"])
        taken = await job.write_stdin(int(req["offset"]), req["data"], bool(req.get("eof", False)))
        return {"offset": taken}

    async def _signal(self, peer: Any, req: dict[str, Any]) -> dict[str, Any]:
        job = self._owned_job(peer, req["job"])
        delivered = job.send_signal(int(req["signal"]))
        self.audit.record("signal", job=job.id, signal=req["signal"], delivered=delivered, **self._who(peer))
        return {"delivered": delivered}

    async def _resize(self, peer: Any, req: dict[str, Any]) -> None:
        self._owned_job(peer, req["job"]).resize(int(req["cols"]), int(req["rows"]))

    async def _jobs(self, peer: Any, req: Any) -> list[dict[str, Any]]:
        mine = _fingerprint(peer)
        return [job.info() for job in self.jobs.jobs.values() if job.spec.owner == mine]

    async def _status(self, peer: Any, req: Any) -> dict[str, Any]:
        self.audit.record("status", **self._who(peer))
        return await asyncio.to_thread(host_status, len(self.jobs.jobs))


class _OneLineRefusals(logging.Filter):
    """An admin request refused for an ordinary reason (an unknown or expired job,
    another identity's job, a reused job id, the policy) is one line in the agent's
    log, not a traceback: the runtime logs every failed handler with one."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        args = record.args if isinstance(record.args, tuple) else ()
        if (
            exc is not None
            and len(args) == 2
            and str(args[1]).startswith("admin.")
            and (isinstance(exc, UnknownJob | JobConflict) or type(exc) in (LookupError, PermissionError))
        ):
            record.msg = "%r: %s refused: %s"
            record.args = (args[0], args[1], exc)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_refusal_filter = _OneLineRefusals()


def _install_refusal_filter() -> None:
    peer_logger = logging.getLogger("korinet.endpoint")  # where the runtimes log failed handlers
    if _refusal_filter not in peer_logger.filters:
        peer_logger.addFilter(_refusal_filter)


def _fingerprint(peer: Any) -> str:
    return str(getattr(getattr(peer, "identity", None), "fingerprint", None) or "anonymous")


def host_status(jobs: int = 0) -> dict[str, Any]:
    """Uptime, load, memory and disks of this host (psutil)."""
    import platform

    import psutil  # type: ignore[import-untyped]

    vm = psutil.virtual_memory()
    swap = psutil.swap_memory()
    disks = []
    for part in psutil.disk_partitions(all=False):
        with contextlib.suppress(OSError):
            usage = psutil.disk_usage(part.mountpoint)
            disks.append(
                {"mount": part.mountpoint, "device": part.device, "fstype": part.fstype,
                 "total": usage.total, "used": usage.used, "free": usage.free, "percent": usage.percent}
            )  # fmt: skip
    if not any(d["mount"] == "/" for d in disks):  # in a container / is often an overlay psutil skips
        with contextlib.suppress(OSError):
            usage = psutil.disk_usage("/")
            disks.insert(0, {"mount": "/", "device": "", "fstype": "", "total": usage.total,
                             "used": usage.used, "free": usage.free, "percent": usage.percent})  # fmt: skip
    return {
        "hostname": platform.node(),
        "system": f"{platform.system()} {platform.release()}",
        "uptime": time.time() - psutil.boot_time(),
        "load": list(os.getloadavg()),
        "cpus": psutil.cpu_count(),
        "memory": {"total": vm.total, "available": vm.available, "percent": vm.percent},
        "swap": {"total": swap.total, "used": swap.used},
        "disks": disks,
        "jobs": jobs,
    }


def _relayed(relay: str, reported: str | None) -> dict[str, Any]:
    """The audit's ``peer`` of a relayed connection: the relay, the only address we
    saw; the client's is the relay's word (it is not authenticated to us)."""
    return {"peer": relay, "via": "relay", "reported_peer": reported}
