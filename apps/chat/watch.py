"""Routes the runtime's session hooks to the chat objects that care.

The plugin's hook implementations are process-wide: every session of every
KoriNet object in the process reports through them. A hub or a chat client that
wants to hear about its own sessions adds itself here and ignores the others.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["SessionWatcher", "add", "notify", "remove"]


class SessionWatcher(Protocol):
    def session_event(self, event: str, session: Any) -> None:
        """``event`` is "opened", "resumed", "lost" or "closed"."""


_watchers: list[SessionWatcher] = []


def add(watcher: SessionWatcher) -> None:
    if watcher not in _watchers:
        _watchers.append(watcher)


def remove(watcher: SessionWatcher) -> None:
    if watcher in _watchers:
        _watchers.remove(watcher)


def notify(event: str, session: Any) -> None:
    for watcher in list(_watchers):
        watcher.session_event(event, session)
