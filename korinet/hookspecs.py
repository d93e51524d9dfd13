"""Hook specifications: the whole plugin surface of KoriNet (docs/PLUGINS.md).

Three kinds, on purpose:

* ``korinet_register_*``: every plugin's lists are concatenated;
* notifications (``korinet_session_*``, ``korinet_server_*``): return nothing; a
  plugin that raises is logged with its name and the others still run;
* ``korinet_add_cli_commands``: extend the ``korinet`` command line.

A hook that needs to await may return an awaitable; the runtime awaits it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Final

import pluggy

if TYPE_CHECKING:
    from .codecs.base import Codec
    from .messages import MessageType

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME: Final = "korinet"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def korinet_register_codecs() -> list[Codec]:
    """Return codecs this plugin provides (objects with ``name``, ``encode``, ``decode``).

    Called once when the plugin manager is loaded. Names must be unique across all
    plugins: a clash is an error at start-up naming both plugins.
    """
    raise NotImplementedError


@hookspec
def korinet_register_message_types() -> list[MessageType]:
    """Return the :class:`~korinet.MessageType` objects this plugin handles.

    Called once at load. A message type has a name (unique across plugins), an
    optional validator, a delivery class (reliable or realtime) and an optional
    handler run on the receiving side.
    """
    raise NotImplementedError


@hookspec
def korinet_session_opened(session: Any) -> Any:
    """A new session completed its first handshake. ``session`` is the runtime's
    :class:`~korinet.runtime.Peer` (server side) or :class:`~korinet.runtime.Client`."""


@hookspec
def korinet_session_resumed(session: Any, replayed: int) -> Any:
    """A session continued on a new connection; ``replayed`` messages were re-sent."""


@hookspec
def korinet_session_lost(session: Any, error: BaseException) -> Any:
    """A session's connection dropped (``error`` says why); it may still resume."""


@hookspec
def korinet_session_closed(session: Any, reason: str) -> Any:
    """A session ended for good (orderly close, expiry or protocol error)."""


@hookspec
def korinet_server_started(server: Any) -> Any:
    """A :class:`~korinet.runtime.Server` is listening."""


@hookspec
def korinet_server_stopped(server: Any) -> Any:
    """A :class:`~korinet.runtime.Server` stopped listening and closed its sessions."""


@hookspec
def korinet_add_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add subcommands to the ``korinet`` command. Set ``func`` as the parser's
    default (``parser.set_defaults(func=callable)``); it receives the parsed args
    and returns an exit code."""
