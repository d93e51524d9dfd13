"""The asyncio runtime: connections, the reconnecting client, the server and its hub."""

from __future__ import annotations

from ..reconnect import backoff
from .client import DEFAULT_PORT, Client, connect
from .connection import Connection
from .fanout import FanoutResult, post_many, send_realtime_many
from .legacy import LegacyPeer
from .peer import Peer
from .server import Hub, Server, ServerPeer, serve
from .store import SessionStore, StoreError

__all__ = [
    "DEFAULT_PORT",
    "Client",
    "Connection",
    "FanoutResult",
    "Hub",
    "LegacyPeer",
    "Peer",
    "Server",
    "ServerPeer",
    "SessionStore",
    "StoreError",
    "backoff",
    "connect",
    "post_many",
    "send_realtime_many",
    "serve",
]
