"""A restored session stays bound to the key that opened it (docs/SECURITY.md): after
a server restart, its owner resumes it over TLS; a copy of the owner's store in
another identity's hands is refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR

from korinet import AuthenticationError, Client, Server
from korinet.plugins import PluginManager
from korinet.security import AuthorizedKeys, ClientTLS, Identity, ServerTLS

T = 10 * TIMEOUT_FACTOR


def copy_store(source: Path, target: Path) -> None:
    """What a thief gets by copying the file (WAL included)."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


@pytest.mark.timeout(60 * TIMEOUT_FACTOR)
async def test_a_restored_session_resumes_for_its_key_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KORINET_HOME", str(tmp_path / "home"))
    plugins = PluginManager.load(entry_points=False)
    server_id, alice, bob = Identity.generate(), Identity.generate(), Identity.generate()
    keys = AuthorizedKeys(tmp_path / "authorized_keys")
    keys.authorize(alice.fingerprint, "alice", ["admin"])
    keys.authorize(bob.fingerprint, "bob")
    received: list[Any] = []
    identities: list[str] = []

    async def handler(peer: Any) -> None:
        identities.append(peer.identity.name)
        async for data in peer:
            received.append(data)

    def server(port: int) -> Server:
        tls = ServerTLS(server_id, authorized=keys)
        return Server("127.0.0.1", port, tls=tls, handler=handler, plugins=plugins, store=tmp_path / "s.db")

    first = await server(0).start()
    port = first.port
    client = await Client.connect(
        "127.0.0.1", port, tls=ClientTLS(alice), plugins=plugins, store=tmp_path / "a.db"
    )
    session_id = client.session_id
    await client.send("one", timeout=T)
    client.post("two")  # accepted, maybe not yet delivered
    await client.abort()
    await first.close()
    copy_store(tmp_path / "a.db", tmp_path / "stolen.db")

    second = await server(port).start()
    try:
        with pytest.raises(AuthenticationError, match="another identity"):
            await Client.connect(
                "127.0.0.1",
                port,
                tls=ClientTLS(bob),
                plugins=plugins,
                store=tmp_path / "stolen.db",
                open_timeout=T,
            )
        client = await Client.connect(
            "127.0.0.1", port, tls=ClientTLS(alice), plugins=plugins, store=tmp_path / "a.db", open_timeout=T
        )
        assert client.session_id == session_id
        await client.send("three", timeout=T)
        assert received == ["one", "two", "three"]
        # The restored session took alice's roles back from her certificate on resume.
        restored = second.hub.sessions[session_id]
        assert restored.identity.name == "alice" and "admin" in restored.identity.roles
        assert identities == ["alice", "alice"]  # the handler ran again, for alice
        await client.close()
    finally:
        await second.close()
