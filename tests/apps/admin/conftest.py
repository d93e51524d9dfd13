"""Fixtures of the korinet-admin tests: a private KORINET_HOME per test, identities
made once per session, agents on loopback ports, clients that pin them."""

from __future__ import annotations

from pathlib import Path

import pytest

from korinet.security import AuthorizedKeys, Identity


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "client-home"
    monkeypatch.setenv("KORINET_HOME", str(path))
    return path


@pytest.fixture(scope="session")
def server_identity() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="session")
def alice() -> Identity:
    """An admin."""
    return Identity.generate()


@pytest.fixture(scope="session")
def bob() -> Identity:
    """Authorized, but without the admin role."""
    return Identity.generate()


@pytest.fixture
def authorized(tmp_path: Path, alice: Identity, bob: Identity) -> AuthorizedKeys:
    keys = AuthorizedKeys(tmp_path / "agent-authorized_keys")
    keys.authorize(alice.fingerprint, "alice", ["admin"])
    keys.authorize(bob.fingerprint, "bob", ["users"])
    return keys
