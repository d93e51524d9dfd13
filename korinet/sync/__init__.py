"""A blocking KoriNet client that does its own socket I/O in the caller's thread.

:class:`SyncClient` drives the same sans-I/O :class:`~korinet.session.Session` as
the asyncio :class:`~korinet.runtime.Client`, over a plain (or TLS) socket, with no
event loop on the path of ``send()`` and ``recv()``. ``korinet.client`` (the
original blocking API) is built on it. See ``korinet/sync/client.py`` for the
threading design.
"""

from __future__ import annotations

from .client import DEFAULT_PORT, SyncClient, connect

__all__ = ["DEFAULT_PORT", "SyncClient", "connect"]
