"""The original blocking client API: ``client(host, port, timeout=...)``.

It runs a :class:`korinet.runtime.Client` on the shared background loop: the
session reconnects and resumes by itself, and ``send()`` returns once the server's
application has the message.
"""

from __future__ import annotations

import ssl as ssl_module
from typing import Any

from ._loopthread import run, wait_for_future
from .exceptions import KoriNetTimeout, SendBufferFull
from .messages import REALTIME, Message
from .plugins import PluginManager
from .runtime.client import DEFAULT_PORT, Client
from .session import SessionConfig

__all__ = ["client", "with_id"]


def with_id(msg: Message) -> Any:
    """The original's ``recv(giveID=True)`` shape: a dict gets an ``"id"`` key,
    anything else comes back as ``(data, id)``."""
    if isinstance(msg.data, dict):
        return {**msg.data, "id": msg.message_id}
    return (msg.data, msg.message_id)


class client:  # noqa: N801 - the original API's name
    """A blocking, reconnecting KoriNet client.

    Args:
        host, port: the server.
        timeout: seconds the first connection may take (default 120, as the original
            retried for 120 s) and each ``send()`` may wait for its acknowledgement.
            A send that times out raises KoriNetTimeout but its message stays queued:
            it is delivered exactly once when the link returns.
        ssl: an ``ssl.SSLContext`` for TLS; plaintext by default, as the original.
        outage_limit: give up after this many seconds without a connection.
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        timeout: float | None = None,
        *,
        ssl: ssl_module.SSLContext | None = None,
        config: SessionConfig | None = None,
        plugins: PluginManager | None = None,
        outage_limit: float | None = None,
    ) -> None:
        self.timeout = timeout
        self._client: Client = run(
            Client.connect(
                host,
                port,
                open_timeout=120.0 if timeout is None else timeout,
                ssl=ssl,
                config=config,
                plugins=plugins,
                outage_limit=outage_limit,
            )
        )

    @property
    def runtime(self) -> Client:
        """The asyncio client underneath (for its statistics and settings)."""
        return self._client

    def send(self, obj: Any, type: str = "") -> None:
        """Send ``obj``; return once the server's application has it.

        Raises:
            KoriNetTimeout: no acknowledgement within ``timeout``; the message stays
                queued and is delivered exactly once when the link returns.
        """
        mtype = self._client.message_types.get(type) if type else None
        if mtype is not None and mtype.delivery is REALTIME:
            run(self._client.send(obj, type))
            return
        try:
            wait_for_future(lambda: self._client.send_nowait(obj, type), self.timeout)
        except SendBufferFull:  # the window is full: wait for space the slow way
            run(self._client.send(obj, type, timeout=self.timeout))
        except TimeoutError:
            raise KoriNetTimeout(
                f"no acknowledgement within {self.timeout}s (the message stays queued)"
            ) from None

    def recv(self, giveID: bool = False, timeout: float | None = None) -> Any:  # noqa: N803
        """Return the next message from the server (waits for it)."""
        msg = run(self._client.recv_message(timeout))
        return with_id(msg) if giveID else msg.data

    def request(self, obj: Any, type: str, timeout: float | None = None) -> Any:
        """Send a request of a typed message and return the reply."""
        return run(self._client.request(obj, type, timeout=timeout if timeout is not None else self.timeout))

    def close(self) -> None:
        """Wait for pending acknowledgements (up to 5 s), then end the session."""
        run(self._client.close())

    def __enter__(self) -> client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
