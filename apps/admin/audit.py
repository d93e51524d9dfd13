"""The agent's audit log: one JSON object a line, appended, never rewritten.

Every request is recorded with who made it (name and key fingerprint), from where,
and what the agent decided; so are the clients the runtime refused before any
request reached us (unknown key, no certificate, a request without the admin role),
which the runtime reports through the hooks ``korinet_session_refused`` and
``korinet_message_rejected`` (plugin.py routes them to the agent of the hub).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["AuditLog"]

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
