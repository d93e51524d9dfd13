"""An agent no client can dial, reached only because it dials home.

The agent runs in one network namespace whose firewall drops every inbound SYN; the
relay and the client run in the other. The commands are the ones a user types:
``korinet-admin agent --connect``, ``korinet-admin relay``, and exec, jobs, attach,
put and get naming the agent by its inventory entry ``RELAY:PORT/NAME``.
"""

from __future__ import annotations

import json
import queue
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_helpers import CLI, cli_env
from testutil import TIMEOUT_FACTOR
from testutil.netns import CLIENT_IP, SERVER_IP, NetnsPair, unavailable

from korinet.security import AuthorizedKeys, Identity

_why = unavailable()
pytestmark = [
    pytest.mark.skipif(_why is not None, reason=f"no network namespaces here: {_why}"),
    pytest.mark.timeout(180 * TIMEOUT_FACTOR),
]
WAIT = 30 * TIMEOUT_FACTOR


class Daemon:
    """A long-running korinet-admin command; :meth:`expect` waits for a line of it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def expect(self, pattern: str) -> re.Match[str]:
        while True:
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}; got:\n{''.join(self.seen)}") from None
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10 * TIMEOUT_FACTOR)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def net() -> Iterator[NetnsPair]:
    with NetnsPair() as pair:
        yield pair


def test_an_agent_with_no_inbound_route_is_reached_through_the_relay(
    net: NetnsPair, tmp_path: Path, alice: Identity
) -> None:
    agent_home, relay_home, client_home = (tmp_path / n for n in ("agent", "relay", "client"))
    agent_key = Identity.generate().save(agent_home)
    AuthorizedKeys(agent_home / "authorized_keys").authorize(alice.fingerprint, "alice", ["admin"])
    AuthorizedKeys(relay_home / "relay_agents").authorize(agent_key.fingerprint, "natted")
    alice.save(client_home)
    # Nothing reaches the agent's namespace unless it asked for it.
    net.iptables(net.server_ns, "-A", "INPUT", "-p", "tcp", "--syn", "-j", "DROP")
    in_client = list(net.prefix(net.client_ns))
    in_agent = list(net.prefix(net.server_ns))
    daemons: list[Daemon] = []
    try:
        relay = Daemon([*in_client, *CLI, "relay", f"{CLIENT_IP}:0"], cli_env(relay_home))
        daemons.append(relay)
        relay_port = int(relay.expect(r"relay on [\d.]+:(\d+)").group(1))
        agent = Daemon(
            [*in_agent, *CLI, "agent", f"{SERVER_IP}:0", "--connect", f"{CLIENT_IP}:{relay_port}",
             "--name", "natted", "--state-dir", str(tmp_path / "state")],
            cli_env(agent_home),
        )  # fmt: skip
        daemons.append(agent)
        agent_port = int(agent.expect(r"agent on [\d.]+:(\d+)").group(1))
        agent.expect(r"parked at the relay as 'natted'")

        # The agent listens, yet no client can dial it.
        probe = (
            "import socket,sys\n"
            f"try: socket.create_connection(({SERVER_IP!r}, {agent_port}), timeout=2)\n"
            "except OSError: sys.exit(3)\n"
        )
        assert subprocess.run([*in_client, "python3", "-c", probe], timeout=WAIT).returncode == 3

        (client_home / "hosts.toml").write_text(
            f'[hosts.natted]\naddress = "{CLIENT_IP}:{relay_port}/natted"\nkey = "{agent_key.fingerprint}"\n'
        )
        env = cli_env(client_home)

        def admin(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [*in_client, *CLI, *argv], env=env, input=stdin, capture_output=True, timeout=WAIT
            )

        done = admin(
            "exec", "natted", "--", "sh", "-c", "cat; echo $((6*7)); echo err >&2; exit 5", stdin=b"in\n"
        )
        assert (done.returncode, done.stdout, done.stderr) == (5, b"in\n42\n", b"err\n"), done
        result = admin("exec", "natted", "--json", "--job", "ab" * 16, "--", "echo", "hi")
        (line,) = result.stdout.decode().splitlines()
        record = json.loads(line)
        assert (record["host"], record["state"], record["exit_code"]) == ("natted", "done", 0), record
        assert record["address"] == f"{CLIENT_IP}:{relay_port}/natted"
        jobs = admin("jobs", "natted")
        assert jobs.returncode == 0 and "ab" * 16 in jobs.stdout.decode(), jobs
        again = admin("attach", "natted", "ab" * 16, "--from", "0,0")
        assert again.returncode == 0, again
        source = tmp_path / "payload"
        source.write_bytes(bytes(range(256)) * 2000)
        put = admin("put", "natted", str(source), str(tmp_path / "remote-copy"))
        assert put.returncode == 0, put
        get = admin("get", "natted", str(tmp_path / "remote-copy"), str(tmp_path / "back"))
        assert get.returncode == 0, get
        assert (tmp_path / "back").read_bytes() == source.read_bytes()
        # Every request was authorized by the agent itself, for alice's key.
        audit = [json.loads(x) for x in (tmp_path / "state" / "audit.log").read_text().splitlines()]
        execs = [e for e in audit if e["event"] == "exec" and e.get("decision") == "allowed"]
        assert len(execs) == 2 and {e["who"] for e in execs} == {"alice"}
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


def test_probe_helper_fails_on_an_open_port() -> None:
    """The reachability probe above must be able to fail: it exits 0 on a port that answers."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        probe = (
            "import socket,sys\n"
            f"try: socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "except OSError: sys.exit(3)\n"
        )
        assert subprocess.run(["python3", "-c", probe], timeout=WAIT).returncode == 0
