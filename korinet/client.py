"""The original blocking client API: ``client(host, port, timeout=...)``.

It runs a :class:`korinet.sync.SyncClient`, which drives the session over a
blocking socket in the calling thread (a background thread answers heartbeats
while the application is idle): the session reconnects and resumes by itself,
and ``send()`` returns once the server's application has the message.
"""

from __future__ import annotations

import ssl as ssl_module
from typing import TYPE_CHECKING, Any

from .messages import Message
from .plugins import PluginManager
from .session import SessionConfig
from .sync.client import DEFAULT_PORT, SyncClient

if TYPE_CHECKING:
    from .security import ClientTLS

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
        tls: TLS 1.3 with server pinning and, given an identity, mutual TLS
            (:class:`~korinet.security.ClientTLS`); plaintext by default, as the original.
        passphrase: prove this pre-shared passphrase (challenge-response).
        ssl: a ready ``ssl.SSLContext`` instead of ``tls``.
        outage_limit: give up after this many seconds without a connection.
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        timeout: float | None = None,
        *,
        tls: ClientTLS | None = None,
        passphrase: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        config: SessionConfig | None = None,
        plugins: PluginManager | None = None,
        outage_limit: float | None = None,
    ) -> None:
        self.timeout = timeout
        self._client = SyncClient(
            host,
            port,
            timeout=timeout,
            open_timeout=120.0 if timeout is None else timeout,
            tls=tls,
            passphrase=passphrase,
            ssl=ssl,
            config=config,
            plugins=plugins,
            outage_limit=outage_limit,
        )

    @property
    def runtime(self) -> SyncClient:
        """The client underneath (its ``session`` holds the statistics and settings)."""
        return self._client

    def send(self, obj: Any, type: str = "") -> None:
        """Send ``obj``; return once the server's application has it.

        Raises:
            KoriNetTimeout: no acknowledgement within ``timeout``; the message stays
                queued and is delivered exactly once when the link returns.
        """
        self._client.timeout = self.timeout  # the attribute may have been changed
        self._client.send(obj, type)

    def recv(self, giveID: bool = False, timeout: float | None = None) -> Any:  # noqa: N803
        """Return the next message from the server (waits for it)."""
        msg = self._client.recv_message(timeout)
        return with_id(msg) if giveID else msg.data

    def request(self, obj: Any, type: str, timeout: float | None = None) -> Any:
        """Send a request of a typed message and return the reply."""
        return self._client.request(obj, type, timeout=timeout if timeout is not None else self.timeout)

    def close(self) -> None:
        """Wait for pending acknowledgements (up to 5 s), then end the session."""
        self._client.close()

    def __enter__(self) -> client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
