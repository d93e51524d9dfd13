"""Helpers of the korinet-admin tests: agents on loopback ports, clients that pin
them, the CLI run as a user runs it. (A module of its own, not conftest: several
test folders have a conftest, and only one of them can be "conftest" at a time.)"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from korinet_admin.agent import Agent
from korinet_admin.audit import AuditLog
from korinet_admin.execclient import AdminConnection, Target, admin_plugins
from korinet_admin.policy import DEFAULT_POLICY, Policy

from korinet import Server
from korinet.security import AuthorizedKeys, ClientTLS, Identity, KnownHosts, ServerTLS

#: The korinet-admin console script, run the way a user runs it.
CLI = [sys.executable, "-c", "import sys; from korinet_admin.cli import main; sys.exit(main())"]


@dataclass
class RunningAgent:
    agent: Agent
    server: Server
    audit_path: Path

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> Target:
        return Target("127.0.0.1", self.port)

    def audit(self) -> list[dict[str, Any]]:
        return AuditLog.read(self.audit_path)


_agent_numbers = itertools.count()


@contextlib.asynccontextmanager
async def running_agent(
    base: Path,
    identity: Identity | None,
    authorized: AuthorizedKeys | None,
    *,
    policy: Policy = DEFAULT_POLICY,
    session_ttl: float = 60.0,
    job_env: dict[str, str] | None = None,
    **agent_kwargs: Any,
) -> AsyncIterator[RunningAgent]:
    """An agent on a free loopback port: TLS with ``authorized`` keys, or plaintext
    (every client anonymous admin) when ``identity`` is None. ``job_env``: variables its
    jobs see (so that agents of one process can play different hosts)."""
    state = base / f"agent-{next(_agent_numbers)}"
    audit_path = state / "audit.log"
    with job_environment(job_env or {}):  # the agent starts its job launcher here
        agent = Agent(
            state, policy=policy, audit=AuditLog(audit_path), insecure=identity is None, **agent_kwargs
        )
    tls = ServerTLS(identity, authorized=authorized) if identity is not None else None
    server = Server(
        "127.0.0.1",
        0,
        tls=tls,
        plugins=admin_plugins(),
        accept_plain=False,
        session_ttl=session_ttl,
        handler=agent.session,
        legacy=False,
    )
    agent.bind(server)
    await server.start()
    try:
        yield RunningAgent(agent, server, audit_path)
    finally:
        await server.close()
        await agent.close()


@contextlib.contextmanager
def job_environment(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` while an Agent is made: its job launcher (started then) and so every
    job it starts inherit it."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def client_tls(identity: Identity | None, base: Path) -> ClientTLS:
    return ClientTLS(identity, known_hosts=KnownHosts(base / "client-known_hosts"))


async def connect(target: Target, identity: Identity | None, base: Path, **kwargs: Any) -> AdminConnection:
    return await AdminConnection.open(target, tls=client_tls(identity, base), open_timeout=10, **kwargs)


class Collector:
    """A sink that keeps what each stream received."""

    def __init__(self) -> None:
        self.streams: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.calls = 0

    def __call__(self, stream: int, data: bytes) -> None:
        self.streams[stream] += data
        self.calls += 1

    @property
    def out(self) -> bytes:
        return bytes(self.streams[1])

    @property
    def err(self) -> bytes:
        return bytes(self.streams[2])


def cli_env(home: Path) -> dict[str, str]:
    """The environment of a korinet-admin subprocess using ``home`` as KORINET_HOME.

    Bytecode is cached in a private directory even where PYTHONDONTWRITEBYTECODE is
    set: each subprocess would otherwise compile korinet from source again.
    """
    env = {**os.environ, "KORINET_HOME": str(home)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), f"korinet-admin-tests-pyc-{os.getuid()}")
    return env


def install_client_identity(home: Path, identity: Identity) -> None:
    identity.save(home, overwrite=True)
