"""Two network namespaces joined by a veth pair, made and removed by the test itself.

The server side is 10.213.0.1 in ``<prefix>-s``, the client side 10.213.0.2 in
``<prefix>-c``; no address outside these namespaces is ever used. Faults are the
kernel's own: iptables drops and resets, a tbf bandwidth limit, the link down.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence

SERVER_IP = "10.213.0.1"
CLIENT_IP = "10.213.0.2"


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: iproute2, iptables)"
    probe = f"kn-probe-{secrets.token_hex(3)}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


class NetnsPair:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.server_ns = f"kn-{tag}-s"
        self.client_ns = f"kn-{tag}-c"
        self.server_dev = f"kv{tag}s"
        self.client_dev = f"kv{tag}c"

    def __enter__(self) -> NetnsPair:
        run("ip", "netns", "add", self.server_ns)
        run("ip", "netns", "add", self.client_ns)
        run("ip", "link", "add", self.server_dev, "type", "veth", "peer", "name", self.client_dev)
        for dev, ns, ip in (
            (self.server_dev, self.server_ns, SERVER_IP),
            (self.client_dev, self.client_ns, CLIENT_IP),
        ):
            run("ip", "link", "set", dev, "netns", ns)
            self.exec(ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            self.exec(ns, "ip", "link", "set", dev, "up")
            self.exec(ns, "ip", "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.server_ns, self.client_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def exec(self, ns: str, *argv: str) -> None:
        run("ip", "netns", "exec", ns, *argv)

    def prefix(self, ns: str) -> Sequence[str]:
        """argv prefix that runs a command inside ``ns``."""
        return ("ip", "netns", "exec", ns)

    # ------------------------------------------------------------------ faults

    def iptables(self, ns: str, *rule: str) -> None:
        self.exec(ns, "iptables", *rule)

    def drop_all(self, on: bool) -> None:
        """A black hole on the client side: every packet in and out vanishes."""
        action = "-A" if on else "-D"
        for chain in ("INPUT", "OUTPUT"):
            self.iptables(self.client_ns, action, chain, "-j", "DROP")

    def random_loss(self, probability: float) -> None:
        for ns in (self.server_ns, self.client_ns):
            self.iptables(ns, "-A", "INPUT", "-m", "statistic", "--mode", "random",
                          "--probability", str(probability), "-j", "DROP")  # fmt: skip

    def reset_all(self, on: bool) -> None:
        """Answer every TCP segment the client receives with a reset."""
        action = "-A" if on else "-D"
        self.iptables(
            self.client_ns, action, "INPUT", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"
        )

    def rate_limit(self, rate: str) -> None:
        for ns, dev in ((self.server_ns, self.server_dev), (self.client_ns, self.client_dev)):
            self.exec(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                      "burst", "32kbit", "latency", "400ms")  # fmt: skip

    def link(self, up: bool) -> None:
        self.exec(self.client_ns, "ip", "link", "set", self.client_dev, "up" if up else "down")
