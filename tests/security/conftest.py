"""Fixtures of the security tests: a private KORINET_HOME per test, identities made
once per session (key generation is cheap, but not free), a loopback TLS server."""

from __future__ import annotations

from pathlib import Path

import pytest

from korinet.plugins import PluginManager
from korinet.security import AuthorizedKeys, Identity


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own configuration directory: nothing touches ~/.config."""
    path = tmp_path / "korinet-home"
    monkeypatch.setenv("KORINET_HOME", str(path))
    return path


@pytest.fixture
def plugins() -> PluginManager:
    return PluginManager.load(entry_points=False)


@pytest.fixture(scope="session")
def server_identity() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="session")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="session")
def bob() -> Identity:
    return Identity.generate()


@pytest.fixture
def authorized(tmp_path: Path, alice: Identity, bob: Identity) -> AuthorizedKeys:
    """Alice is an admin, Bob a plain user."""
    keys = AuthorizedKeys(tmp_path / "authorized_keys")
    keys.authorize(alice.fingerprint, "alice", ["admin"])
    keys.authorize(bob.fingerprint, "bob")
    return keys
