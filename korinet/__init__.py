"""KoriNet: reliable, exactly-once, in-order messaging over TCP for Python.

The blocking API of the original KoriNet (``client``, ``server``, ``protocol.v2``)
sits on an asyncio runtime (``korinet.runtime``) built on a sans-I/O session
(``korinet.session``). See README.md and docs/.
"""

from __future__ import annotations

from . import protocol
from .client import client
from .codecs.base import Codec
from .exceptions import (
    AuthenticationError,
    CodecError,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    FrameTooLarge,
    HostKeyChanged,
    InvalidState,
    KoriNetError,
    KoriNetTimeout,
    LocalProtocolError,
    MessageRejected,
    MessageTooLarge,
    NegotiationError,
    ProtocolError,
    RemoteProtocolError,
    SendBufferFull,
    SessionExpired,
)
from .hookspecs import hookimpl
from .messages import REALTIME, RELIABLE, Delivery, Message, MessageType
from .plugins import PluginConflict, PluginManager
from .runtime import (
    Client,
    FanoutResult,
    Hub,
    Peer,
    Server,
    SessionStore,
    StoreError,
    connect,
    post_many,
    send_realtime_many,
    serve,
)
from .server import server
from .session import SessionConfig
from .sync.server import SessionTable

__version__ = "0.1.0"

__all__ = [
    "REALTIME",
    "RELIABLE",
    "AuthenticationError",
    "Client",
    "Codec",
    "CodecError",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "Delivery",
    "FanoutResult",
    "FrameTooLarge",
    "HostKeyChanged",
    "Hub",
    "InvalidState",
    "KoriNetError",
    "KoriNetTimeout",
    "LocalProtocolError",
    "Message",
    "MessageRejected",
    "MessageTooLarge",
    "MessageType",
    "NegotiationError",
    "Peer",
    "PluginConflict",
    "PluginManager",
    "ProtocolError",
    "RemoteProtocolError",
    "SendBufferFull",
    "Server",
    "SessionConfig",
    "SessionExpired",
    "SessionStore",
    "SessionTable",
    "StoreError",
    "client",
    "connect",
    "hookimpl",
    "post_many",
    "protocol",
    "send_realtime_many",
    "serve",
    "server",
]
