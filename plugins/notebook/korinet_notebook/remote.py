"""Calling a notebook server from a client: one function per message type.

Each takes a connected :class:`korinet.Client` (or any peer) and raises
:class:`korinet.MessageRejected` when the server refuses the request (an invalid
message), with the server's reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from korinet import ConnectionClosedOK

from .notebook import CHANGED, DELETE, GET, LIST, PUT, WATCH, Entry, NoSuchKey
from .plugin import entries

__all__ = ["delete", "get", "list_entries", "put", "watch"]


async def put(peer: Any, key: str, value: str | bytes, *, timeout: float | None = None) -> int:
    """Set ``key``; return the change's version."""
    reply = await peer.request({"key": key, "value": value}, PUT, timeout=timeout)
    return int(reply["version"])


async def get(peer: Any, key: str, *, timeout: float | None = None) -> Entry:
    """Raises: NoSuchKey (a KeyError): the notebook has no such key."""
    reply = await peer.request({"key": key}, GET, timeout=timeout)
    if not reply["found"]:
        raise NoSuchKey(f"no such key: {key!r}")
    return Entry(reply["key"], reply["value"], reply["version"])


async def delete(peer: Any, key: str, *, timeout: float | None = None) -> bool:
    """Remove ``key``; return whether it existed."""
    reply = await peer.request({"key": key}, DELETE, timeout=timeout)
    return bool(reply["deleted"])


async def list_entries(peer: Any, prefix: str = "", *, timeout: float | None = None) -> list[Entry]:
    return entries(await peer.request({"prefix": prefix}, LIST, timeout=timeout))


async def watch(
    peer: Any, prefix: str = "", *, timeout: float | None = None
) -> tuple[list[Entry], AsyncIterator[dict[str, Any]]]:
    """Watch ``prefix``: the entries now, and an iterator over every later change
    (``{"key", "value", "version", "deleted"}``) until the session closes.

    The iterator reads the peer's inbox: only changes are expected there.
    """
    reply = await peer.request({"prefix": prefix}, WATCH, timeout=timeout)

    async def changes() -> AsyncIterator[dict[str, Any]]:
        while True:
            try:
                msg = await peer.recv_message()
            except ConnectionClosedOK:
                return
            if msg.type == CHANGED:
                yield msg.data

    return entries(reply), changes()
