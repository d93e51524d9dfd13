"""The agent's audit log: one JSON object a line, appended, never rewritten.

Every request is recorded with who made it (name and key fingerprint), from where,
and what the agent decided; so are the clients the runtime refused before any
request reached us (unknown key, no certificate, a request without the admin role),
which the runtime reports through the hooks ``korinet_session_refused`` and
``korinet_message_rejected`` (plugin.py routes them to the agent of the hub).

Refusals go through a :class:`Throttle`: a flood of connections must not become a
flood of lines (nor fill the disk), so the first refusal of a kind from an address
is written at once and the rest of an interval become one summary line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Final

__all__ = ["AuditLog", "Throttle", "peer_address"]

#: Seconds over which repeated refusals from one address are summed up.
THROTTLE_INTERVAL: Final = 60.0
#: Addresses followed at once; beyond, the rest are summed up under "*".
THROTTLE_ADDRESSES: Final = 10000

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


class _Window:
    __slots__ = ("end", "fields", "reasons", "timer")

    def __init__(self, end: float, fields: dict[str, Any]) -> None:
        self.end = end
        self.fields = fields  # of the first entry, for the summary
        self.reasons: Counter[str] = Counter()
        self.timer: asyncio.TimerHandle | None = None


class Throttle:
    """Writes the first event of each ``key`` (an address and a kind) in an interval,
    counts the others, and writes one summary of them when the interval ends: e.g.
    ``{"event": "refused", "repeated": 1099, "reasons": {...}}``."""

    def __init__(self, audit: AuditLog, interval: float = THROTTLE_INTERVAL) -> None:
        self.audit = audit
        self.interval = interval
        self._windows: dict[Hashable, _Window] = {}

    def record(self, key: Hashable, event: str, **fields: Any) -> None:
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None and len(self._windows) >= THROTTLE_ADDRESSES:
            key, window = "*", self._windows.get("*")  # too many addresses: one bucket
            fields = {**fields, "peer": "*"}
            if "reported_peer" in fields:
                fields["reported_peer"] = "*"
        if window is not None and now < window.end:
            window.reasons[str(fields.get("reason"))] += 1
            return
        if window is not None:
            self._flush(key)
        self.audit.record(event, **fields)
        window = self._windows[key] = _Window(now + self.interval, {"event": event, **fields})
        try:
            window.timer = asyncio.get_running_loop().call_later(self.interval, self._flush, key)
        except RuntimeError:  # no loop: flushed by the next event of the key, or close()
            pass

    def _flush(self, key: Hashable) -> None:
        window = self._windows.pop(key, None)
        if window is None:
            return
        if window.timer is not None:
            window.timer.cancel()
        count = sum(window.reasons.values())
        if not count:
            return
        fields = dict(window.fields)
        event = fields.pop("event")
        if fields.get("reported_peer") not in (None, "*"):  # through a relay: keyed by the client
            fields["reported_peer"] = peer_address(str(fields["reported_peer"]))
            source = f"{fields['reported_peer']} (as reported by the relay {fields.get('peer')})"
        else:
            fields["peer"] = peer_address(str(fields.get("peer", "")))
            source = fields["peer"]
        fields["reason"] = f"{count} more like this from {source} within {self.interval:g}s"
        self.audit.record(event, **fields, repeated=count, reasons=dict(window.reasons.most_common(10)))

    def close(self) -> None:
        """Write every pending summary."""
        for key in list(self._windows):
            self._flush(key)


def peer_address(peername: str) -> str:
    """``host:port`` (``[v6]:port`` or ``v6:port`` too) to host."""
    host, sep, port = peername.rpartition(":")
    return host.strip("[]") if sep and port.isdigit() else peername
