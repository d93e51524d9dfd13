"""Runs INSIDE bench/.venv-original with `python -I`, against the original korinet
0.0.1a1.dev1 from PyPI (its module name clashes with ours, hence the separate venv).

Its real API (the README's `from korinet import server` is wrong: that's a module):
  korinet.client.client(address, port, timeout)  connects itself, with retries
      .send(dict) -> True    sends, then blocks for the peer's {"statusP": True}
      .recv() -> dict        receives, then sends {"statusP": True}
  korinet.server.server(sock)  wraps an already-accepted socket; same send/recv.
Every message is a 4-byte BE length + CBOR({"data": dict, "id": hex}); no TCP_NODELAY.

  serve  --mode ack|reqrep --max-seconds S      prints {"port": P}, serves one client
  client --port P --mode ack|reqrep --n N --size B --budget-s S   prints one JSON result
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time

import korinet.client
import korinet.protocol
import korinet.server


def serve(mode: str, max_seconds: float) -> None:
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(max_seconds)
    print(json.dumps({"port": lsock.getsockname()[1]}), flush=True)
    conn, _ = lsock.accept()
    lsock.close()
    # The README's server accepts from a listening socket with a timeout, which in CPython
    # gives a blocking socket: each recv() is one system call. A timeout on ``conn`` would
    # add a poll() before every recv() (two per message) and slow the original down, so
    # the bound is a watchdog that shuts the socket down instead.
    conn.setblocking(True)
    watchdog = threading.Timer(max_seconds, _shut_down, (conn,))
    watchdog.daemon = True
    watchdog.start()
    srv = korinet.server.server(conn)
    with contextlib.suppress(korinet.protocol.errors.SocketRecvNone, OSError):
        while True:
            msg = srv.recv()  # replies {"statusP": True} itself
            if mode == "reqrep":
                srv.send({"seq": msg["seq"], "p": msg["p"]})  # blocks for the client's statusP
    watchdog.cancel()
    conn.close()


def _shut_down(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def client(port: int, mode: str, n: int, size: int, budget_s: float) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # its connect prints "ok"; keep stdout for JSON
        # timeout bounds its reconnect loop, which would otherwise retry for 120 s.
        cli = korinet.client.client("127.0.0.1", port, timeout=5)
    payload = os.urandom(size)
    samples: list[int] = []
    cli.send({"seq": -1, "p": payload})  # warm-up exchange
    if mode == "reqrep":
        cli.recv()
    end = time.monotonic() + budget_s
    t0 = time.perf_counter()
    for i in range(n):
        if time.monotonic() >= end:
            break
        t = time.perf_counter_ns()
        cli.send({"seq": i, "p": payload})  # returns after the server's statusP ack
        if mode == "reqrep":
            cli.recv()
        samples.append(time.perf_counter_ns() - t)
    elapsed = time.perf_counter() - t0
    cli.protocol.sock.close()
    print(json.dumps({"done": len(samples), "elapsed": elapsed, "samples_ns": samples}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--mode", choices=("ack", "reqrep"), required=True)
    s.add_argument("--max-seconds", type=float, default=120.0)
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--mode", choices=("ack", "reqrep"), required=True)
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--size", type=int, default=64)
    c.add_argument("--budget-s", type=float, default=5.0)
    args = ap.parse_args()
    if args.role == "serve":
        serve(args.mode, args.max_seconds)
    else:
        client(args.port, args.mode, args.n, args.size, args.budget_s)


if __name__ == "__main__":
    main()
