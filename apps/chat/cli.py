"""The korinet-chat command.

    korinet-chat                         find a hub on the LAN, or start one here
    korinet-chat HOST[:PORT] [--nick N]  connect to a hub
    korinet-chat H1,H2,H3                hubs of one cluster: moves on when its hub is gone
    korinet-chat serve [--host --port --db] [--cluster nats://HOST:PORT]

Settings come from flags, then ``chat.toml`` in KoriNet's configuration directory
(``$KORINET_HOME`` or ``~/.config/korinet``), then defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import re
import sys
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import protocol
from .hub import DEFAULT_PORT

if TYPE_CHECKING:
    from korinet import Server
    from korinet.security import ClientTLS, ServerTLS

    from .client import ChatClient
    from .discovery import Announcement, FoundHub, HubWatcher
    from .handover import LocalHost
    from .hub import ChatHub, HubSettings

__all__ = ["load_config", "main"]

#: Seconds an announced hub has to accept a TCP connection before it is passed over.
PROBE_TIMEOUT = 1.0

CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "nick": str,
    "room": str,
    "host": str,
    "port": int,
    "db": str,
    "insecure_plaintext": bool,
    "discover_timeout": (int, float),
    "bell": bool,
    "rate": (int, float),
    "burst": (int, float),
    "interface": str,
}


class UsageError(Exception):
    """A mistake of the user's: printed as one line, exit code 2."""


# ---------------------------------------------------------------------- settings


def config_dir() -> Path:
    override = os.environ.get("KORINET_HOME")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_config_dir("korinet", appauthor=False))


def default_db() -> Path:
    if os.environ.get("KORINET_HOME"):
        return config_dir() / "chat.sqlite3"
    import platformdirs

    return Path(platformdirs.user_data_dir("korinet", appauthor=False)) / "chat.sqlite3"


def load_config(path: Path | None = None) -> dict[str, Any]:
    """The settings in chat.toml (``{}`` when there is no file).

    Raises:
        UsageError: the file is not valid TOML, or a key is unknown or of the wrong type.
    """
    path = path or config_dir() / "chat.toml"
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    for key, value in data.items():
        expected = CONFIG_KEYS.get(key)
        if expected is None:
            raise UsageError(f"{path}: unknown setting {key!r} (known: {', '.join(CONFIG_KEYS)})")
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise UsageError(f"{path}: {key!r} has the wrong type ({type(value).__name__})")
    return data


def default_nick() -> str:
    """The login name, made into a valid nick."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "guest"
    name = re.sub(r"[^\w\-\[\]{}|^`]", "_", name)[: protocol.MAX_NICK] or "guest"
    try:
        return protocol.normalize_nick(name)
    except ValueError:
        return "guest"


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    from korinet.cli import parse_address as parse

    try:
        return parse(text, default_port)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(str(exc)) from None


# ---------------------------------------------------------------------- parsers


def _client_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="korinet-chat",
        description="A LAN terminal chat where nobody loses a message. With no address it looks for a hub "
        "on the LAN (mDNS) and, finding none, starts one in this process that others find.",
        epilog="Also: korinet-chat serve --help (a standalone hub). Settings: chat.toml in "
        f"{config_dir()} (keys: {', '.join(CONFIG_KEYS)}); flags win.",
    )
    p.add_argument(
        "address",
        nargs="?",
        help=f"the hub, HOST[:PORT] (default port {DEFAULT_PORT}); hubs of one cluster: "
        "HOST[:PORT],HOST[:PORT],… (the first that answers; the next when it is gone)",
    )
    p.add_argument("--nick", "-n", help="your nick (default: your login name)")
    p.add_argument("--room", "-r", help="the room to join first (default: general)")
    p.add_argument(
        "--insecure-plaintext", action="store_true", default=None, help="no TLS (the hub must agree)"
    )
    p.add_argument(
        "--discover-timeout", type=float, help="seconds to look for a hub on the LAN (default 1.5)"
    )
    p.add_argument(
        "--connect-timeout", type=float, default=10.0, help="seconds to wait for the hub (default 10)"
    )
    p.add_argument("--no-bell", action="store_true", help="no terminal bell on mentions")
    p.add_argument(
        "--interface",
        metavar="ADDRESS",
        help="look for (and start) a hub on this interface only, e.g. 192.168.1.20 (default: all)",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="log the runtime's events")
    return p


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="korinet-chat serve", description="Run a standalone chat hub.")
    p.add_argument("--host", help="address to listen on (default 0.0.0.0: the whole LAN)")
    p.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--db", help=f"history database (default {default_db()}; ':memory:' keeps none)")
    p.add_argument("--insecure-plaintext", action="store_true", default=None, help="no TLS: anyone can read")
    p.add_argument("--no-announce", action="store_true", help="do not announce the hub on the LAN (mDNS)")
    p.add_argument("--session-ttl", type=float, default=120.0, help="seconds a dropped client keeps its nick")
    p.add_argument("--rate", type=float, help="messages per second per user after a burst (0: no limit)")
    p.add_argument("--burst", type=float, help="messages a user may send at once, e.g. a paste (default 500)")
    p.add_argument(
        "--cluster", metavar="nats://HOST:PORT[,...]", help="share rooms and nicks with the hubs on this bus"
    )
    p.add_argument("--verbose", "-v", action="store_true", help="log every session event")
    return p


def _warn_plaintext(what: str) -> None:
    print(f"korinet-chat {what}: WARNING: --insecure-plaintext: messages cross the network unencrypted",
          file=sys.stderr, flush=True)  # fmt: skip


def _server_tls(plaintext: bool) -> ServerTLS | None:
    if plaintext:
        return None
    from korinet.cli import load_identity
    from korinet.security import ServerTLS

    return ServerTLS(load_identity("korinet-chat"), authorized=None)  # anyone may chat: nicks, not keys


def _client_tls(plaintext: bool, fingerprint: str | None = None) -> ClientTLS | None:
    if plaintext:
        return None
    from korinet.cli import pinning_notice
    from korinet.security import ClientTLS

    return ClientTLS(fingerprint=fingerprint, on_first_use=pinning_notice("korinet-chat", where="the hub"))


# ---------------------------------------------------------------------- hub


async def start_hub(
    host: str, port: int, db: str | Path, *, plaintext: bool, session_ttl: float = 120.0,
    rate: float | None = None, burst: float | None = None, cluster: str | None = None,
) -> tuple[ChatHub, Server]:  # fmt: skip
    """A hub listening on ``host:port`` (``port`` busy and the default: any free one),
    on the cluster bus at ``cluster`` if given.

    Raises:
        BusError: the bus is unreachable, or no installed plugin serves its address.
    """
    from korinet.cluster import BusError, bus_for

    from .hub import ChatHub

    bus = None
    if cluster is not None:
        if not cluster.startswith("nats://"):  # "local" would share nothing across processes
            raise BusError(f"--cluster takes a nats://HOST:PORT address, not {cluster!r}")
        bus = bus_for(cluster)
    hub = ChatHub(db, settings=_hub_settings(rate, burst), bus=bus)
    try:
        await hub.start()
    except BaseException:
        hub.close()
        raise
    tls = _server_tls(plaintext)
    server = hub.server(host, port, tls=tls, session_ttl=session_ttl)
    try:
        await server.start()
    except OSError:
        if port != DEFAULT_PORT:
            hub.close()
            raise
        server = hub.server(host, 0, tls=tls, session_ttl=session_ttl)
        await server.start()
    return hub, server


def _hub_settings(rate: float | None, burst: float | None) -> HubSettings:
    from .hub import HubSettings

    settings = HubSettings()
    if rate is not None:
        settings.rate = rate
    if burst is not None:
        settings.burst = burst
    return settings


async def _announce(
    server: Server,
    plaintext: bool,
    interface: str | None = None,
    *,
    started: float | None = None,
    standalone: bool = False,
    cluster: str | None = None,
) -> Announcement | None:
    from .discovery import announce

    try:
        host = server.host
        addresses = None if host in ("0.0.0.0", "", "::") else [host]
        return await announce(
            server.port,
            addresses=addresses,
            fingerprint=server.fingerprint,
            tls=not plaintext,
            interfaces=[interface] if interface else None,
            started=started if started is not None else time.time(),
            standalone=standalone,
            cluster=cluster,
        )
    except Exception as exc:  # no multicast here: the hub works, it is only not found
        print(f"korinet-chat: could not announce the hub on the LAN ({exc})", file=sys.stderr)
        return None


async def _serve(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    from korinet.cli import wait_for_stop_signal

    host = args.host or "0.0.0.0"
    port = args.port if args.port is not None else int(cfg.get("port", DEFAULT_PORT))
    db = args.db or cfg.get("db") or default_db()
    plaintext = bool(args.insecure_plaintext or cfg.get("insecure_plaintext"))
    if plaintext:
        _warn_plaintext("serve")
    try:
        hub, server = await start_hub(
            host, port, db, plaintext=plaintext, session_ttl=args.session_ttl,
            rate=args.rate if args.rate is not None else cfg.get("rate"),
            burst=args.burst if args.burst is not None else cfg.get("burst"), cluster=args.cluster,
        )  # fmt: skip
    except OSError as exc:
        print(f"korinet-chat serve: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # sqlite3.Error, an unreadable identity...
        print(f"korinet-chat serve: {exc}", file=sys.stderr)
        return 1
    print(f"korinet-chat hub on {host}:{server.port}, history in {db}", flush=True)
    cluster_id = None
    if hub.cluster is not None:
        print(f"sharing rooms and nicks through {args.cluster} as hub {hub.cluster.hub_id}", flush=True)
        if not args.no_announce:
            try:
                cluster_id = await hub.cluster.cluster_id()  # clients find its other hubs by it
            except Exception as exc:
                print(
                    f"korinet-chat serve: the cluster's name is unknown ({exc})", file=sys.stderr, flush=True
                )
    if server.fingerprint:
        print(
            f"TLS 1.3, hub key {server.fingerprint} (anyone may join; nicks are not authenticated)",
            flush=True,
        )
    announcement = (
        None
        if args.no_announce
        else await _announce(server, plaintext, started=time.time(), standalone=True, cluster=cluster_id)
    )
    if announcement is not None:
        print(f"announced on the LAN as {announcement.name!r}", flush=True)
    print("Press Ctrl-C to stop.", flush=True)
    await wait_for_stop_signal()
    print(f"stopping ({len(hub.nicks)} user(s) connected)", flush=True)
    if announcement is not None:
        await announcement.close()
    hub.stopping()  # members of a cluster hub move on to its other hubs, nicks and all
    await server.close()
    await hub.aclose()  # frees its nicks on the cluster bus at once
    return 0


# ---------------------------------------------------------------------- chat


async def _find_hub(
    timeout: float, plaintext: bool, interface: str | None
) -> tuple[FoundHub | None, int, list[tuple[str, int]]]:
    """The hub on the LAN by the rule (discovery.hub_rank: a `serve` hub, else the one
    that started first) that answers, and how many were passed over: each one that does
    not answer is said in one line (an announcement outlives a hub that crashed). Then
    the hubs to fail over to: it and the other hubs announced for its cluster."""
    from .discovery import answers, browse, hub_rank, same_cluster

    print(f"looking for a chat hub on the LAN ({timeout:g}s)…", flush=True)
    try:
        found = await browse(timeout, interfaces=[interface] if interface else None)
    except Exception as exc:  # no multicast at all
        print(f"korinet-chat: cannot search the LAN ({exc})", file=sys.stderr)
        return None, 0, []
    usable = sorted((h for h in found if h.tls != plaintext), key=hub_rank)
    for index, hub in enumerate(usable):
        if await answers(hub.host, hub.port, PROBE_TIMEOUT):
            others = f" (and {len(usable) - index - 1} more)" if index + 1 < len(usable) else ""
            print(f"found {hub.name!r} at {hub.host}:{hub.port}{others}", flush=True)
            return hub, index, same_cluster(hub, usable)
        then = "trying the next one" if index + 1 < len(usable) else "starting one here"
        print(f"the hub announced at {hub.host}:{hub.port} does not answer; {then}", flush=True)
    return None, len(usable), []


async def _chat(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    from korinet import KoriNetError, KoriNetTimeout

    from .client import ChatClient, ChatError, describe
    from .ui import ChatUI

    nick = args.nick or cfg.get("nick") or default_nick()
    room = args.room or cfg.get("room") or "general"
    plaintext = bool(args.insecure_plaintext or cfg.get("insecure_plaintext"))
    try:
        protocol.normalize_nick(nick)
        protocol.normalize_room(room)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if plaintext:
        _warn_plaintext("client")
    address = args.address or cfg.get("host")
    interface = args.interface or cfg.get("interface")
    watchers: list[HubWatcher | None] = []
    hub_found: FoundHub | None = None
    pinned: str | None = None
    # This process's hub: started now if no hub answers, or later if the hub's host
    # quits and hands it to us (docs/CHAT.md, "Handover").
    local = _local_host(cfg, plaintext, interface)
    hubs: list[tuple[str, int]] = []
    if address:
        # several hubs of one cluster: the first that answers, the others if it goes
        hubs = [
            parse_address(a.strip(), int(cfg.get("port", DEFAULT_PORT)))
            for a in address.split(",")
            if a.strip()
        ]
        if not hubs:
            raise UsageError(f"no hub address in {address!r}")
        host, port = hubs[0]
    else:
        timeout = (
            args.discover_timeout if args.discover_timeout is not None else cfg.get("discover_timeout", 1.5)
        )
        hub_found, skipped, hubs = await _find_hub(float(timeout), plaintext, interface)
        if hub_found is not None:
            host, port = hub_found.host, hub_found.port
        else:
            try:
                host, port, pinned = await local.start()
            except OSError as exc:
                print(f"korinet-chat: cannot start a hub here: {exc.strerror or exc}", file=sys.stderr)
                return 1
            print(("" if skipped else "no hub on the LAN: ") + f"started one here on port {port}"
                  + (", announced: others who run korinet-chat will join it" if local.announcement else ""),
                  flush=True)  # fmt: skip
    try:
        client = ChatClient(host, port, nick, room=room, tls=_client_tls(plaintext, pinned), taker=local,
                            hosting=local.hub is not None, hubs=hubs)  # fmt: skip
        ui = ChatUI(client, bell=not args.no_bell and cfg.get("bell", True))
        _quit_on_sigterm(ui)
        try:
            await client.start(open_timeout=args.connect_timeout)
        except KoriNetTimeout as exc:
            why = f" ({describe(exc.__cause__)})" if exc.__cause__ is not None else ""
            print(f"korinet-chat: cannot join the hub at {host}:{port}: no answer within "
                  f"{args.connect_timeout:g}s{why}", file=sys.stderr)  # fmt: skip
            return 1
        except (ChatError, KoriNetError, OSError) as exc:
            print(f"korinet-chat: cannot join the hub at {host}:{port}: {describe(exc)}", file=sys.stderr)
            return 1
        if local.announcement is not None:
            watchers.append(_watch_rivals(client, local, plaintext, interface))
        elif hub_found is not None:
            watchers.append(_follow_hub(client, hub_found.name, interface))

        def took_over() -> None:  # a hub taken over is watched for rivals as one started here
            if local.announcement is not None:
                watchers.append(_watch_rivals(client, local, plaintext, interface))

        local.on_started = took_over
        await ui.run()
        await client.close()  # waits a moment for what is in flight to be acknowledged
        dropped = client.undelivered
        if dropped:
            lines = "1 line" if dropped == 1 else f"{dropped} lines"
            print(f"korinet-chat: {lines} you typed had not reached the hub; dropped", file=sys.stderr)
            return 1
        return 0
    finally:
        for watcher in watchers:
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.close()
        if local.hub is not None:
            hosted = len(local.hub.handover.able)
            if hosted:
                print(f"handing the hub over ({hosted} member(s) can host it)…", flush=True)
            successor = await local.close()
            if successor:
                print(f"the hub is now hosted by {successor}", flush=True)
            elif hosted:
                print("nobody could take the hub over: it closed", file=sys.stderr, flush=True)


def _local_host(cfg: dict[str, Any], plaintext: bool, interface: str | None) -> LocalHost:
    """The hub this process would run (not started yet)."""
    from .handover import LocalHost

    async def announce(server: Server, started: float) -> Announcement | None:
        return await _announce(server, plaintext, interface, started=started)

    return LocalHost(
        cfg.get("db") or default_db(),
        listen=interface or "0.0.0.0",
        local=interface or "127.0.0.1",
        port=int(cfg.get("port", DEFAULT_PORT)),
        tls=lambda: _server_tls(plaintext),
        settings=_hub_settings(cfg.get("rate"), cfg.get("burst")),
        announce=announce,
    )


def _quit_on_sigterm(ui: Any) -> None:
    """SIGTERM quits as /quit --force does (so the hub is handed over, not dropped)."""
    import signal

    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: ui._spawn(ui._quit(True)))


def _watch_rivals(
    client: ChatClient, local: LocalHost, plaintext: bool, interface: str | None
) -> HubWatcher | None:
    """Two people who start korinet-chat within the same few seconds may each start a
    hub. When another one shows up, the rule (discovery.hub_rank) says which is the
    chat's hub: if it is the other one, this hub sends its members there and closes."""
    from .discovery import FoundHub, HubWatcher, answers, hub_rank

    assert local.announcement is not None and local.server is not None
    own_name = local.announcement.name
    watcher: HubWatcher | None = None
    tasks: set[asyncio.Task[None]] = set()

    async def judge(name: str) -> None:
        assert watcher is not None
        rival = await watcher.lookup(name)
        server = local.server
        if rival is None or server is None or rival.tls == plaintext:
            return
        if not await answers(rival.host, rival.port, PROBE_TIMEOUT):
            return  # a record outliving its hub (the one handed over to us, say)
        own = FoundHub(own_name, local.local, server.port, not plaintext, server.fingerprint,
                       started=local.started)  # fmt: skip
        if hub_rank(rival) < hub_rank(own):
            await local.merge_into(rival.host, rival.port, rival.fingerprint)
        else:
            client.notice(f"another chat hub started on the LAN ({name!r}); this one is the chat's hub")

    def found(name: str) -> None:
        if name != own_name and local.hub is not None:
            task = asyncio.get_running_loop().create_task(judge(name))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    try:
        watcher = HubWatcher(found, [interface] if interface else None)
    except Exception:  # no multicast: nothing to watch
        return None
    return watcher


def _follow_hub(client: ChatClient, name: str, interface: str | None) -> HubWatcher | None:
    """Reconnect the moment the hub we found announces itself again (it restarted),
    rather than at the next backoff attempt."""
    from .discovery import HubWatcher

    def found(announced: str) -> None:
        if announced == name:
            client.reconnect_now()

    try:
        return HubWatcher(found, [interface] if interface else None, updates=True)
    except Exception:  # no multicast: the backoff alone brings the link back
        return None


def _logging(verbose: bool, interactive: bool) -> None:
    level = logging.INFO if verbose else (logging.ERROR if interactive else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config()
        if argv and argv[0] == "serve":
            args = _serve_parser().parse_args(argv[1:])
            _logging(args.verbose, interactive=False)
            return asyncio.run(_serve(args, cfg))
        args = _client_parser().parse_args(argv)
        _logging(args.verbose, interactive=True)
        return asyncio.run(_chat(args, cfg))
    except UsageError as exc:
        print(f"korinet-chat: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
