"""korinet-admin exec on a fleet against pdsh and ClusterShell over OpenSSH, on the
same loopback "hosts", in one run.

    apt-get install openssh-server pdsh clustershell    # once
    python bench/admin_fleet_vs_pdsh.py [--hosts 200] [--runs 3] [--fanout 64] [--save]

Hosts are names ``h001``... For ssh (pdsh ``-R ssh`` and clush) one throwaway sshd on
a free loopback port serves them all (an ssh config maps every name to it; its
MaxStartups is raised so that a fan-out of 64 is not dropped); every command is a
full ssh login. For korinet-admin, the same number of agents run in a few processes
(``--per-process`` agents each, TLS 1.3, one key, the client authorized as admin),
each on a port of its own, listed in a hosts.toml with the key pinned; the client is
``korinet-admin exec @all --fanout N``.

Two workloads: ``true``, and ``cat`` of a 1 MB text file (76-character lines) per
host, output to /dev/null. For each tool and workload: wall time, client CPU (user +
system of the client and every process it started: ``RUSAGE_CHILDREN``) and the peak
total RSS of the client's process tree (sampled every 20 ms with psutil: pdsh and
clush run one ssh per host in flight). Runs alternate the tools (the order rotates
each run) so that drift of the shared machine hits all alike; medians and
min-max are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from admin_vs_ssh import RESULTS, Sshd, admin_script, wait_port


def sshd_fleet(tmp: Path, hosts: list[str]) -> tuple[Sshd, Path]:
    """One sshd, with room for many logins at once, and an ssh config naming it for every host."""
    sshd = Sshd(tmp)
    sshd.close()
    config = sshd.dir / "sshd_config"
    config.write_text(config.read_text() + "MaxStartups 1000\nMaxSessions 100\n")
    sshd.proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-f", str(config), "-E", str(sshd.dir / "sshd.log")]
    )

    wait_port(sshd.port)
    client = sshd.dir / "ssh_config"
    client.write_text(
        f"Host {' '.join(hosts)}\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
        f"  IdentityFile {sshd.dir / 'user_key'}\n  BatchMode yes\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
    )
    return sshd, client


# ---------------------------------------------------------------------- korinet agents


async def _pool(state: Path, count: int, home: Path) -> None:
    """Run ``count`` agents (one TLS key, ``home``'s authorized_keys); print their ports."""
    from korinet_admin.agent import Agent
    from korinet_admin.execclient import admin_plugins

    from korinet.runtime import Server
    from korinet.runtime.server import raise_open_file_limit
    from korinet.security import AuthorizedKeys, Identity, ServerTLS

    raise_open_file_limit()
    identity = Identity.load(home)
    authorized = AuthorizedKeys(home / "authorized_keys")
    servers, agents = [], []
    for i in range(count):
        agent = Agent(state / f"agent-{i}")
        server = Server(
            "127.0.0.1",
            0,
            tls=ServerTLS(identity, authorized=authorized),
            plugins=admin_plugins(),
            accept_plain=False,
            handler=agent.session,
            legacy=False,
        )
        agent.bind(server)
        await server.start()
        servers.append(server)
        agents.append(agent)
        print(server.port, flush=True)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    for server, agent in zip(servers, agents, strict=True):
        await server.close()
        await agent.close()


class KoriFleet:
    def __init__(self, tmp: Path, env: dict[str, str], hosts: list[str], per_process: int) -> None:
        self.script = admin_script()
        agent_home, self.home = tmp / "agent-home", tmp / "client-home"
        self.env = {**env, "KORINET_HOME": str(self.home)}
        agent_env = {**env, "KORINET_HOME": str(agent_home)}
        client_fp = subprocess.run(
            ["korinet", "id"], env=self.env, capture_output=True, text=True, check=True
        ).stdout.split()[0]
        agent_fp = subprocess.run(
            ["korinet", "id"], env=agent_env, capture_output=True, text=True, check=True
        ).stdout.split()[0]
        subprocess.run(
            ["korinet", "authorize", client_fp, "--name", "bench", "--role", "admin"],
            env=agent_env,
            capture_output=True,
            check=True,
        )
        self.pools: list[subprocess.Popen[str]] = []
        ports: list[int] = []
        for start in range(0, len(hosts), per_process):
            count = min(per_process, len(hosts) - start)
            proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--pool",
                    str(tmp / f"state-{start}"),
                    str(count),
                    str(agent_home),
                ],
                env=agent_env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            self.pools.append(proc)
            assert proc.stdout is not None
            while (line := proc.stdout.readline().strip()) != "ready":
                if not line:
                    raise RuntimeError("an agent pool ended before it was ready")
                ports.append(int(line))
        inventory = "".join(
            f'[hosts.{name}]\naddress = "127.0.0.1:{port}"\nkey = "{agent_fp}"\n'
            for name, port in zip(hosts, ports, strict=True)
        )
        (self.home / "hosts.toml").write_text(inventory)

    def command(self, fanout: int, *remote: str) -> list[str]:
        return [self.script, "exec", "@all", "--fanout", str(fanout), "--", *remote]

    def close(self) -> None:
        for proc in self.pools:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.pools:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---------------------------------------------------------------------- measuring


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall time, CPU of the whole client tree, peak total RSS of the tree (MB)."""
    import psutil  # type: ignore[import-untyped]

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            total = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in tree:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak = max(peak, total)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate(timeout=600)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:6])}... exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "rss": peak / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fanout", type=int, default=64)
    parser.add_argument("--per-process", type=int, default=50, help="korinet agents per process")
    parser.add_argument("--save", action="store_true", help=f"append the table to {RESULTS}/fleet-DATE.md")
    parser.add_argument("--pool", nargs=3, metavar=("STATE", "COUNT", "HOME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pool:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        asyncio.run(_pool(Path(args.pool[0]), int(args.pool[1]), Path(args.pool[2])))
        return
    for tool in ("pdsh", "clush", "sshd"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"no {tool}: apt-get install pdsh clustershell openssh-server")

    hosts = [f"h{i:03d}" for i in range(1, args.hosts + 1)]
    span = f"h[001-{args.hosts:03d}]"
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp / "pycache")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        text = tmp / "1mb.txt"
        raw = base64.encodebytes(os.urandom(750_000))  # 76-character lines
        text.write_bytes(raw[:1_000_000])
        sshd, ssh_config = sshd_fleet(tmp, hosts)
        kori = KoriFleet(tmp, env, hosts, args.per_process)
        ssh_env = {**env, "PDSH_SSH_ARGS": f"-F {ssh_config} -x %h", "PDSH_RCMD_TYPE": "ssh"}
        tools: dict[str, Any] = {
            "korinet-admin": lambda *cmd: (kori.command(args.fanout, *cmd), kori.env),
            "pdsh": lambda *cmd: (["pdsh", "-S", "-f", str(args.fanout), "-w", span, *cmd], ssh_env),
            "clush": lambda *cmd: (
                ["clush", "-S", "-f", str(args.fanout), "-w", span, "-o", f"-F {ssh_config}", *cmd],
                ssh_env,
            ),
        }
        work = {"true": ("true",), "1 MB": ("cat", str(text))}
        samples: dict[tuple[str, str], list[dict[str, float]]] = {}
        try:
            for make in tools.values():  # warm-up: bytecode, page cache, sshd
                measure(*make("true"))
            order = list(tools)
            for run in range(args.runs):
                rotated = order[run % len(order) :] + order[: run % len(order)]
                for label, cmd in work.items():
                    for name in rotated:
                        result = measure(*tools[name](*cmd))
                        samples.setdefault((name, label), []).append(result)
                        print(
                            f"run {run + 1} {label:5} {name:14} wall {result['wall']:6.2f}s  "
                            f"cpu {result['cpu']:6.2f}s  rss {result['rss']:7.1f} MB",
                            flush=True,
                        )
        finally:
            kori.close()
            sshd.close()

    def cell(name: str, label: str, key: str, fmt: str) -> str:
        values = [s[key] for s in samples[(name, label)]]
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    pdsh_version = subprocess.run(["pdsh", "-V"], capture_output=True, text=True).stdout.split("\n")[0]
    clush_version = subprocess.run(["clush", "--version"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"{args.hosts} loopback hosts, fan-out {args.fanout}, {args.runs} alternating runs, "
        "median (min-max); "
        f"{pdsh_version}, {clush_version}, {ssh_version}",
        "",
        "| workload | tool | wall s | client CPU s | peak client RSS MB |",
        "|---|---|---:|---:|---:|",
    ]
    for label in work:
        for name in tools:
            lines.append(
                f"| `{' '.join(work[label][:1])}` {label if label != 'true' else ''} | {name} | "
                f"{cell(name, label, 'wall', '.2f')} | {cell(name, label, 'cpu', '.2f')} | "
                f"{cell(name, label, 'rss', '.0f')} |"
            )
    report = "\n".join(lines)
    print(report)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"fleet-{time.strftime('%Y-%m-%d')}.md"
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        head = "" if path.exists() else "# korinet-admin on a fleet against pdsh and ClusterShell\n\n"
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        with open(path, "a", encoding="utf-8") as f:
            f.write(
                f"{head}## {stamp} (load average {load})\n\n`python bench/admin_fleet_vs_pdsh.py "
                f"--hosts {args.hosts} --runs {args.runs} --fanout {args.fanout}`\n\n{report}\n\n"
            )
        print(f"saved {path}")


if __name__ == "__main__":
    main()
