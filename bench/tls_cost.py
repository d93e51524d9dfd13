"""What TLS costs a server: memory per idle session and pipelined throughput, TLS 1.3
(mutual, authorized keys, as the apps run) beside plaintext.

    python bench/tls_cost.py [--sessions 5000] [--before DIR] [--rounds 3] [--figures pipelined]

The server runs in its own process, the clients in this one. Memory: the server's
RSS growth per idle, heartbeating session. Throughput: one client posting 4 KiB
messages, windowed, acked by the server's application (as bench/peer_korinet.py).

``--before DIR`` compares with another copy of korinet (a tree holding ``korinet/``,
e.g. ``git archive`` of the base commit): every figure is measured with both, in
alternation, ``--rounds`` times, each in fresh processes (``KORINET_TREE`` picks the
copy; the machine's load moves between rounds, so read the spread, not one run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchutil import ACK_EVERY, CHILD_MAX_S, DRAIN_S, LOOPBACK, WINDOW, Deadline, spawn_child

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("KORINET_TREE") or str(HERE.parent))

from korinet import Client, Server, SessionConfig  # noqa: E402
from korinet.security import AuthorizedKeys, ClientTLS, Identity, ServerTLS  # noqa: E402

HEARTBEAT = 5.0
# Sessions opened at once: on a loaded 2-core machine 100 concurrent TLS handshakes
# outlast the 60 s open timeout (a core-run failure on 2026-12-03); 2 cores gain nothing past ~20.
CONNECT_BATCH = 20


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, wanted)), hard))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _identities(directory: Path) -> None:
    """A server and a client identity, the client's key authorized."""
    server = Identity.generate().save(directory / "server")
    client = Identity.generate().save(directory / "client")
    AuthorizedKeys(directory / "authorized_keys").authorize(client.fingerprint, "bench")
    (directory / "server.fp").write_text(server.fingerprint)


def _client_tls(directory: Path | None) -> ClientTLS | None:
    if directory is None:
        return None
    fingerprint = (directory / "server.fp").read_text()
    return ClientTLS(Identity.load(directory / "client"), fingerprint=fingerprint)


# --------------------------------------------------------------------------- server


def server_main(conn: Connection, directory: str | None, sessions: int) -> None:
    _raise_fd_limit(sessions * 2 + 1024)

    async def consume(peer: Any) -> None:
        async for _ in peer:
            pass

    async def main() -> None:
        tls = None
        if directory is not None:
            path = Path(directory)
            authorized = AuthorizedKeys(path / "authorized_keys")
            tls = ServerTLS(Identity.load(path / "server"), authorized=authorized)
        server = Server(
            LOOPBACK,
            0,
            tls=tls,
            handler=consume,
            config=SessionConfig(heartbeat_interval=HEARTBEAT),
            max_sessions=sessions * 2 + 10,
            max_connections=sessions * 2 + 10,
            max_connections_per_address=sessions * 2 + 10,
            max_handshaking=sessions * 2 + 10,  # every client connects at once: none is dropped
            backlog=4096,
        )
        await server.start()
        conn.send(server.port)
        # Opening 5,000 TLS sessions on a loaded machine outlasts CHILD_MAX_S: the server
        # then closed and the clients got "connection refused". The parent ends it anyway.
        deadline = Deadline(CHILD_MAX_S + sessions * 0.15)
        while not deadline.expired():
            if conn.poll(0):
                try:
                    request = conn.recv()
                except EOFError:
                    break
                if request == "cpu":
                    conn.send(time.process_time())
                    continue
                if request != "rss":
                    break
                conn.send((_rss_kib(), len(server.hub.sessions)))
            await asyncio.sleep(0.05)
        await server.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- figures


async def _idle_kib(conn: Connection, port: int, count: int, tls: ClientTLS | None) -> float:
    config = SessionConfig(heartbeat_interval=HEARTBEAT)
    conn.send("rss")
    before, _ = conn.recv()
    clients: list[Client] = []
    while len(clients) < count:
        clients += await asyncio.gather(
            *(
                Client.connect(LOOPBACK, port, tls=tls, config=config, open_timeout=60)
                for _ in range(min(CONNECT_BATCH, count - len(clients)))
            )
        )
    await asyncio.sleep(HEARTBEAT * 1.5)  # every session heartbeats at least once
    conn.send("rss")
    after, sessions = conn.recv()
    assert sessions >= count, f"only {sessions} of {count} sessions open"
    await asyncio.gather(*(c.abort() for c in clients))
    return (after - before) / count


def _cpu(conn: Connection) -> float:
    conn.send("cpu")
    cpu: float = conn.recv()
    return cpu


async def _pipelined(
    conn: Connection, port: int, tls: ClientTLS | None, seconds: float, size: int
) -> tuple[float, float]:
    """(MB/s, CPU µs per message of the client and the server together)."""
    client = await Client.connect(LOOPBACK, port, tls=tls)
    payload = os.urandom(size)
    try:
        await client.send(payload)  # warm-up
        deadline = Deadline(seconds)
        done = last = 0
        cpu0 = time.process_time() + _cpu(conn)
        t0 = time.perf_counter()
        while not deadline.expired():
            if last - client.session.acked >= WINDOW:
                await client.wait_acked(last - WINDOW + ACK_EVERY, timeout=DRAIN_S)
            last = client.post(payload)
            done += 1
        await client.wait_acked(last, timeout=DRAIN_S)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() + _cpu(conn) - cpu0
        return done * size / elapsed / 1e6, cpu / done * 1e6
    finally:
        await client.close()


def measure(kind: str, tls_on: bool, sessions: int, seconds: float) -> dict[str, float]:
    """One figure, in this process (with the korinet that KORINET_TREE names)."""
    _raise_fd_limit(sessions * 2 + 1024)
    with tempfile.TemporaryDirectory(prefix="tls-cost-") as tmp:
        directory = Path(tmp) if tls_on else None
        if directory is not None:
            _identities(directory)
        tls = _client_tls(directory)
        with spawn_child(server_main, tmp if tls_on else None, sessions) as (conn, port):
            if kind == "idle_kib":
                return {"idle_kib": asyncio.run(_idle_kib(conn, port, sessions, tls))}
            mbps, cpu_us = asyncio.run(_pipelined(conn, port, tls, seconds, 4096))
            return {"pipelined": mbps, "cpu_us": cpu_us}


# --------------------------------------------------------------------------- driver


def _run_one(tree: str, kind: str, tls_on: bool, sessions: int, seconds: float) -> dict[str, float]:
    argv = [sys.executable, str(HERE / "tls_cost.py"), "--one", kind, "--sessions", str(sessions)]
    argv += ["--seconds", str(seconds)] + (["--tls"] if tls_on else [])
    env = dict(os.environ, KORINET_TREE=tree)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} tls={tls_on} with {tree} failed:\n{out.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=3.0, help="per pipelined run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="another korinet tree to compare with")
    parser.add_argument("--figures", default="idle_kib,pipelined", help="which: idle_kib, pipelined")
    parser.add_argument("--one", choices=["idle_kib", "pipelined"], help=argparse.SUPPRESS)
    parser.add_argument("--tls", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.tls, args.sessions, args.seconds)))
        return
    trees = {"after": str(HERE.parent)}
    if args.before:
        trees = {"before": str(Path(args.before).resolve()), **trees}
    rows = [
        ("idle_kib", False, f"server RSS per idle session, plaintext ({args.sessions:,}), KiB"),
        ("idle_kib", True, f"server RSS per idle session, TLS 1.3 ({args.sessions:,}), KiB"),
        ("pipelined", False, "pipelined acked 4 KiB, plaintext, MB/s"),
        ("pipelined", True, "pipelined acked 4 KiB, TLS 1.3, MB/s"),
        ("cpu_us", False, "CPU per 4 KiB message, client + server, plaintext, µs"),
        ("cpu_us", True, "CPU per 4 KiB message, client + server, TLS 1.3, µs"),
    ]
    wanted = args.figures.split(",") + (["cpu_us"] if "pipelined" in args.figures else [])
    rows = [row for row in rows if row[0] in wanted]
    results: dict[tuple[str, str, bool], list[float]] = {}
    for r in range(args.rounds):
        for kind, tls_on, _ in rows:
            if kind == "cpu_us":
                continue  # measured with "pipelined"
            for name, tree in trees.items():
                figures = _run_one(tree, kind, tls_on, args.sessions, args.seconds)
                for figure, value in figures.items():
                    results.setdefault((name, figure, tls_on), []).append(value)
                print(f"round {r + 1}: {name} tls={tls_on}: {figures}", file=sys.stderr, flush=True)
    print("| figure | " + " | ".join(trees) + " |")
    print("|---|" + "---|" * len(trees))
    for kind, tls_on, label in rows:
        cells = []
        for name in trees:
            values = results[(name, kind, tls_on)]
            cells.append(f"{statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\nmedian (each round), {args.rounds} rounds, alternating; sessions={args.sessions}")


if __name__ == "__main__":
    main()
