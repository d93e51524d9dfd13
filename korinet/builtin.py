"""KoriNet's own message types, registered like any plugin's."""

from __future__ import annotations

from typing import Any

from .hookspecs import hookimpl
from .messages import Message, MessageType

__all__ = ["ECHO", "korinet_register_message_types"]

#: Answers a request with its payload: ``korinet ping`` measures round trips with it.
ECHO = "korinet.echo"


def _echo(peer: Any, msg: Message) -> Any:
    return msg.data


@hookimpl
def korinet_register_message_types() -> list[MessageType]:
    return [MessageType(ECHO, handler=_echo, description="replies with the request's payload")]
