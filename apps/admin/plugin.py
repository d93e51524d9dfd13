"""The korinet-admin plugin: its message types, registered in every KoriNet process.

Cheap to import (every KoriNet process loads it): the agent's code is imported only
when a request arrives on a server that runs an agent. Requests reaching a server
without one (``korinet serve`` also loads this plugin) are refused: registering the
types does not turn every KoriNet server into a remote shell.
"""

from __future__ import annotations

import weakref
from typing import Any

from korinet import Message, MessageType, hookimpl

from . import protocol as p

__all__ = [
    "agent_of",
    "bind_agent",
    "korinet_message_rejected",
    "korinet_register_message_types",
    "korinet_session_lost",
    "korinet_session_refused",
    "korinet_session_resumed",
    "unbind_agent",
    "watch_links",
]

#: The agent serving each Hub (see korinet_admin.agent.Agent.bind).
_agents: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


#: Callbacks told when a client session's link drops and comes back (the CLI prints them).
_link_watchers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def agent_of(hub: Any) -> Any | None:
    """The agent bound to ``hub``, if any."""
    return _agents.get(hub) if hub is not None else None


def watch_links(client: Any, callback: Any) -> None:
    """Call ``callback(event, detail)`` with ``"lost"`` or ``"resumed"`` for ``client``."""
    _link_watchers[client] = callback


@hookimpl
def korinet_session_lost(session: Any, error: BaseException) -> None:
    callback = _link_watchers.get(session)
    if callback is not None:
        callback("lost", str(error))


@hookimpl
def korinet_session_resumed(session: Any, replayed: int) -> None:
    callback = _link_watchers.get(session)
    if callback is not None:
        callback("resumed", str(replayed))


@hookimpl
def korinet_session_refused(
    server: Any, peername: str, fingerprint: str | None, reason: str, code: int
) -> None:
    # Only the agent of the refusing hub records it: several agents in one process
    # (tests, or one per address) each audit their own clients.
    agent = _agents.get(server)
    if agent is not None:
        agent.refused(peername, fingerprint, reason, code)


@hookimpl
def korinet_message_rejected(session: Any, message_type: str, reason: str) -> None:
    # Server-side sessions know their hub; a client's rejections concern no agent.
    agent = _agents.get(getattr(session, "hub", None))
    if agent is not None:
        agent.rejected(session, message_type, reason)


def bind_agent(hub: Any, agent: Any) -> None:
    _agents[hub] = agent


def unbind_agent(hub: Any) -> None:
    _agents.pop(hub, None)


def _handle(peer: Any, msg: Message) -> Any:
    agent = _agents.get(getattr(peer, "hub", None))
    if agent is None:
        raise LookupError("this KoriNet server does not run the korinet-admin agent")
    return agent.handle(peer, msg)


def _request(name: str, validate: Any, description: str) -> MessageType:
    return MessageType(
        name, validate=validate, handler=_handle, required_role=p.ADMIN_ROLE, description=description
    )


MESSAGE_TYPES = [
    _request(p.EXEC, p.validate_exec, "start a job (or attach to it), korinet-admin exec"),
    _request(p.ATTACH, p.validate_attach, "stream a job's output from given offsets"),
    _request(p.STDIN, p.validate_stdin, "stdin bytes for a job, at an offset"),
    _request(p.SIGNAL, p.validate_signal, "signal a job's process group"),
    _request(p.RESIZE, p.validate_resize, "new terminal size of a --tty job"),
    _request(p.JOBS, p.validate_empty, "list this identity's jobs"),
    _request(p.STATUS, p.validate_empty, "uptime, load, memory, disks"),
    _request(p.PUT_OPEN, p.validate_put_open, "begin or resume an upload"),
    _request(p.PUT_CHUNK, p.validate_put_chunk, "bytes of an upload"),
    _request(p.PUT_CLOSE, p.validate_put_close, "check an upload's sha256 and move it in place"),
    _request(p.GET_OPEN, p.validate_get_open, "size and sha256 of a file to download"),
    _request(p.GET_CHUNK, p.validate_get_chunk, "bytes of a file being downloaded"),
    # agent to client: no handler, they go to the client's inbox
    MessageType(p.OUTPUT, validate=p.validate_output, description="a job's output at an offset"),
    MessageType(p.EXIT, validate=p.validate_exit, description="a job's exit, after all of its output"),
]


@hookimpl
def korinet_register_message_types() -> list[MessageType]:
    return list(MESSAGE_TYPES)
