"""The blocking drivers: KoriNet sessions driven in the caller's thread, no event loop.

:class:`SyncClient` (``korinet.client``) and :class:`SessionTable` /
:class:`SyncServerSession` (``korinet.server``) drive the same sans-I/O
:class:`~korinet.session.Session` and :class:`~korinet.endpoint.Endpoint` as the
asyncio runtime, over blocking sockets, through one driver, ``sync/driver.py``
(which describes the threading).
"""

from __future__ import annotations

from .client import DEFAULT_PORT, SyncClient, connect
from .server import SessionTable, SyncServerSession

__all__ = ["DEFAULT_PORT", "SessionTable", "SyncClient", "SyncServerSession", "connect"]
