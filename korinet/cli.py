"""The ``korinet`` command: serve, ping, plugins, the identity commands (keygen,
id, authorize), and whatever plugins add."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import __version__
from .builtin import ECHO
from .exceptions import KoriNetError
from .plugins import PluginConflict, PluginManager, default_manager
from .runtime import DEFAULT_PORT, Client, Server, StoreError
from .session import SessionConfig

if TYPE_CHECKING:
    from .security import ClientTLS, Identity, KnownHosts, ServerTLS

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


# ---------------------------------------------------------------------- identity


# Shared with the apps' commands (korinet-chat, -admin, -audio): one wording for
# what a user must see about keys, and one way to wait for Ctrl-C.


def load_identity(command: str, *, hint: str = "") -> Identity:
    """This node's identity, made on first use and saying so on stderr
    (``"{command}: created a new identity ... in DIR"``, then ``hint`` if given, in
    which ``{fingerprint}`` stands for the new key's).

    Raises:
        OSError, ValueError: the stored one cannot be read (the message says why).
    """
    from .security import Identity, korinet_home

    created = not Identity.exists()
    identity = Identity.load_or_create()
    if created:
        print(
            f"{command}: created a new identity {identity.fingerprint} in {korinet_home()}"
            + (f"; {hint.format(fingerprint=identity.fingerprint)}" if hint else ""),
            file=sys.stderr,
            flush=True,
        )
    return identity


def pinning_notice(command: str, *, where: str = "the server") -> Callable[[str, str, KnownHosts], None]:
    """A ``ClientTLS(on_first_use=...)`` callback telling the user, on stderr, which
    key was pinned for which address, and how to check it."""

    def first_use(address: str, fingerprint: str, known_hosts: KnownHosts) -> None:
        print(
            f"{command}: first connection to {address}: its key {fingerprint} is now pinned in "
            f"{known_hosts.path} (compare it with what `korinet id` prints on {where})",
            file=sys.stderr,
            flush=True,
        )

    return first_use


async def wait_for_stop_signal() -> None:
    """Return at the first SIGINT (Ctrl-C) or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _keygen(args: argparse.Namespace, plugins: PluginManager) -> int:
    from .security import Identity, korinet_home

    home = korinet_home()
    if Identity.exists(home) and not args.force:
        try:
            old = Identity.load(home).fingerprint
        except (OSError, ValueError) as exc:
            old = f"unreadable: {exc}"
        print(
            f"korinet keygen: an identity already exists in {home} ({old}); --force replaces it, "
            "after which servers that authorized it and clients that pinned it refuse the new key",
            file=sys.stderr,
        )
        return 1
    identity = Identity.generate().save(home, overwrite=True)
    print(f"{identity.fingerprint}\nnew identity in {home} (key.pem is private: mode 0600)")
    return 0


def _id(args: argparse.Namespace, plugins: PluginManager) -> int:
    try:
        identity = load_identity("korinet id")
    except (OSError, ValueError) as exc:
        print(f"korinet id: {exc}", file=sys.stderr)
        return 1
    print(identity.fingerprint)
    return 0


def _authorize(args: argparse.Namespace, plugins: PluginManager) -> int:
    from .security import AuthorizedKeys

    keys = AuthorizedKeys()
    try:
        added = keys.authorize(args.fingerprint, args.name, args.role)
    except (OSError, ValueError) as exc:
        print(f"korinet authorize: {exc}", file=sys.stderr)
        return 1
    roles = ", ".join(sorted(set(args.role))) or "none"
    print(f"{'authorized' if added else 'updated'} {args.name} ({args.fingerprint.strip()}), roles: {roles}")
    print(f"in {keys.path}; delete the line to revoke it")
    return 0


def _server_tls(args: argparse.Namespace) -> ServerTLS | None:
    if not args.tls:
        return None
    from .security import AuthorizedKeys, ServerTLS

    authorized = None if args.no_client_auth else AuthorizedKeys()
    return ServerTLS(load_identity("korinet serve"), authorized=authorized)


def _client_tls(args: argparse.Namespace) -> ClientTLS | None:
    if not args.tls:
        return None
    from .security import ClientTLS

    return ClientTLS(load_identity("korinet ping"), on_first_use=pinning_notice("korinet ping"))


PASSPHRASE_ENV = "KORINET_PASSPHRASE"


def read_passphrase(command: str) -> str:
    """The passphrase for ``--passphrase``: from $KORINET_PASSPHRASE, else asked on the
    terminal (never an argument: other users can read a command line in ps).

    Raises:
        ValueError: neither is available, or it is empty.
    """
    passphrase = os.environ.get(PASSPHRASE_ENV)
    if passphrase is None:
        if not sys.stdin.isatty():
            raise ValueError(f"--passphrase: set {PASSPHRASE_ENV}, or run {command} in a terminal to type it")
        passphrase = getpass.getpass("passphrase: ")
    if not passphrase:
        raise ValueError("--passphrase: the passphrase is empty")
    return passphrase


# ---------------------------------------------------------------------- serve


async def _serve(args: argparse.Namespace, plugins: PluginManager) -> int:
    host, port = parse_address(args.listen)
    config = SessionConfig(heartbeat_interval=args.heartbeat)
    try:
        tls = _server_tls(args)
        passphrase = read_passphrase("korinet serve") if args.passphrase else None
    except (OSError, ValueError) as exc:
        print(f"korinet serve: {exc}", file=sys.stderr)
        return 1
    try:
        server = Server(
            host,
            port,
            plugins=plugins,
            config=config,
            accept_plain=False,
            session_ttl=args.session_ttl,
            tls=tls,
            passphrase=passphrase,
            store=args.store,
        )
    except StoreError as exc:
        print(f"korinet serve: {exc}", file=sys.stderr)
        return 1
    try:
        await server.start()
    except StoreError as exc:
        print(f"korinet serve: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"korinet serve: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    types = ", ".join(sorted(plugins.message_types())) or "none"
    print(f"korinet {__version__} serving on {host}:{server.port} (message types: {types})", flush=True)
    if tls is not None:
        print(f"TLS 1.3, server key {tls.identity.fingerprint}", flush=True)
        if tls.authorized is None:
            print("any client may connect (--no-client-auth): clients are not authenticated", flush=True)
        else:
            try:
                count = len(tls.authorized.entries())
            except ValueError as exc:
                print(f"korinet serve: {exc}", file=sys.stderr)
                await server.close()
                return 1
            print(
                f"clients must be authorized: {count} key(s) in {tls.authorized.path} "
                "(add one with: korinet authorize FINGERPRINT --name NAME)",
                flush=True,
            )
    if passphrase is not None:
        print("clients must prove the passphrase (challenge-response; it is never sent)", flush=True)
    print("Press Ctrl-C to stop.", flush=True)
    await wait_for_stop_signal()
    print(f"stopping ({len(server.hub.sessions)} session(s) open)", flush=True)
    await server.close()
    return 0


# ---------------------------------------------------------------------- ping


async def _ping(args: argparse.Namespace, plugins: PluginManager) -> int:
    host, port = parse_address(args.address)
    try:
        tls = _client_tls(args)
        passphrase = read_passphrase("korinet ping") if args.passphrase else None
    except (OSError, ValueError) as exc:
        print(f"korinet ping: {exc}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    try:
        client = await Client.connect(
            host, port, plugins=plugins, open_timeout=args.timeout, tls=tls, passphrase=passphrase
        )
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
    offer = plugins.codec_offer()
    print(f"korinet {__version__}; codecs offered by default: {', '.join(offer)}")
    for info in plugins.plugins():
        head = f"{info.name}{' ' + info.version if info.version else ''}  {info.state}"
        if info.state != "loaded":
            print(f"{head}: {info.detail}")
            continue
        print(f"{head}{f' (supports korinet {info.requires})' if info.requires else ''}")
        for name in info.codecs:
            print(f"  codec         {name}")
        for name in info.message_types:
            mtype = types[name]
            extra = f" [{mtype.delivery.value}]" + (
                f" role={mtype.required_role}" if mtype.required_role else ""
            )
            print(f"  message type  {name}{extra}  {mtype.description}".rstrip())
    return 0


def _plugin_new(args: argparse.Namespace, plugins: PluginManager) -> int:
    from pathlib import Path

    from .scaffold import PluginSpec, ScaffoldError, write_plugin

    spec = PluginSpec(args.name, message_type=args.message_type, codec=args.codec)
    try:
        root = write_plugin(spec, Path(args.directory), __version__)
    except (ScaffoldError, OSError) as exc:
        print(f"korinet plugin new: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {root}/ ({spec.distribution}, entry point {spec.name!r}). Next:")
    print(f"  pip install -e '{root}[test]' && pytest {root}")
    print(f"  korinet plugins; korinet {spec.name} --help")
    return 0


# ---------------------------------------------------------------------- main


PASSPHRASE_HELP = (
    f"require a pre-shared passphrase (proven by challenge-response, never sent), "
    f"read from ${PASSPHRASE_ENV} or typed at a prompt"
)


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
    p.add_argument(
        "--tls",
        action="store_true",
        help="TLS 1.3 with this node's identity; only clients in authorized_keys may connect",
    )
    p.add_argument(
        "--no-client-auth",
        action="store_true",
        help="with --tls: let any client connect (encrypted, but not authenticated)",
    )
    p.add_argument("--passphrase", action="store_true", help=PASSPHRASE_HELP)
    p.add_argument(
        "--store",
        metavar="FILE",
        help="keep sessions in this SQLite file: a restarted server resumes them (clients need one too)",
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
    p.add_argument(
        "--tls",
        action="store_true",
        help="TLS 1.3: pin the server's key on first use, present this node's identity",
    )
    p.add_argument("--passphrase", action="store_true", help=PASSPHRASE_HELP)
    p.set_defaults(func=_ping, is_async=True)

    p = sub.add_parser("plugins", help="list plugins: state, codecs, message types (= plugin list)")
    p.set_defaults(func=_plugins, is_async=False)

    p = sub.add_parser("plugin", help="write a new plugin package, or list the installed ones")
    plugin_sub = p.add_subparsers(dest="plugin_command", metavar="ACTION", required=True)
    q = plugin_sub.add_parser("list", help="the installed plugins and their state")
    q.set_defaults(func=_plugins, is_async=False)
    q = plugin_sub.add_parser(
        "new",
        help="write korinet-NAME/: a tested, installable plugin package",
        description="Write korinet-NAME/: pyproject with the korinet entry point, a typed message "
        "type (or a codec) with a validator and handler, a `korinet NAME` command, tests that "
        "start a real server on loopback, and a README.",
    )
    q.add_argument("name", help="the plugin's name (distribution korinet-NAME, package korinet_NAME)")
    q.add_argument("--message-type", metavar="T", help="the message type to define (default NAME.hello)")
    q.add_argument(
        "--codec", metavar="C", help="define a codec named C (alone: a codec plugin without a message type)"
    )
    q.add_argument("-C", "--directory", default=".", help="where to write korinet-NAME/ (default: here)")
    q.set_defaults(func=_plugin_new, is_async=False)

    p = sub.add_parser("keygen", help="create this node's identity (key pair and certificate)")
    p.add_argument("--force", action="store_true", help="replace an existing identity")
    p.set_defaults(func=_keygen, is_async=False)

    p = sub.add_parser("id", help="print this node's fingerprint (creating the identity on first use)")
    p.set_defaults(func=_id, is_async=False)

    p = sub.add_parser("authorize", help="let a client's key connect to this node's servers")
    p.add_argument("fingerprint", help="the client's fingerprint, as `korinet id` prints it there")
    p.add_argument("--name", required=True, help="who the key belongs to (one word)")
    p.add_argument("--role", action="append", default=[], help="a role to grant (repeat for several)")
    p.set_defaults(func=_authorize, is_async=False)

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
