"""The ``korinet`` command: serve, ping, plugins, and whatever plugins add."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import statistics
import sys
import time
from collections.abc import Sequence

from . import __version__
from .builtin import ECHO
from .exceptions import KoriNetError
from .plugins import PluginConflict, PluginManager, default_manager
from .runtime import DEFAULT_PORT, Client, Server
from .session import SessionConfig

__all__ = ["main", "parse_address"]


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` to ``(host, port)``."""
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise argparse.ArgumentTypeError(f"bad address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"bad address {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text, text)
    return host or "127.0.0.1", port


def _port(text: str, whole: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {whole!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {whole!r}")
    return port


# ---------------------------------------------------------------------- serve


async def _serve(args: argparse.Namespace, plugins: PluginManager) -> int:
    host, port = parse_address(args.listen)
    config = SessionConfig(heartbeat_interval=args.heartbeat)
    server = Server(
        host, port, plugins=plugins, config=config, accept_plain=False, session_ttl=args.session_ttl
    )
    try:
        await server.start()
    except OSError as exc:
        print(f"korinet serve: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    types = ", ".join(sorted(plugins.message_types())) or "none"
    print(f"korinet {__version__} serving on {host}:{server.port} (message types: {types})", flush=True)
    print("Press Ctrl-C to stop.", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"stopping ({len(server.hub.sessions)} session(s) open)", flush=True)
    await server.close()
    return 0


# ---------------------------------------------------------------------- ping


async def _ping(args: argparse.Namespace, plugins: PluginManager) -> int:
    host, port = parse_address(args.address)
    started = time.perf_counter()
    try:
        client = await Client.connect(host, port, plugins=plugins, open_timeout=args.timeout)
    except KoriNetError as exc:
        print(f"korinet ping: {exc}", file=sys.stderr)
        return 2
    setup = (time.perf_counter() - started) * 1000
    codec = client.session.codec.name if client.session.codec else "?"
    print(
        f"session {client.session_id} with {host}:{port} "
        f"(protocol {client.session.version}, codec {codec}) in {setup:.1f} ms"
    )
    payload = b"x" * args.size
    rtts: list[float] = []
    lost = 0
    try:
        for i in range(args.count):
            t0 = time.perf_counter()
            try:
                await client.request(payload, ECHO, timeout=args.timeout)
            except KoriNetError as exc:
                lost += 1
                print(f"seq={i + 1} error: {exc}")
                continue
            rtt = (time.perf_counter() - t0) * 1e6
            rtts.append(rtt)
            if not args.quiet:
                print(f"{len(payload)} bytes: seq={i + 1} time={rtt:.0f} µs")
            if args.interval and i + 1 < args.count:
                await asyncio.sleep(args.interval)
    finally:
        await client.close()
    print(f"--- {host}:{port} korinet ping ---")
    print(f"{args.count} requests, {len(rtts)} replies, {lost} errors")
    if rtts:
        rtts.sort()
        p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
        print(
            f"round trip min/median/p99/max = {rtts[0]:.0f}/{statistics.median(rtts):.0f}/"
            f"{p99:.0f}/{rtts[-1]:.0f} µs"
        )
    return 0 if not lost else 1


# ---------------------------------------------------------------------- plugins


def _plugins(args: argparse.Namespace, plugins: PluginManager) -> int:
    types = plugins.message_types()
    for info in plugins.plugins():
        print(f"{info.name}{' ' + info.version if info.version else ''}")
        for name in info.codecs:
            print(f"  codec         {name}")
        for name in info.message_types:
            mtype = types[name]
            extra = f" [{mtype.delivery.value}]" + (
                f" role={mtype.required_role}" if mtype.required_role else ""
            )
            print(f"  message type  {name}{extra}  {mtype.description}".rstrip())
    return 0


# ---------------------------------------------------------------------- main


def build_parser(plugins: PluginManager) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="korinet",
        description="KoriNet: reliable, exactly-once messaging over TCP. "
        "Run a server, check one, or list the installed plugins.",
    )
    parser.add_argument("--version", action="version", version=f"korinet {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run a server hosting the installed plugins")
    p.add_argument(
        "listen",
        nargs="?",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        help=f"HOST[:PORT] to listen on (default 127.0.0.1:{DEFAULT_PORT}; 0.0.0.0 for the LAN)",
    )
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats (default 5)")
    p.add_argument(
        "--session-ttl",
        type=float,
        default=120.0,
        help="seconds a disconnected session is kept for its client (default 120)",
    )
    p.set_defaults(func=_serve, is_async=True)

    p = sub.add_parser("ping", help="open a session and measure request/reply round trips")
    p.add_argument("address", help=f"HOST[:PORT] of a KoriNet server (port {DEFAULT_PORT} by default)")
    p.add_argument("-c", "--count", type=int, default=5, help="requests to send (default 5)")
    p.add_argument("-i", "--interval", type=float, default=0.2, help="seconds between requests (default 0.2)")
    p.add_argument("-s", "--size", type=int, default=56, help="payload bytes (default 56)")
    p.add_argument(
        "-t", "--timeout", type=float, default=5.0, help="seconds to wait for each reply (default 5)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=_ping, is_async=True)

    p = sub.add_parser("plugins", help="list plugins with their codecs and message types")
    p.set_defaults(func=_plugins, is_async=False)

    plugins.add_cli_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        plugins = default_manager()
        plugins.codecs()
        plugins.message_types()
    except PluginConflict as exc:
        print(f"korinet: plugin conflict: {exc}", file=sys.stderr)
        return 2
    parser = build_parser(plugins)
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "is_async", False):
            result = asyncio.run(args.func(args, plugins))
        else:
            result = args.func(args, plugins)
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
