"""Hook specifications: the whole plugin surface of KoriNet (docs/PLUGINS.md).

Three kinds, on purpose:

* ``korinet_register_*``: every plugin's lists are concatenated;
* notifications (``korinet_session_*``, ``korinet_link_reopened``,
  ``korinet_ack_timed``, ``korinet_server_*``, ``korinet_message_rejected``): return
  nothing; a plugin that raises is logged with its name and the others still run;
* ``korinet_add_cli_commands``: extend the ``korinet`` command line.

A hook that needs to await may return an awaitable (an ``async def`` hook is
fine): the runtime awaits it in a task, with the same isolation. Every call goes
through pluggy's hook caller (korinet.plugins), so pluggy's tracing and wrappers
see it; ``KORINET_TRACE_PLUGINS=1`` logs each plugin's call with its duration.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Final

import pluggy

if TYPE_CHECKING:
    from .codecs.base import Codec
    from .endpoint import SessionHandle
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
def korinet_session_opened(session: SessionHandle) -> Any:
    """A new session completed its first handshake. ``session`` is the runtime's
    :class:`~korinet.runtime.Peer` (server side), :class:`~korinet.runtime.Client`
    or :class:`~korinet.sync.SyncClient`: a :class:`~korinet.endpoint.SessionHandle`."""


@hookspec
def korinet_session_resumed(session: SessionHandle, replayed: int) -> Any:
    """A session continued on a new connection; ``replayed`` messages were re-sent."""


@hookspec
def korinet_session_lost(session: SessionHandle, error: BaseException) -> Any:
    """A session's connection dropped (``error`` says why); it may still resume."""


@hookspec
def korinet_session_closed(session: SessionHandle, reason: str) -> Any:
    """A session ended for good (orderly close, expiry or protocol error)."""


@hookspec
def korinet_link_reopened(session: SessionHandle, resumed: bool, replayed: int) -> Any:
    """A session object has a link again after losing one: ``resumed`` True when
    the session continued (after :func:`korinet_session_resumed`, ``replayed``
    messages re-sent), False when the server had forgotten it and a new session
    began on the same object (after :func:`korinet_session_opened`, ``replayed``
    0). Not called for the first link. For "connection is back" notices, one hook
    instead of two."""


@hookspec
def korinet_ack_timed(session: SessionHandle, seq: int, rtt: float) -> Any:
    """A sampled acknowledgement round trip: message ``seq`` that this side sent was
    acknowledged ``rtt`` seconds after it was queued.

    Sampled as TCP samples its RTT: at most one message per session is timed at a
    time (the first one queued while none is), and a sample whose link dropped in
    between is discarded (Karn's rule: it would measure the outage, not the path).
    Called on the sending side, on the event loop (the blocking client: after its
    step, outside its lock). The runtime times nothing while no plugin implements
    this hook."""


@hookspec
def korinet_session_refused(
    server: Any, peername: str, fingerprint: str | None, reason: str, code: int
) -> Any:
    """A connection was refused before it became a session. Called once per refused
    connection, at the moment the :class:`~korinet.runtime.Hub` decides (a delayed
    answer to a failed authentication is still reported at once).

    ``server`` is the :class:`~korinet.runtime.Hub` that refused (a Server's is
    ``server.hub``; a Hub fed sockets by ``adopt()`` has no Server). ``peername`` is
    ``"host:port"``; ``fingerprint`` the client's key when the hub checked one (TLS
    with authorized keys), else None. ``code`` is the
    :class:`~korinet.session.CloseCode` of the refusal: ``AUTH_FAILED`` (unknown key,
    no certificate, wrong or missing passphrase, a resume token of another key),
    ``TRY_AGAIN_LATER`` (a connection or session limit; a connection over a
    connection limit is cut without a CLOSE frame), ``HANDSHAKE_TIMEOUT``, or the
    handshake's own (``PROTOCOL_ERROR``, ``UNSUPPORTED_VERSION``, ``UNSUPPORTED_CODEC``).
    """


@hookspec
def korinet_message_rejected(session: SessionHandle, message_type: str, reason: str) -> Any:
    """A received message was rejected by this side's rules (unknown type, failed
    validation, missing role, untyped where only typed ones are accepted). A reliable
    one is answered with a REJECT (the sender gets :class:`~korinet.MessageRejected`);
    a realtime one (failed validation or missing role) is dropped and counted in
    ``session.stats.realtime_malformed``. Called once per message, on the receiving
    side: ``session`` is the :class:`~korinet.runtime.Peer`,
    :class:`~korinet.runtime.Client` or :class:`~korinet.sync.SyncClient` that received
    it (its ``identity`` says who sent it), ``message_type`` the type's name (``""``
    for an untyped message)."""


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


@hookspec(firstresult=True)
def korinet_cluster_bus(address: str) -> Any:
    """Return a :class:`~korinet.cluster.ClusterBus` for ``address`` (e.g.
    ``nats://host:4222``) if this plugin serves its scheme, else None. The first
    answer wins. The bus is returned unconnected: the hub calls ``connect()``."""
