"""The korinet-audio command: ``serve`` a hub, ``talk`` in a channel, list ``devices``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from korinet import Client, KoriNetError, MessageRejected, Server
from korinet.cli import load_identity, parse_address, pinning_notice, wait_for_stop_signal
from korinet.plugins import PluginConflict, PluginManager, default_manager

from . import codecs as codec_registry
from .cluster import PTT_KEEP

if TYPE_CHECKING:
    from korinet.cluster import ClusterBus
    from korinet.security import ClientTLS, Identity, ServerTLS

    from .hub import AudioHub

__all__ = ["DEFAULT_PORT", "main"]

#: The intercom's port (``korinet serve`` hosts it too, on its own port).
DEFAULT_PORT = 1238  # 1235 core, 1236 chat, 1237 admin agents
PLAINTEXT_WARNING = (
    "WARNING: --insecure-plaintext: audio and names cross the network unencrypted and unauthenticated"
)


def _say(text: str) -> None:
    print(f"korinet-audio: {text}", file=sys.stderr, flush=True)


def _identity() -> Identity:
    return load_identity("korinet-audio")


def _server_tls(args: argparse.Namespace) -> ServerTLS | None:
    if args.insecure_plaintext:
        _say(PLAINTEXT_WARNING)
        return None
    from korinet.security import AuthorizedKeys, ServerTLS

    return ServerTLS(_identity(), authorized=None if args.no_client_auth else AuthorizedKeys())


def _client_tls(args: argparse.Namespace) -> ClientTLS | None:
    if args.insecure_plaintext:
        _say(PLAINTEXT_WARNING)
        return None
    from korinet.security import ClientTLS

    return ClientTLS(_identity(), on_first_use=pinning_notice("korinet-audio", where="the hub"))


# ---------------------------------------------------------------------- serve


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"seconds above 0, not {text!r}")
    return value


async def _connect_bus(address: str, plugins: PluginManager) -> ClusterBus:
    """The cluster bus at ``address``, connected.

    Raises:
        BusError: not a bus address, no plugin for it (korinet-nats missing), unreachable.
    """
    from korinet.cluster import BusError, bus_for

    if "://" not in address:  # "local" would share nothing with hubs in other processes
        raise BusError(f"--cluster takes an address like nats://HOST:PORT, not {address!r}")
    bus = bus_for(address, plugins)
    await bus.connect()
    return bus


async def _serve(args: argparse.Namespace, plugins: PluginManager) -> int:
    from korinet.cluster import BusError

    from .hub import AudioHub
    from .plugin import use_audio_hub

    host, port = parse_address(args.listen, DEFAULT_PORT)
    try:
        tls = _server_tls(args)
    except (OSError, ValueError) as exc:
        _say(str(exc))
        return 1
    bus = None
    if args.cluster:
        try:
            bus = await _connect_bus(args.cluster, plugins)
        except BusError as exc:
            _say(str(exc))
            return 1
    server = Server(host, port, plugins=plugins, accept_plain=False, session_ttl=args.session_ttl, tls=tls)
    audio = AudioHub(bus=bus, ptt_keep=args.ptt_keep)
    use_audio_hub(server.hub, audio)
    try:
        await server.start()
    except OSError as exc:
        _say(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
        if bus is not None:
            await bus.close()
        return 1
    print(f"korinet-audio hub on {host}:{server.port}", flush=True)
    if bus is not None and audio.cluster is not None:
        print(f"sharing channels through {args.cluster} as hub {audio.cluster.hub_id}", flush=True)
    if tls is not None:
        print(f"TLS 1.3, hub key {tls.identity.fingerprint}", flush=True)
        if tls.authorized is None:
            print("any client may join (--no-client-auth): talkers are not authenticated", flush=True)
        else:
            print(
                f"talkers must be authorized in {tls.authorized.path}: on each talker run `korinet id`, "
                "here `korinet authorize FINGERPRINT --name NAME`",
                flush=True,
            )
    print("Press Ctrl-C to stop.", flush=True)
    await wait_for_stop_signal()
    await server.close()
    try:  # bounded: Ctrl-C ends the process even when the bus does not answer
        async with asyncio.timeout(STOP_PATIENCE):
            await _leave_cluster(audio, bus)
    except TimeoutError:
        _say(f"the cluster bus did not answer within {STOP_PATIENCE:.0f} s while stopping; stopped anyway")
    return 0


#: seconds a stopping hub gives the cluster bus for its goodbyes
STOP_PATIENCE = 10.0


async def _leave_cluster(audio: AudioHub, bus: ClusterBus | None) -> None:
    await audio.close()  # a bye on the bus: the other hubs drop our members at once
    if bus is not None:
        await bus.close()


# ---------------------------------------------------------------------- talk


def _devices_for(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """Capture and playback for the options given, sound devices checked (not started)
    so that a missing card is said before anyone sees us join; and what was checked.

    Raises:
        OSError, ValueError: a device or a file cannot be used (the message says why).
    """
    from .wavio import FileCapture, FilePlayback

    capture: Any
    playback: Any
    named: list[str] = []
    if args.listen_only:
        capture = None
    elif args.input_file:
        capture = FileCapture(args.input_file, loop=args.loop)
    else:
        from .devices import DeviceCapture

        capture = DeviceCapture(_device(args.input_device))
        named.append(f"microphone: {capture.check()}")
    if args.output_file:
        playback = FilePlayback(args.output_file)
    else:
        from .devices import DevicePlayback

        playback = DevicePlayback(_device(args.output_device))
        named.append(f"speaker: {playback.check()}")
    return capture, playback, named


def _device(text: str | None) -> int | str | None:
    if text is None:
        return None
    return int(text) if text.isdigit() else text


async def _talk(args: argparse.Namespace, plugins: PluginManager) -> int:
    from .talk import Call
    from .tui import StatusScreen, summary
    from .wavio import FileCapture

    host, port = parse_address(args.address, DEFAULT_PORT)
    codecs = codec_registry.available()
    if args.codec:
        if args.codec not in codecs:
            reason = codec_registry.opus_missing_reason() if args.codec == "opus" else "unknown codec"
            _say(f"codec {args.codec} is not available here: {reason}")
            return 1
        codecs = [args.codec, *(c for c in codecs if c != args.codec)]
    try:
        capture, playback, named = _devices_for(args)
        tls = _client_tls(args)
    except (OSError, ValueError) as exc:
        _say(str(exc))
        return 1
    if named:
        _say("; ".join(named))
    try:
        client = await Client.connect(
            host, port, plugins=plugins, tls=tls, backoff_cap=1.0, open_timeout=args.timeout
        )
    except (KoriNetError, OSError) as exc:
        _say(f"cannot reach the hub at {host}:{port}: {exc}")
        return 2
    call = Call(client, args.channel, args.name, capture, playback, ptt=args.ptt, codecs=codecs)
    try:
        await call.join()
    except MessageRejected as exc:
        _say(f"the hub refused to let us join #{args.channel}: {exc}")
        await client.close()
        return 2
    except KoriNetError as exc:
        _say(f"could not join #{args.channel}: {exc}")
        await client.close()
        return 2
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, call.stop)
    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not args.no_tui
    if not interactive:
        print(
            f"joined #{args.channel} as {call.joined_as} with codec {call.codec}; "
            f"members: {', '.join(call.receiver.members)}",
            flush=True,
        )
    tasks: list[asyncio.Task[Any]] = []
    if interactive:
        tasks.append(loop.create_task(StatusScreen(call, call.stop).run()))
    elif args.ptt and isinstance(capture, FileCapture):
        # headless push-to-talk: the input file is one utterance
        call.set_talking(True)
        tasks.append(loop.create_task(_release_at_end(call, capture)))
    failure = 0
    try:
        await call.run(args.duration)
    except OSError as exc:  # a sound device could not be opened
        _say(str(exc))
        failure = 1
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await client.close()
    print(summary(call), flush=True)
    return failure


async def _release_at_end(call: Any, capture: Any) -> None:
    while not capture.finished:
        await asyncio.sleep(0.05)
    call.set_talking(False)


# ---------------------------------------------------------------------- devices


def _devices(args: argparse.Namespace, plugins: PluginManager) -> int:
    from .devices import list_devices

    try:
        found = list_devices()
    except OSError as exc:
        _say(str(exc))
        return 1
    if not found:
        print("no sound devices found (use --input-file/--output-file to talk without them)")
        return 0
    for dev in found:
        marks = ("<" if dev["default_input"] else " ") + (">" if dev["default_output"] else " ")
        print(
            f"{marks} {dev['index']:3d} {dev['name']} ({dev['hostapi']}, "
            f"{dev['inputs']} in, {dev['outputs']} out, {dev['rate']:.0f} Hz)"
        )
    print("< default input, > default output; pick others with --input-device/--output-device")
    return 0


# ---------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="korinet-audio",
        description="A voice intercom on KoriNet: a hub with channels, talkers with bounded latency "
        "(16 kHz mono, 20 ms frames, Opus or PCM). TLS 1.3 by default.",
        epilog="Two terminals: `korinet-audio serve --no-client-auth`, then `korinet-audio talk "
        "127.0.0.1` in each (or --input-file/--output-file without sound devices).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def plaintext_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--insecure-plaintext",
            action="store_true",
            help="no TLS: anyone on the network can listen in and join (prints a warning)",
        )

    p = sub.add_parser("serve", help="run an intercom hub")
    p.add_argument(
        "listen",
        nargs="?",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        help=f"HOST[:PORT] to listen on (default 127.0.0.1:{DEFAULT_PORT}; 0.0.0.0 for the LAN)",
    )
    p.add_argument(
        "--no-client-auth", action="store_true", help="let any TLS client join, not only authorized keys"
    )
    p.add_argument(
        "--session-ttl",
        type=float,
        default=120.0,
        help="seconds a talker who lost its link keeps its place, and receives push-to-talk "
        "utterances to hear on return (default 120)",
    )
    p.add_argument(
        "--cluster",
        metavar="nats://HOST:PORT[,...]",
        help="share channels with the hubs on this cluster bus (needs korinet-nats): talkers on "
        "any of them hear each other",
    )
    p.add_argument(
        "--ptt-keep",
        type=_positive_seconds,
        default=PTT_KEEP,
        metavar="SECONDS",
        help=f"with --cluster: seconds the bus keeps a push-to-talk part (default {PTT_KEEP:g}; "
        "at most 64 MiB per channel either way)",
    )
    plaintext_flag(p)
    p.set_defaults(func=_serve, is_async=True)

    p = sub.add_parser("talk", help="join a channel on a hub and talk")
    p.add_argument("address", help=f"HOST[:PORT] of the hub (port {DEFAULT_PORT} by default)")
    p.add_argument("--channel", default="lobby", help="channel to join (default lobby)")
    p.add_argument("--name", default=_default_name(), help="your name in the channel (default: user name)")
    p.add_argument(
        "--ptt",
        action="store_true",
        help="push-to-talk: hold space to talk, or tap it to start and again to stop; each "
        "utterance is also sent reliably, so listeners who were away hear it once when back",
    )
    p.add_argument("--input-file", metavar="WAV", help="talk from a 16 kHz mono WAV file, not the mic")
    p.add_argument("--output-file", metavar="WAV", help="record what you hear to a WAV file, not the speaker")
    p.add_argument("--loop", action="store_true", help="with --input-file: repeat it")
    p.add_argument("--listen-only", action="store_true", help="do not capture or send audio")
    p.add_argument("--input-device", help="capture device (number or name; see `korinet-audio devices`)")
    p.add_argument("--output-device", help="playback device (number or name)")
    p.add_argument("--codec", choices=sorted(codec_registry.REGISTRY), help="prefer this codec")
    p.add_argument("--duration", type=float, help="leave after this many seconds")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to reach the hub (default 10)")
    p.add_argument("--no-tui", action="store_true", help="no status screen, just a summary at the end")
    plaintext_flag(p)
    p.set_defaults(func=_talk, is_async=True)

    p = sub.add_parser("devices", help="list sound devices")
    p.set_defaults(func=_devices, is_async=False)
    return parser


def _default_name() -> str:
    import getpass

    try:
        return getpass.getuser()[:32] or "guest"
    except (KeyError, OSError):
        return "guest"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        plugins = default_manager()
        plugins.message_types()
    except PluginConflict as exc:
        _say(f"plugin conflict: {exc}")
        return 2
    try:
        if args.is_async:
            return int(asyncio.run(args.func(args, plugins)) or 0)
        return int(args.func(args, plugins) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
