"""The hook implementations: message types with validators and server-side
handlers, watcher bookkeeping on session events, and the ``korinet notebook`` command.

The entry point names the object :data:`plugin` (``korinet_notebook.plugin:plugin``):
one notebook per process. Tests and embedders register their own
``NotebookPlugin()`` instead (``PluginManager.load(extra=[NotebookPlugin()])``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from korinet import Client, KoriNetError, Message, MessageType, hookimpl

from .notebook import (
    CHANGED,
    DELETE,
    GET,
    LIST,
    PUT,
    WATCH,
    Entry,
    Notebook,
    validate_changed,
    validate_key_request,
    validate_prefix_request,
    validate_put,
)

__all__ = ["NotebookPlugin", "plugin"]

logger = logging.getLogger(__name__)


class NotebookPlugin:
    """The notebook a server keeps, and the peers watching parts of it."""

    def __init__(self, notebook: Notebook | None = None) -> None:
        self.notebook = notebook or Notebook()
        #: peer -> key prefixes it watches; forgotten when its session closes
        self.watchers: dict[Any, set[str]] = {}

    # -------------------------------------------------------------- hooks

    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [
            MessageType(PUT, validate=validate_put, handler=self.on_put, description="set a key"),
            MessageType(GET, validate=validate_key_request, handler=self.on_get, description="read a key"),
            MessageType(
                DELETE, validate=validate_key_request, handler=self.on_delete, description="remove a key"
            ),
            MessageType(
                LIST, validate=validate_prefix_request, handler=self.on_list, description="keys by prefix"
            ),
            MessageType(
                WATCH,
                validate=validate_prefix_request,
                handler=self.on_watch,
                description="be told of every change under a prefix",
            ),
            # No handler: a watcher's application takes these with recv().
            MessageType(CHANGED, validate=validate_changed, description="a watched key changed"),
        ]

    @hookimpl
    def korinet_session_closed(self, session: Any, reason: str) -> None:
        self.watchers.pop(session, None)

    @hookimpl
    def korinet_add_cli_commands(
        self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]
    ) -> None:
        from .cli import add_command  # imported late: loading the plugin stays cheap

        add_command(subparsers)

    # -------------------------------------------------------------- handlers
    # A handler gets the peer and the Message; for a request its return value is the
    # reply, and an exception becomes an error reply (MessageRejected at the caller).

    def on_put(self, peer: Any, msg: Message) -> dict[str, Any]:
        _server_only(peer, msg)
        entry = self.notebook.put(msg.data["key"], msg.data["value"])
        self._notify(entry.key, entry.as_dict() | {"deleted": False})
        return {"key": entry.key, "version": entry.version}

    def on_get(self, peer: Any, msg: Message) -> dict[str, Any]:
        _server_only(peer, msg)
        # An absent key is an answer, not a failure: a raising handler is logged with
        # its traceback on the server, which a typo on a client does not deserve.
        key = msg.data["key"]
        try:
            return self.notebook.get(key).as_dict() | {"found": True}
        except KeyError:
            return {"key": key, "value": None, "version": 0, "found": False}

    def on_delete(self, peer: Any, msg: Message) -> dict[str, Any]:
        _server_only(peer, msg)
        key = msg.data["key"]
        version = self.notebook.delete(key)
        if version is not None:
            self._notify(key, {"key": key, "value": None, "version": version, "deleted": True})
        return {"key": key, "deleted": version is not None}

    def on_list(self, peer: Any, msg: Message) -> dict[str, Any]:
        _server_only(peer, msg)
        return {"entries": [e.as_dict() for e in self.notebook.list(msg.data["prefix"])]}

    def on_watch(self, peer: Any, msg: Message) -> dict[str, Any]:
        """Start watching a prefix; the reply is the current state under it, and every
        later change arrives as a ``notebook.changed`` message, in order."""
        _server_only(peer, msg)
        prefix = msg.data["prefix"]
        self.watchers.setdefault(peer, set()).add(prefix)
        return {"prefix": prefix, "entries": [e.as_dict() for e in self.notebook.list(prefix)]}

    def _notify(self, key: str, change: dict[str, Any]) -> None:
        for peer, prefixes in list(self.watchers.items()):
            if not any(key.startswith(p) for p in prefixes):
                continue
            try:
                # Reliable: a watcher that is reconnecting gets it on resume, once.
                peer.post(change, CHANGED)
            except KoriNetError as exc:  # its window is full or its session ended
                logger.warning("notebook: %r stops watching: %s", peer, exc)
                del self.watchers[peer]


def _server_only(peer: Any, msg: Message) -> None:
    if isinstance(peer, Client):
        raise PermissionError(f"{msg.type} is served by a notebook server, not by a client")


def entries(reply: dict[str, Any]) -> list[Entry]:
    """The entries of a list or watch reply."""
    return [Entry(e["key"], e["value"], e["version"]) for e in reply["entries"]]


#: What the entry point loads: the process's notebook.
plugin = NotebookPlugin()
