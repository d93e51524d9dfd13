#!/usr/bin/env python3
"""Per-message cost of KoriNet's acked path (stop-and-wait): counts, not clocks.

Wall-clock rates swing with the machine's load; these figures do not. For N
stop-and-wait messages (``await client.send(payload)``, the server's application
taking each with ``async for``) it prints, per message:

* Python calls (cProfile's total ncalls) and the busiest functions;
* event-loop iterations (``_run_once`` calls), scheduled callbacks (``call_soon``),
  timers armed (``call_at``), futures and tasks created;
* socket sends and receives (the transport's ``sock.send`` / ``recv_into`` calls,
  counted by wrapping the transport's socket);
* memory blocks still held after the run (tracemalloc, a leak check).

    python bench/acked_profile.py                     # client and server on one loop
    python bench/acked_profile.py --procs 2           # server in a child; both sides' counts
    python bench/acked_profile.py --plain             # only the run (for valgrind/strace)
    python bench/acked_profile.py --callgrind -n 5000 # instructions per message (valgrind)
    python bench/acked_profile.py --what request      # ``await client.request(p, ECHO)`` instead
    python bench/acked_profile.py --what echo         # ``send()`` then ``recv()`` of the server's
                                                      # echo (``post(msg)``), as bench/core.py's async_echo
    python bench/acked_profile.py --what pipelined    # ``post()`` in a window of 1,024, as the
                                                      # pipelined figure of bench/peer_korinet.py
    python bench/acked_profile.py --what raw-echo --procs 2 --callgrind
                                                      # the raw asyncio echo (bench/peer_asyncio.py)
    python bench/acked_profile.py --what raw-pipelined --procs 2 --callgrind
                                                      # the raw asyncio pipelined baseline, as
                                                      # bench/core.py's raw_pipelined figures
    python bench/acked_profile.py --what blocking --procs 2 --callgrind
                                                      # client().send() against server(conn)
    python bench/acked_profile.py --what blocking-echo --procs 2 --callgrind
                                                      # client() send()+recv() against server(conn)
                                                      # recv()+send(), as bench/core.py's blocking_rtt

``--callgrind`` runs the plain script under ``valgrind --tool=callgrind`` twice, with
N and with 0 measured messages (start-up, connect and warm-up cancel out), every
process traced, and prints (instructions(N) - instructions(0)) / N in total and per
process. Slow: about a minute per 5,000 messages.

Plugins load as usual; compare with KORINET_DISABLE_PLUGINS=metrics,zstd,notebook,nats.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing as mp
import os
import pstats
import re
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's korinet

import peer_asyncio
from benchutil import ACK_EVERY, WINDOW

import korinet
import korinet.builtin
from korinet.builtin import ECHO

LOOPBACK = "127.0.0.1"
WARMUP = 200
TOP = int(os.environ.get("ACKED_PROFILE_TOP", "12"))


class Counts:
    """Loop-level counters, installed on one running loop."""

    def __init__(self) -> None:
        self.c: Counter[str] = Counter()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        c = self.c
        run_once = loop._run_once  # type: ignore[attr-defined]
        call_soon, call_at = loop.call_soon, loop.call_at
        create_future, create_task = loop.create_future, loop.create_task

        def counting_run_once() -> None:
            c["loop iterations"] += 1
            run_once()

        def counting_call_soon(*a: Any, **k: Any) -> Any:
            c["call_soon"] += 1
            return call_soon(*a, **k)

        def counting_call_at(*a: Any, **k: Any) -> Any:
            c["call_at (timers armed)"] += 1
            return call_at(*a, **k)

        def counting_create_future() -> Any:
            c["futures created"] += 1
            return create_future()

        def counting_create_task(*a: Any, **k: Any) -> Any:
            c["tasks created"] += 1
            return create_task(*a, **k)

        loop._run_once = counting_run_once  # type: ignore[attr-defined]
        loop.call_soon = counting_call_soon  # type: ignore[method-assign]
        loop.call_at = counting_call_at  # type: ignore[method-assign]
        loop.create_future = counting_create_future  # type: ignore[method-assign]
        loop.create_task = counting_create_task  # type: ignore[method-assign]

    def wrap_socket(self, transport: asyncio.BaseTransport) -> None:
        """Count the transport's send/recv calls: swap its socket for a counting proxy."""
        sock = transport._sock  # type: ignore[attr-defined]
        transport._sock = _CountingSocket(sock, self.c)  # type: ignore[attr-defined]

    def reset(self) -> None:
        self.c.clear()


class _CountingSocket:
    def __init__(self, sock: socket.socket, c: Counter[str]) -> None:
        self._s = sock
        self._c = c

    def send(self, data: Any) -> int:
        self._c["socket send"] += 1
        return self._s.send(data)

    def sendmsg(self, *a: Any) -> int:
        self._c["socket send"] += 1
        return self._s.sendmsg(*a)

    def recv(self, n: int) -> bytes:
        self._c["socket recv"] += 1
        return self._s.recv(n)

    def recv_into(self, buf: Any, n: int = 0) -> int:
        self._c["socket recv"] += 1
        return self._s.recv_into(buf, n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s, name)


# --------------------------------------------------------------------------- the run


async def _consume(peer: korinet.Peer) -> None:
    async for data in peer:
        if WHAT == "echo":
            peer.post(data)


WHAT = os.environ.get("ACKED_PROFILE_WHAT", "send")  # set by --what; children inherit it


async def _sends(client: korinet.Client, n: int, payload: bytes) -> None:
    if WHAT == "request":  # as bench/peer_korinet.py's request/response figure does it
        for _ in range(n):
            await client.request(payload, ECHO, timeout=10.0)
        return
    if WHAT == "echo":  # as bench/peer_korinet.py's echo_send_recv (async_echo)
        for _ in range(n):
            await client.send(payload, timeout=10.0)
            await client.recv(timeout=10.0)
        return
    if WHAT == "pipelined":  # as bench/peer_korinet.py's pipelined figure: post() in a window
        last = client.session.acked  # the warm-up sends were awaited: all acked
        for _ in range(n):
            if last - client.session.acked >= WINDOW:
                await client.wait_acked(last - WINDOW + ACK_EVERY, timeout=10.0)
            last = client.post(payload)
        await client.wait_acked(last, timeout=10.0)
        return
    for _ in range(n):
        await client.send(payload)


def _server_transports(server: korinet.Server) -> list[asyncio.BaseTransport]:
    out = []
    for peer in server.hub.sessions.values():
        if peer.conn is not None and peer.conn.transport is not None:
            out.append(peer.conn.transport)
    return out


class Profiler:
    """cProfile + counters + tracemalloc over one measured stretch."""

    def __init__(self, counts: Counts, with_profile: bool) -> None:
        self.counts = counts
        self.prof = cProfile.Profile() if with_profile else None

    def start(self) -> None:
        self.counts.reset()
        tracemalloc.start()
        self.mem0 = tracemalloc.take_snapshot()
        if self.prof is not None:
            self.prof.enable()

    def stop(self, n: int) -> dict[str, Any]:
        if self.prof is not None:
            self.prof.disable()
        mem1 = tracemalloc.take_snapshot()
        tracemalloc.stop()
        blocks = sum(s.count_diff for s in mem1.compare_to(self.mem0, "filename"))
        figures: dict[str, float] = {k: v / n for k, v in sorted(self.counts.c.items())}
        figures["memory blocks held (tracemalloc)"] = blocks / n
        top: list[tuple[float, str]] = []
        by_file: Counter[str] = Counter()  # calls per message, by the file defining the function
        if self.prof is not None:
            stats = pstats.Stats(self.prof)
            total = 0
            rows = []
            for (fname, line, func), (_cc, nc, _tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
                if fname == __file__ or func == "<method 'disable' of '_lsprof.Profiler' objects>":
                    continue  # this script's counting wrappers
                total += nc
                rows.append((nc / n, f"{Path(fname).name}:{line}({func})"))
                by_file[Path(fname).name if fname != "~" else "(C functions)"] += nc / n
            figures["python calls (cProfile)"] = total / n
            top = sorted(rows, reverse=True)[:TOP]
        return {"figures": figures, "top": top, "files": by_file.most_common(TOP)}


async def _inproc(n: int, size: int, with_profile: bool, plain: bool) -> dict[str, Any] | None:
    loop = asyncio.get_running_loop()
    counts = Counts()
    server = await korinet.Server(LOOPBACK, 0, handler=_consume).start()
    client = await korinet.Client.connect(LOOPBACK, server.port)
    payload = os.urandom(size)
    try:
        await _sends(client, WARMUP, payload)
        if plain:
            await _sends(client, n, payload)
            return None
        counts.install(loop)
        assert client.conn is not None and client.conn.transport is not None
        counts.wrap_socket(client.conn.transport)
        for t in _server_transports(server):
            counts.wrap_socket(t)
        prof = Profiler(counts, with_profile)
        prof.start()
        await _sends(client, n, payload)
        return prof.stop(n)
    finally:
        await client.close()
        await server.close()


# two processes: the server reports its own counts over a pipe


async def _serve(conn: Connection, n: int, with_profile: bool, plain: bool) -> None:
    loop = asyncio.get_running_loop()
    counts = Counts()
    prof = Profiler(counts, with_profile)
    received = 0
    started = asyncio.Event()
    done = asyncio.Event()

    async def consume(peer: korinet.Peer) -> None:
        nonlocal received
        async for data in peer:
            received += 1
            if received == WARMUP + 1:
                # the first measured message is in: count from here (the client's
                # start lines up with ours to within one message)
                if not plain:
                    counts.install(loop)
                    assert peer.conn is not None and peer.conn.transport is not None
                    counts.wrap_socket(peer.conn.transport)
                    prof.start()
                started.set()
            if WHAT == "echo":  # after the counting starts: the echo is part of the cost
                peer.post(data)
            if received == WARMUP + n:
                done.set()

    if WHAT == "request":
        # requests go to the ECHO handler, not the inbox: count them there
        echo = korinet.builtin._echo

        def counting_echo(peer: korinet.Peer, msg: korinet.Message) -> Any:
            nonlocal received
            received += 1
            if received == WARMUP + 1 and not plain:
                counts.install(loop)
                assert peer.conn is not None and peer.conn.transport is not None
                counts.wrap_socket(peer.conn.transport)
                prof.start()
            if received == WARMUP + n:
                done.set()
            return echo(peer, msg)

        korinet.builtin._echo = counting_echo  # read when the server registers its types
    server = await korinet.Server(LOOPBACK, 0, handler=consume).start()
    conn.send(server.port)
    await asyncio.wait_for(done.wait(), 600)
    result = None if plain else prof.stop(n - 1)
    conn.send(result)
    for _ in range(600):  # the client closes its session first; then the parent says stop
        if conn.poll(0):
            break
        await asyncio.sleep(0.05)
    await server.close()


def _server_main(conn: Connection, n: int, with_profile: bool, plain: bool) -> None:
    asyncio.run(_serve(conn, n, with_profile, plain))


async def _client(port: int, n: int, size: int, with_profile: bool, plain: bool) -> dict[str, Any] | None:
    loop = asyncio.get_running_loop()
    counts = Counts()
    client = await korinet.Client.connect(LOOPBACK, port)
    payload = os.urandom(size)
    try:
        await _sends(client, WARMUP, payload)
        if plain:
            await _sends(client, n, payload)
            return None
        counts.install(loop)
        assert client.conn is not None and client.conn.transport is not None
        counts.wrap_socket(client.conn.transport)
        prof = Profiler(counts, with_profile)
        prof.start()
        await _sends(client, n, payload)
        return prof.stop(n)
    finally:
        await client.close()


def _two_procs(n: int, size: int, with_profile: bool, plain: bool) -> tuple[Any, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    raw = WHAT in ("raw-echo", "raw-pipelined")
    blocking = WHAT in ("blocking", "blocking-echo")
    if (raw or blocking) and not plain:
        raise SystemExit(f"--what {WHAT} runs only with --plain or --callgrind, with --procs 2")
    if raw:
        target, args = _raw_server_main, (child,)
    elif blocking:
        target, args = _blocking_server_main, (child, n)
    else:
        target, args = _server_main, (child, n, with_profile, plain)
    proc = ctx.Process(target=target, args=args, daemon=True)
    proc.start()
    try:
        if not parent.poll(900):  # slow under valgrind
            raise RuntimeError("the server did not start")
        port = parent.recv()
        if raw:
            asyncio.run(_raw_client(port, n, size))
            client = None
        elif blocking:
            _blocking_client(port, n, size)
            client = None
        else:
            client = asyncio.run(_client(port, n, size, with_profile, plain))
        if not parent.poll(900):  # slow under valgrind
            raise RuntimeError("the server did not report")
        server = parent.recv()
        parent.send("stop")
        return client, server
    finally:
        # Under valgrind a child's exit takes a while, and a killed child writes no
        # callgrind output (its count would silently go missing): wait generously.
        proc.join(300)
        if proc.is_alive():
            proc.kill()


# the raw asyncio echo (bench/peer_asyncio.py), for comparison: plain runs only


def _raw_server_main(conn: Connection) -> None:
    mode = "ack" if WHAT == "raw-pipelined" else "echo"
    asyncio.run(peer_asyncio._serve(conn, mode))  # returns once the client hangs up
    conn.send(None)


async def _raw_client(port: int, n: int, size: int) -> None:
    if WHAT == "raw-pipelined":
        await peer_asyncio._pipelined(port, WARMUP + n, size, 600)  # one connection
        return
    transport, proto = await peer_asyncio._connect(port, "echo")
    payload = os.urandom(size)
    try:
        for i in range(WARMUP + n):
            transport.write(peer_asyncio.encode(i, payload))
            await proto.until(i + 1, 600)
    finally:
        transport.close()


# the blocking API, client() against server(conn): plain runs only


def _blocking_server_main(conn: Connection, n: int) -> None:
    with socket.create_server((LOOPBACK, 0)) as listener:
        conn.send(listener.getsockname()[1])
        accepted, _ = listener.accept()
    peer = korinet.server(accepted)
    echo = WHAT == "blocking-echo"
    for _ in range(WARMUP + n):
        msg = peer.recv()
        if echo:
            peer.send(msg)
    conn.send(None)
    conn.recv()  # the client has closed
    peer.close()


def _blocking_client(port: int, n: int, size: int) -> None:
    cli = korinet.client(LOOPBACK, port)
    payload = os.urandom(size)
    echo = WHAT == "blocking-echo"
    try:
        for _ in range(WARMUP + n):
            cli.send(payload)
            if echo:
                cli.recv()
    finally:
        cli.close()


# --------------------------------------------------------------------------- output


def _print(title: str, result: dict[str, Any]) -> None:
    print(f"\n## {title} (per message)")
    for key, value in result["figures"].items():
        print(f"  {key:36s} {value:8.2f}")
    if result["top"]:
        print("  busiest functions (calls per message):")
        for per, name in result["top"]:
            print(f"    {per:6.2f}  {name}")
        print("  calls per message by file:")
        for name, per in result["files"]:
            print(f"    {per:6.2f}  {name}")


def _instructions(n: int, procs: int, size: int) -> dict[str, int]:
    """Instructions executed by each process of a plain run, by role."""
    keep = os.environ.get("ACKED_PROFILE_KEEP")  # a directory: keep the callgrind files there
    with tempfile.TemporaryDirectory() as scratch:
        tmp = f"{keep}/n{n}" if keep else scratch
        os.makedirs(tmp, exist_ok=True)
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--trace-children=yes",
            f"--callgrind-out-file={tmp}/cg.%p",
            sys.executable,
            __file__,
            "--plain",
            "-n",
            str(n),
            "--procs",
            str(procs),
            "--size",
            str(size),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"valgrind failed: {proc.stderr[-2000:]}")
        totals: dict[str, int] = {}
        for path in Path(tmp).iterdir():
            text = path.read_text(errors="replace")
            found = re.search(r"^(?:totals|summary): (\d+)", text, re.M)
            command = re.search(r"^cmd: (.*)$", text, re.M)
            if not found or not command:
                continue
            if "resource_tracker" in command.group(1):
                continue  # multiprocessing's helper, idle
            parent = "client" if procs == 2 else "both sides"
            role = "server" if "spawn_main" in command.group(1) else parent
            totals[role] = totals.get(role, 0) + int(found.group(1))
        return totals


def callgrind(n: int, procs: int, size: int) -> None:
    base = _instructions(0, procs, size)
    full = _instructions(n, procs, size)
    if base.keys() != full.keys():
        raise RuntimeError(f"a process left no callgrind output: {sorted(base)} vs {sorted(full)}")
    print(f"# callgrind, {WHAT}: {n} x {size} B, procs={procs}")
    print(f"# KORINET_DISABLE_PLUGINS={os.environ.get('KORINET_DISABLE_PLUGINS', '')!r}")
    total = 0.0
    for role in sorted(full):
        per = (full[role] - base.get(role, 0)) / n
        total += per
        print(f"  instructions per message, {role:12s} {per:12,.0f}")
    print(f"  instructions per message, {'total':12s} {total:12,.0f}")


def main() -> None:
    global WHAT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=2000, help="measured messages (default 2000)")
    ap.add_argument("--size", type=int, default=64, help="payload bytes (default 64)")
    ap.add_argument("--procs", type=int, choices=(1, 2), default=1, help="1: one loop; 2: server in a child")
    ap.add_argument("--plain", action="store_true", help="no counting: just the run (valgrind, strace)")
    ap.add_argument("--no-profile", action="store_true", help="counters only, no cProfile")
    ap.add_argument("--callgrind", action="store_true", help="instructions per message under valgrind")
    ap.add_argument(
        "--what",
        choices=(
            "send",
            "request",
            "echo",
            "pipelined",
            "raw-echo",
            "raw-pipelined",
            "blocking",
            "blocking-echo",
        ),
        default=WHAT,
        help=(
            "send: await send() (default); request: await request(p, ECHO); "
            "echo: send() then recv() of the server's post() back; "
            "pipelined: post() with a window, as the pipelined figure; raw-echo: peer_asyncio's echo; "
            "raw-pipelined: peer_asyncio's pipelined baseline; "
            "blocking: client().send() against server(conn); "
            "blocking-echo: client() send()+recv() against server(conn) recv()+send()"
        ),
    )
    args = ap.parse_args()
    os.environ["ACKED_PROFILE_WHAT"] = args.what  # for the children (spawned, or under valgrind)
    WHAT = args.what
    if args.callgrind:
        callgrind(args.n, args.procs, args.size)
        return
    with_profile = not args.no_profile
    disabled = os.environ.get("KORINET_DISABLE_PLUGINS", "")
    t0 = time.perf_counter()
    if args.procs == 1:
        result = asyncio.run(_inproc(args.n, args.size, with_profile, args.plain))
        if result is not None:
            print(f"# {WHAT}, {args.n} x {args.size} B, client and server on one loop")
            print(f"# KORINET_DISABLE_PLUGINS={disabled!r}")
            _print("both sides", result)
    else:
        client, server = _two_procs(args.n, args.size, with_profile, args.plain)
        if client is not None:
            print(f"# {WHAT}, {args.n} x {args.size} B, server in a child process")
            print(f"# KORINET_DISABLE_PLUGINS={disabled!r}")
            _print("client", client)
            _print("server", server)
    print(f"# {time.perf_counter() - t0:.1f}s wall (noisy; not a figure of merit)", file=sys.stderr)


if __name__ == "__main__":
    main()
