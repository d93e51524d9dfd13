"""The agent's audit log: one JSON object a line, appended, never rewritten.

Every request is recorded with who made it (name and key fingerprint), from where,
and what the agent decided; so are the clients the runtime refused before any
request reached us (unknown key, no certificate, a request without the admin role).
The runtime reports those refusals only in its log, so :class:`RefusalTap` reads
them there (docs/ADMIN.md, "What the core could offer").
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["AuditLog", "RefusalTap"]

logger = logging.getLogger(__name__)


class AuditLog:
    """Appends events to ``path`` (created 0600, opened O_APPEND: a line is written
    whole, at the end, even with several writers)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "event": event, **fields}
        line = (json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            if self._fd < 0:
                logger.warning("audit log %s closed, not recorded: %s", self.path, line.decode().strip())
                return
            try:
                os.write(self._fd, line)
            except OSError as exc:  # a full disk must not stop the agent, but it is said
                logger.error("cannot write the audit log %s: %s", self.path, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """Every entry of a log (for tests and tools)."""
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


class RefusalTap(logging.Handler):
    """Copies the runtime's refusals into the audit log.

    Listens to ``korinet.runtime.server`` (a key refused during the handshake) and
    ``korinet.dispatch`` (a typed message rejected: here, an admin request from an
    identity without the admin role).
    """

    LOGGERS = ("korinet.runtime.server", "korinet.dispatch")

    def __init__(self, audit: AuditLog, prefix: str = "admin.") -> None:
        super().__init__(logging.WARNING)
        self.audit = audit
        self.prefix = prefix
        self._saved_levels: dict[str, int] = {}

    def install(self) -> RefusalTap:
        for name in self.LOGGERS:
            log = logging.getLogger(name)
            log.addHandler(self)
            if log.getEffectiveLevel() > logging.WARNING:
                self._saved_levels[name] = log.level
                log.setLevel(logging.WARNING)
        return self

    def uninstall(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)
        for name, level in self._saved_levels.items():
            logging.getLogger(name).setLevel(level)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._emit(record)
        except Exception:  # never let auditing break the runtime's logging
            self.handleError(record)

    def _emit(self, record: logging.LogRecord) -> None:
        msg = str(record.msg)
        args = record.args if isinstance(record.args, tuple) else ()
        if record.name == "korinet.dispatch" and msg.startswith("%r: rejected message") and len(args) >= 4:
            peer, _seq, mtype, reason = args[:4]
            if not str(mtype).startswith(self.prefix):
                return
            identity = getattr(peer, "identity", None)
            self.audit.record(
                "refused",
                stage="request",
                type=str(mtype),
                who=getattr(identity, "name", None),
                fingerprint=getattr(identity, "fingerprint", None),
                peer=getattr(peer, "peername", None),
                reason=str(reason),
            )
        elif record.name == "korinet.runtime.server" and ": refused:" in msg:
            text = record.getMessage()
            peer, _, reason = text.partition(": refused: ")
            fingerprint = next((a for a in args if isinstance(a, str) and a.startswith("SHA256:")), None)
            self.audit.record(
                "refused", stage="authentication", peer=peer, fingerprint=fingerprint, reason=reason
            )
