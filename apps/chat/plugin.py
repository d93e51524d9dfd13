"""The korinet-chat plugin: its message types, and the session hooks that tell a
hub when a member's link drops ("bob is reconnecting") or its session ends ("bob left").

Loaded by every KoriNet process (entry point ``chat``): it imports only the pure
protocol module and the watcher registry.
"""

from __future__ import annotations

from typing import Any

import korinet
from korinet.messages import MessageType

from . import protocol, watch


@korinet.hookimpl
def korinet_register_message_types() -> list[MessageType]:
    return protocol.message_types()


@korinet.hookimpl
def korinet_session_opened(session: Any) -> None:
    watch.notify("opened", session)


@korinet.hookimpl
def korinet_session_resumed(session: Any, replayed: int) -> None:
    watch.notify("resumed", session)


@korinet.hookimpl
def korinet_session_lost(session: Any, error: BaseException) -> None:
    watch.notify("lost", session)


@korinet.hookimpl
def korinet_session_closed(session: Any, reason: str) -> None:
    watch.notify("closed", session)
