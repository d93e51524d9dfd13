"""Bytes on the wire and throughput with and without the zstd+msgpack codec
(plugins/zstd), over loopback, on chat-like and admin-output-like payloads.

* chat: short room messages ({"room", "nick", "text"}, 20-150 characters of text);
* admin: command output as korinet-admin streams it, {"job", "stream", "offset",
  "data"} with 4-64 KiB chunks of `ps aux`-like and syslog-like lines.

For each payload and codec: one run through a counting TCP proxy for the bytes the
client sent (every frame, header and ACK included), one direct run for throughput
(messages posted with a 1024-message window until all are acknowledged by the
server's application, the server in its own process), and the codec's own cost
(encode + decode per message, in this process).

    python3 bench/plugins_zstd.py [--quick] [--out bench/results/plugins-DATE.md]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import statistics
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import korinet_zstd
import korinet_zstd.plugin
from korinet_zstd import ZstdMsgpackCodec, prefer_zstd

from korinet import Client, Codec, Server, SessionConfig, hookimpl
from korinet.plugins import PluginManager

LOOPBACK = "127.0.0.1"
WINDOW = 1024
ACK_EVERY = 64
SEED = 20261126
#: Bytes per second of a 100 Mbit/s link, for the estimate: a transfer takes the
#: longer of its wire bytes at that rate and its measured loopback time (CPU-bound).
LINK_100M = 100e6 / 8

# ------------------------------------------------------------------ payloads

WORDS = (
    "the build is green again ok thanks lunch at noon who broke staging deploying now rollback done "
    "can you review my patch meeting moved to three printer on floor two is jammed again coffee "
    "ready ping me when you are back the wifi in room b is slow merged tests pass on my machine"
).split()
NICKS = ("ana", "bruno", "chen", "dara", "eli", "fatou", "goran", "hiro")
USERS = ("root", "www-data", "postgres", "ana", "systemd+", "message+", "avahi", "nobody")
COMMANDS = (
    "/usr/sbin/sshd -D",
    "/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main -c config_file=/etc/pg.conf",
    "nginx: worker process",
    "/usr/bin/python3 /opt/app/worker.py --queue default --concurrency 4",
    "[kworker/u8:2-events_unbound]",
    "/lib/systemd/systemd-journald",
    "-bash",
    "tmux new-session -d -s build",
    "/usr/bin/dbus-daemon --system --address=systemd: --nofork --nopidfile --systemd-activation",
    "/usr/sbin/cron -f -P",
    "/usr/bin/containerd",
    "[jbd2/sda1-8]",
)
TTYS = ("?", "pts/0", "pts/1")
LOG_FORMATS = (
    "sshd[{pid}]: Accepted publickey for {user} from 192.168.1.{a} port {port} ssh2: ED25519 SHA256:{key}",
    "sshd[{pid}]: Connection closed by 10.0.{a}.{b} port {port} [preauth]",
    'nginx[{pid}]: 192.168.1.{a} - - "GET /api/v1/items/{n} HTTP/1.1" 200 {size} "-" "curl/8.5.0" {ms}ms',
    "kernel: [{t:.6f}] eth0: renamed from veth{n:x}",
    "systemd[1]: Started session-{n}.scope - Session {n} of User {user}.",
    "CRON[{pid}]: (root) CMD (test -x /usr/sbin/anacron || run-parts --report /etc/cron.daily)",
    "postgres[{pid}]: LOG:  checkpoint complete: wrote {n} buffers ({ms}.0%); 0 WAL file(s) added",
)


def chat_messages(n: int, rng: random.Random) -> list[Any]:
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 25)))[:150]
        out.append({"room": "general", "nick": rng.choice(NICKS), "text": text})
    return out


def _ps_line(rng: random.Random) -> str:
    return (
        f"{rng.choice(USERS):<10}{rng.randint(1, 99999):>7}{rng.random() * 20:>5.1f}{rng.random() * 8:>5.1f}"
        f"{rng.randint(1000, 9999999):>9}{rng.randint(100, 999999):>7} {rng.choice(TTYS):<8}"
        f"{rng.choice(('S', 'Ss', 'R+', 'Sl', 'I<')):<5}{rng.randint(0, 23):02}:{rng.randint(0, 59):02}"
        f"{rng.randint(0, 300):>5}:{rng.randint(0, 59):02} {rng.choice(COMMANDS)}\n"
    )


def _log_line(rng: random.Random, t: float) -> str:
    fmt = rng.choice(LOG_FORMATS)
    stamp = time.strftime("%b %d %H:%M:%S", time.gmtime(1_795_000_000 + t))
    body = fmt.format(
        pid=rng.randint(100, 99999),
        user=rng.choice(USERS),
        a=rng.randint(1, 254),
        b=rng.randint(1, 254),
        port=rng.randint(1024, 65535),
        key="".join(
            rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(43)
        ),
        n=rng.randint(1, 1 << 20),
        size=rng.randint(100, 90000),
        ms=rng.randint(1, 900),
        t=t,
    )
    return f"{stamp} host {body}\n"


def admin_chunks(n: int, rng: random.Random) -> list[Any]:
    out = []
    offset = 0
    t = 0.0
    for i in range(n):
        target = rng.randint(4 * 1024, 64 * 1024)
        lines: list[str] = []
        size = 0
        ps = i % 2 == 0  # alternate `ps aux` snapshots and log tails
        while size < target:
            t += rng.random()
            line = _ps_line(rng) if ps else _log_line(rng, t)
            lines.append(line)
            size += len(line)
        data = "".join(lines).encode()[:target]
        out.append({"job": 7, "stream": "stdout", "offset": offset, "data": data})
        offset += len(data)
    return out


# ------------------------------------------------------------------ the server process


async def _serve(conn: Connection) -> None:
    async def consume(peer: Any) -> None:
        async for _ in peer:
            pass

    plugins = PluginManager.load(entry_points=False, extra=[korinet_zstd.plugin])
    server = await Server(LOOPBACK, 0, handler=consume, plugins=plugins).start()
    conn.send(server.port)
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
    await server.close()


def server_main(conn: Connection) -> None:
    asyncio.run(_serve(conn))


# ------------------------------------------------------------------ the client


class CountingProxy:
    """Forwards TCP connections and counts the bytes the client sends."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.up = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(LOOPBACK, self.port)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, count: bool) -> None:
            while data := await r.read(1 << 16):
                if count:
                    self.up += len(data)
                w.write(data)
                await w.drain()
            w.close()

        await asyncio.gather(pump(cr, sw, True), pump(sr, cw, False), return_exceptions=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


class OneCodec:
    """Registers one client-side codec instance (a level or threshold to compare)."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    @hookimpl
    def korinet_register_codecs(self) -> list[Codec]:
        return [self.codec]


@dataclass
class Variant:
    label: str
    codec: Codec | None  # None: plain msgpack

    def client_kwargs(self) -> dict[str, Any]:
        if self.codec is None:
            return {"plugins": PluginManager.load(entry_points=False)}
        return {
            "plugins": PluginManager.load(entry_points=False, extra=[OneCodec(self.codec)]),
            "config": prefer_zstd(SessionConfig()),
        }


async def _stream(port: int, variant: Variant, messages: list[Any]) -> float:
    """Post every message, window-bounded; return the seconds until all are acknowledged."""
    client = await Client.connect(LOOPBACK, port, **variant.client_kwargs())
    try:
        expected = variant.codec.name if variant.codec else "msgpack"
        assert client.session.codec is not None and client.session.codec.name == expected
        await client.send(messages[0])  # warm-up
        last = 0
        t0 = time.perf_counter()
        for obj in messages:
            if last - client.session.acked >= WINDOW:
                await client.wait_acked(last - WINDOW + ACK_EVERY, timeout=30)
            last = client.post(obj)
        await client.wait_acked(last, timeout=60)
        return time.perf_counter() - t0
    finally:
        await client.close()


async def _wire_bytes(port: int, variant: Variant, messages: list[Any]) -> int:
    proxy = CountingProxy(port)
    proxy_port = await proxy.start()
    client = await Client.connect(LOOPBACK, proxy_port, **variant.client_kwargs())
    try:
        before = proxy.up  # the handshake is not the payload's cost
        last = 0
        for obj in messages:
            if last - client.session.acked >= WINDOW:
                await client.wait_acked(last - WINDOW + ACK_EVERY, timeout=30)
            last = client.post(obj)
        await client.wait_acked(last, timeout=60)
        return proxy.up - before
    finally:
        await client.close()
        await proxy.close()


def _codec_cost_us(codec: Codec, messages: list[Any]) -> float:
    t0 = time.perf_counter()
    for obj in messages:
        codec.decode(codec.encode(obj))
    return (time.perf_counter() - t0) / len(messages) * 1e6


@dataclass
class Row:
    payload: str
    variant: str
    messages: int
    app_bytes: int
    wire_bytes: int
    seconds: list[float]
    codec_us: float


async def run(quick: bool, repeats: int) -> list[Row]:
    rng = random.Random(SEED)
    sets: dict[str, list[Any]] = {
        "chat": chat_messages(5_000 if quick else 20_000, rng),
        "admin": admin_chunks(300 if quick else 2_000, rng),
    }
    variants: dict[str, list[Variant]] = {
        "chat": [
            Variant("msgpack", None),
            Variant("zstd+msgpack (default: level 1, min 256 B)", ZstdMsgpackCodec()),
            Variant("zstd+msgpack (level 1, min 0 B)", ZstdMsgpackCodec(min_size=0)),
        ],
        "admin": [
            Variant("msgpack", None),
            Variant("zstd+msgpack (level 1, default)", ZstdMsgpackCodec()),
            Variant("zstd+msgpack (level 3)", ZstdMsgpackCodec(level=3)),
            Variant("zstd+msgpack (level 9)", ZstdMsgpackCodec(level=9)),
        ],
    }
    from korinet.codecs.msgpack import MsgpackCodec  # the bench may look inside; plugins may not

    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=server_main, args=(child,), daemon=True)
    proc.start()
    try:
        port = parent.recv()
        rows = []
        for name, messages in sets.items():
            app = sum(len(MsgpackCodec().encode(m)) for m in messages)
            for variant in variants[name]:
                wire = await _wire_bytes(port, variant, messages)
                seconds = [await _stream(port, variant, messages) for _ in range(repeats)]
                cost = _codec_cost_us(variant.codec or MsgpackCodec(), messages[:2000])
                rows.append(Row(name, variant.label, len(messages), app, wire, seconds, cost))
                print(f"  {name:5} {variant.label:36} wire {wire:>12,} B  {statistics.median(seconds):.3f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
        return rows
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()


def table(rows: list[Row]) -> str:
    head = (
        "| payload | codec | messages | msgpack bytes | bytes on the wire | wire / msgpack "
        "| msg/s | payload MB/s | codec µs/msg (enc+dec) | payload MB/s at 100 Mbit/s (est.) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        s = statistics.median(r.seconds)
        lines.append(
            f"| {r.payload} | {r.variant} | {r.messages:,} | {r.app_bytes:,} | {r.wire_bytes:,} "
            f"| {r.wire_bytes / r.app_bytes:.3f} | {r.messages / s:,.0f} | {r.app_bytes / s / 1e6:,.1f} "
            f"| {r.codec_us:.1f} | {r.app_bytes / max(r.wire_bytes / LINK_100M, s) / 1e6:,.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="throughput runs per cell; the median is shown"
    )
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args.quick, args.repeats))
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
