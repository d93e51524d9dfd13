"""The original blocking API can be given TLS: server(conn, tls=...) serves TLS 1.3
with the server's identity and admits only authorized keys; client(tls=...) pins."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR

from korinet import AuthenticationError, client, server
from korinet.security import AuthorizedKeys, ClientTLS, Identity, ServerTLS

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)


def serve_once(tls: ServerTLS, results: list[Any]) -> tuple[socket.socket, threading.Thread]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def run() -> None:
        conn, _ = listener.accept()
        try:
            peer = server(conn, tls=tls)
            results.append((peer.recv(), peer.peer.identity))
            peer.send("over tls")
        except Exception as exc:  # the refused case: reported to the test
            results.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener, thread


def test_blocking_server_and_client_over_tls(
    server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> None:
    results: list[Any] = []
    tls = ServerTLS(server_identity, authorized=authorized)
    listener, thread = serve_once(tls, results)
    port = listener.getsockname()[1]
    c = client("127.0.0.1", port, timeout=10 * TIMEOUT_FACTOR, tls=ClientTLS(alice))
    c.send({"n": 1})
    assert c.recv() == "over tls"
    thread.join(10 * TIMEOUT_FACTOR)
    ((data, identity),) = results
    assert data == {"n": 1} and identity is not None and identity.name == "alice"
    c.close()
    listener.close()


def test_blocking_server_refuses_an_unknown_key(
    server_identity: Identity, authorized: AuthorizedKeys
) -> None:
    results: list[Any] = []
    listener, thread = serve_once(ServerTLS(server_identity, authorized=authorized), results)
    port = listener.getsockname()[1]
    with pytest.raises(AuthenticationError, match="not authorized"):
        client("127.0.0.1", port, timeout=10 * TIMEOUT_FACTOR, tls=ClientTLS(Identity.generate()))
    thread.join(10 * TIMEOUT_FACTOR)
    assert len(results) == 1 and isinstance(results[0], AuthenticationError)
    listener.close()
