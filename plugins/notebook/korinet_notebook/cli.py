"""``korinet notebook put|get|del|list|watch``: added to the ``korinet`` command by
the plugin's ``korinet_add_cli_commands`` hook.

TLS 1.3 by default, with the server's key pinned on first use and this node's
identity presented (``korinet serve --tls`` must have authorized it, or run with
``--no-client-auth``); ``--insecure-plaintext`` talks to a plaintext server.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from korinet import Client, KoriNetError, KoriNetTimeout, MessageRejected

from . import remote
from .notebook import NoSuchKey

__all__ = ["DEFAULT_SERVER", "add_command", "parse_server"]

DEFAULT_SERVER = "127.0.0.1:1235"


def parse_server(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` to ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        host, port = text, "1235"  # no port, or a bare IPv6 address
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return host, number


def add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "notebook",
        help="read and write the shared notebook of a KoriNet server",
        description="A key-value notebook kept by a KoriNet server (`korinet serve` with "
        "korinet-notebook installed).",
    )
    p.add_argument(
        "--server",
        type=parse_server,
        default=parse_server(DEFAULT_SERVER),
        metavar="HOST[:PORT]",
        help=f"the server (default {DEFAULT_SERVER})",
    )
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="no TLS: for a server run without --tls (anyone on the path can read and forge)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server (default 5)")
    ops = p.add_subparsers(dest="notebook_op", metavar="OPERATION", required=True)
    op = ops.add_parser("put", help="set KEY to VALUE")
    op.add_argument("key")
    op.add_argument("value")
    op = ops.add_parser("get", help="print KEY's value")
    op.add_argument("key")
    op = ops.add_parser("del", help="remove KEY")
    op.add_argument("key")
    op = ops.add_parser("list", help="print every KEY<TAB>VALUE under PREFIX")
    op.add_argument("prefix", nargs="?", default="")
    op = ops.add_parser("watch", help="print every change under PREFIX as it happens (Ctrl-C stops)")
    op.add_argument("prefix", nargs="?", default="")
    op.add_argument("--count", type=int, default=None, help="stop after this many changes")
    p.set_defaults(func=run, is_async=True)


def _tls(args: argparse.Namespace) -> Any:
    if args.insecure_plaintext:
        print("korinet notebook: warning: plaintext connection (--insecure-plaintext)", file=sys.stderr)
        return None
    from korinet.security import ClientTLS, Identity, KnownHosts, korinet_home

    created = not Identity.exists()
    identity = Identity.load_or_create()
    if created:
        print(f"created a new identity {identity.fingerprint} in {korinet_home()}", file=sys.stderr)

    def first_use(address: str, fingerprint: str, known_hosts: KnownHosts) -> None:
        print(f"first connection to {address}: pinned its key {fingerprint}", file=sys.stderr)

    return ClientTLS(identity, on_first_use=first_use)


def _show(value: str | bytes | None) -> str:
    return value if isinstance(value, str) else repr(value)


async def run(args: argparse.Namespace, plugins: Any) -> int:
    """Returns 0 on success, 1 when the server refused (unknown key, invalid input),
    2 when it cannot be reached."""
    host, port = args.server
    tls = None
    try:
        tls = _tls(args)
        client = await Client.connect(host, port, plugins=plugins, tls=tls, open_timeout=args.timeout)
    except (KoriNetError, OSError, ValueError) as exc:
        hint = ""
        if isinstance(exc, KoriNetTimeout) and tls is not None:
            hint = " (a server run without --tls needs --insecure-plaintext)"
        print(f"korinet notebook: cannot reach {host}:{port}: {exc}{hint}", file=sys.stderr)
        return 2
    try:
        return await _operate(client, args)
    except (MessageRejected, NoSuchKey) as exc:
        print(f"korinet notebook: {exc}", file=sys.stderr)
        return 1
    except KoriNetError as exc:
        print(f"korinet notebook: {exc}", file=sys.stderr)
        return 2
    finally:
        await client.close()


async def _operate(client: Client, args: argparse.Namespace) -> int:
    t = args.timeout
    op = args.notebook_op
    if op == "put":
        version = await remote.put(client, args.key, args.value, timeout=t)
        print(f"{args.key} set (version {version})")
    elif op == "get":
        print(_show((await remote.get(client, args.key, timeout=t)).value))
    elif op == "del":
        if not await remote.delete(client, args.key, timeout=t):
            print(f"korinet notebook: no such key: {args.key!r}", file=sys.stderr)
            return 1
        print(f"{args.key} deleted")
    elif op == "list":
        for entry in await remote.list_entries(client, args.prefix, timeout=t):
            print(f"{entry.key}\t{_show(entry.value)}")
    else:
        now, changes = await remote.watch(client, args.prefix, timeout=t)
        for entry in now:
            print(f"{entry.key} = {_show(entry.value)}", flush=True)
        seen = 0
        async for change in changes:
            if change["deleted"]:
                print(f"{change['key']} deleted", flush=True)
            else:
                print(f"{change['key']} = {_show(change['value'])}", flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return 0
