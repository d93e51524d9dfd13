"""korinet-admin against OpenSSH on loopback, in one run.

    apt-get install openssh-server     # once (the script only needs /usr/sbin/sshd)
    python bench/admin_vs_ssh.py [--rounds 7] [--mb 100] [--save]

Sets up its own sshd (throwaway host and user keys in a temporary directory, its own
port, ``sshd -f`` with its own config) and its own korinet-admin agent (its own
KORINET_HOME, the client's key authorized with the admin role), then measures, in
interleaved rounds so that the shared machine's drift hits both alike:

* the wall time of ``korinet-admin exec localhost -- true`` against ``ssh localhost true``;
* the wall time of ``cat FILE`` (FILE: ``--mb`` MB of random bytes) through each, to
  /dev/null, as MB/s;
* where the client's start-up goes (``python -X importtime``).

Both tools run as installed programs with their bytecode cached (pip compiles it at
install; this sandbox sets PYTHONDONTWRITEBYTECODE, so the script points
PYTHONPYCACHEPREFIX at its temporary directory and warms it up first). Medians are
reported; targets: trivial command <= 1.0x ssh's time, throughput >= 0.8x ssh's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {seconds}s")


def timed(cmd: Sequence[str], env: dict[str, str], stdout: int | None = subprocess.DEVNULL) -> float:
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, timeout=120
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    return elapsed


class Sshd:
    def __init__(self, tmp: Path) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd):
            sys.exit("no sshd: apt-get install openssh-server")
        self.dir = tmp / "ssh"
        self.dir.mkdir()
        for name in ("host_key", "user_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)], check=True
            )
        shutil.copy(self.dir / "user_key.pub", self.dir / "authorized_keys")
        os.chmod(self.dir / "authorized_keys", 0o600)
        self.port = free_port()
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir / 'host_key'}\n"
            f"PidFile {self.dir / 'sshd.pid'}\nAuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "PermitRootLogin yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory (Debian)
        self.proc = subprocess.Popen([sshd, "-D", "-f", str(config), "-E", str(self.dir / "sshd.log")])
        wait_port(self.port)

    def command(self, *remote: str) -> list[str]:
        return [
            "ssh", "-F", "/dev/null", "-i", str(self.dir / "user_key"), "-p", str(self.port),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}", "-o", "LogLevel=ERROR",
            "localhost", *remote,
        ]  # fmt: skip

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


class Agent:
    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.script = admin_script()
        self.port = free_port()
        agent_home, self.client_home = tmp / "agent-home", tmp / "client-home"
        self.client_env = {**env, "KORINET_HOME": str(self.client_home)}
        agent_env = {**env, "KORINET_HOME": str(agent_home)}
        fingerprint = subprocess.run(
            ["korinet", "id"], env=self.client_env, capture_output=True, text=True, check=True
        ).stdout.split()[0]
        subprocess.run(["korinet", "authorize", fingerprint, "--name", "bench", "--role", "admin"],
                       env=agent_env, capture_output=True, check=True)  # fmt: skip
        self.proc = subprocess.Popen(
            [self.script, "agent", f"127.0.0.1:{self.port}", "--state-dir", str(tmp / "agent-state")],
            env=agent_env,
            stdout=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def command(self, *remote: str) -> list[str]:
        return [self.script, "exec", f"localhost:{self.port}", "--", *remote]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


def admin_script() -> str:
    """The installed korinet-admin, not a pyenv shim (a shim adds a bash and pyenv run)."""
    beside = Path(sys.executable).parent / "korinet-admin"
    if beside.exists():
        return str(beside)
    found = shutil.which("korinet-admin")
    if not found:
        sys.exit("korinet-admin is not installed (pip install -e .)")
    return found


def import_costs(env: dict[str, str], runs: int = 5) -> list[tuple[str, float]]:
    """Where the client's start-up goes (ms, best of ``runs``): the bare interpreter
    (wall), then the cumulative import time of each top-level module the client loads
    (``python -X importtime``; a module imported by an earlier one counts there)."""
    wall = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        wall.append((time.perf_counter() - started) * 1000)
    code = (
        "import korinet, korinet.security, korinet_admin.cli, korinet_admin.execclient, korinet_admin.runner"
    )
    best: dict[str, float] = {}
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code], env=env, capture_output=True, text=True
        )
        for line in proc.stderr.splitlines():
            m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)  # top level: no indent
            if m and (m.group(2).startswith(("korinet", "site"))):
                ms = int(m.group(1)) / 1000
                best[m.group(2)] = min(ms, best.get(m.group(2), ms))
    rows = [("python -c pass (wall, includes site)", min(wall))]
    labels = {
        "site": "site (this environment's .pth files; inside the line above)",
        "korinet": "korinet (the core; its __init__ loads the blocking facade and TLS too)",
        "korinet.security": "korinet.security (cryptography)",
    }
    rows += [(labels.get(name, name), ms) for name, ms in best.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mb", type=int, default=100, help="size of the output of the throughput test")
    parser.add_argument("--save", action="store_true", help=f"append the table to {RESULTS}/admin-DATE.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="admin-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp / "pycache")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        big = tmp / "big.bin"
        with open(big, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1_000_000))
        sshd = Sshd(tmp)
        agent = Agent(tmp, env)
        try:
            for _ in range(2):  # warm-up: pins keys, fills bytecode caches and page cache
                timed(agent.command("true"), agent.client_env)
                timed(sshd.command("true"), env)
            timed(agent.command("cat", str(big)), agent.client_env)
            samples: dict[str, list[float]] = {k: [] for k in ("kor_true", "ssh_true", "kor_cat", "ssh_cat")}
            for _ in range(args.rounds):
                samples["kor_true"].append(timed(agent.command("true"), agent.client_env))
                samples["ssh_true"].append(timed(sshd.command("true"), env))
                samples["kor_cat"].append(timed(agent.command("cat", str(big)), agent.client_env))
                samples["ssh_cat"].append(timed(sshd.command("cat", str(big)), env))
            costs = import_costs(agent.client_env)
        finally:
            agent.close()
            sshd.close()

    med = {k: statistics.median(v) for k, v in samples.items()}
    spread = {k: (min(v), max(v)) for k, v in samples.items()}
    mbps = {k: args.mb / med[k] for k in ("kor_cat", "ssh_cat")}
    stream = {k: args.mb / max(1e-9, med[f"{k}_cat"] - med[f"{k}_true"]) for k in ("kor", "ssh")}
    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    lines = [
        f"korinet-admin vs {ssh_version}, loopback, {args.rounds} interleaved rounds, median (min-max)",
        "",
        "| figure | korinet-admin | ssh | ratio | target |",
        "|---|---:|---:|---:|---|",
        f"| `exec localhost -- true`, s | {med['kor_true']:.3f} ({spread['kor_true'][0]:.3f}-"
        f"{spread['kor_true'][1]:.3f}) | {med['ssh_true']:.3f} ({spread['ssh_true'][0]:.3f}-"
        f"{spread['ssh_true'][1]:.3f}) | {med['kor_true'] / med['ssh_true']:.2f}x the time | <= 1.0x |",
        f"| `cat` {args.mb} MB, end to end, MB/s | {mbps['kor_cat']:.0f} | {mbps['ssh_cat']:.0f} | "
        f"{mbps['kor_cat'] / mbps['ssh_cat']:.2f}x the throughput | >= 0.8x |",
        f"| `cat` {args.mb} MB, streaming only (minus `true`), MB/s | {stream['kor']:.0f} | "
        f"{stream['ssh']:.0f} | {stream['kor'] / stream['ssh']:.2f}x | |",
        "",
        "Where the client's start-up goes (ms, best of 5, bytecode cached; imports: python -X importtime):",
        "",
        "| step | ms |",
        "|---|---:|",
        *(f"| {name} | {ms:.0f} |" for name, ms in costs),
    ]
    report = "\n".join(lines)
    print(report)
    if args.save:  # appends: several runs of one day side by side show the machine's drift
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"admin-{time.strftime('%Y-%m-%d')}.md"
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        head = "" if path.exists() else "# korinet-admin against OpenSSH\n\n"
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{head}## {stamp} (load average {load})\n\n`python bench/admin_vs_ssh.py "
                    f"--rounds {args.rounds} --mb {args.mb}`\n\n{report}\n\n")  # fmt: skip
        print(f"saved {path}")


if __name__ == "__main__":
    main()
