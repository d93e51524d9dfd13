"""korinet-chat across hubs: many clients in one room over three hubs sharing it
through NATS, against the same clients on one hub without a bus; then a hub killed.

    python bench/chat_cluster.py [--clients 600] [--workers 4] [--runs 3]
    python bench/chat_cluster.py --quick        # 60 clients, 1 run: a minute

Processes: one ``nats-server -js`` (Debian package nats-server) on a loopback port;
the hubs, each a process of this script (``--hub``) running what ``korinet-chat
serve`` runs (history in memory, flood control off, and more than the default 256
connections per address: every client here is 127.0.0.1); the clients,
headless ``ChatClient``s in ``--workers`` processes of this script (``--worker``),
client i on hub i mod hubs, all in one room. Each run, for each set-up in turn
(alternating, so that a change in the machine's load hits both):

* **flood**: ``senders`` clients send ``messages`` lines each at once; the time from
  the first send to the last line at the last member gives messages/s through the
  room and deliveries/s (messages x members).
* **paced**: the same senders send ``--rate`` lines/s in all, ``--paced`` seconds;
  p50/p99 of the time from a line's send to its arrival at the last member (one
  machine: one clock).
* **hub killed** (three hubs): hub 0 (a third of the members) is killed (-9), the
  senders of hubs 1 and 2 say a burst of lines at once, hub 0 is started again on
  its port; the time from the kill (and from the restart) until every one of its
  members is back and shows every line of the burst. Client failover to another
  hub is not on main yet: the members reconnect to the restarted hub.

Cost: deliveries per CPU-second of the hubs (and of nats-server), from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "nats" / "tests"))
from nats_server import NatsServer

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---------------------------------------------------------------------- worker


async def worker() -> None:
    """Clients in this process, driven by JSON lines on stdin; answers on stdout."""
    from korinet_chat.client import ChatClient
    from korinet_chat.hub import chat_plugins

    from korinet.plugins import PluginManager

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    setup = json.loads(await reader.readline())
    ports, room, hubs = setup["ports"], setup["room"], len(setup["ports"])
    indexes = list(range(setup["first"], setup["first"] + setup["count"]))
    plugins = chat_plugins(PluginManager.load(entry_points=False))
    clients: dict[int, ChatClient] = {}
    # phase -> client -> texts of that phase it showed. By the text's own phase, not
    # the current one: another worker's senders may start before this worker reads
    # the command that starts the phase here.
    seen: dict[str, dict[int, set[str]]] = {}
    last: dict[str, dict[str, float]] = {}  # phase -> text -> latest arrival among ours
    doubles: dict[str, int] = {}
    changed = asyncio.Event()

    def listener(index: int):  # type: ignore[no-untyped-def]
        def on_line(line) -> None:  # type: ignore[no-untyped-def]
            if line.kind != "msg" or line.room != room or "|" not in line.text:
                return
            phase = line.text.split("|", 1)[0]
            texts = seen.setdefault(phase, {}).setdefault(index, set())
            if line.text in texts:
                doubles[phase] = doubles.get(phase, 0) + 1
                return
            texts.add(line.text)
            last.setdefault(phase, {})[line.text] = time.time()
            changed.set()

        return on_line

    async def start(i: int) -> None:
        client = ChatClient("127.0.0.1", ports[i % hubs], f"c{i}", room=room, plugins=plugins)
        client.listeners.append(listener(i))
        await client.start(open_timeout=120)
        clients[i] = client

    started = time.perf_counter()
    for batch in range(0, len(indexes), 25):
        await asyncio.gather(*(start(i) for i in indexes[batch : batch + 25]))
    say({"ready": time.perf_counter() - started})

    async def send(client: ChatClient, phase: str, sender: int, count: int, interval: float) -> None:
        for k in range(count):
            client.say(f"{phase}|{sender}|{k}|{time.time():.6f}")
            if interval:
                await asyncio.sleep(interval)

    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "stop":
            break
        phase = cmd["phase"]
        got = seen.setdefault(phase, {})
        senders = [i for i in indexes if i % hubs not in cmd.get("quiet_hubs", [])][: cmd["senders"]]
        talking = [
            loop.create_task(send(clients[i], phase, i, cmd["messages"], cmd["interval"])) for i in senders
        ]
        watched = [i for i in indexes if i % hubs in cmd.get("watch_hubs", [])]
        deadline = loop.time() + cmd["timeout"]

        def short(i: int, got: dict[int, set[str]] = got, expect: int = cmd["expect"]) -> int:
            return max(0, expect - len(got.get(i, ())))

        while any(short(i) for i in indexes) and loop.time() < deadline:
            changed.clear()
            with contextlib_suppress_timeout():
                await asyncio.wait_for(changed.wait(), 1.0)
        await asyncio.gather(*talking)
        arrivals = last.get(phase, {})
        caught_up = max((max(arrivals[t] for t in got[i]) for i in watched if got.get(i)), default=None)
        say(
            {
                "phase": phase,
                "complete": not any(short(i) for i in indexes),
                "short": sum(short(i) for i in indexes),
                "doubles": doubles.get(phase, 0),
                "short_clients": [  # which, on which hub, in what state: to look into it
                    [i, i % hubs, clients[i].state, len(got.get(i, ())), sorted(view_of(clients[i], room))]
                    for i in indexes
                    if short(i)
                ][:5],
                "last": arrivals,
                "watched_done": caught_up,
            }
        )
    for client in clients.values():
        await client.close()


def view_of(client: Any, room: str) -> list[Any]:
    """What a client's display of the room says of itself (seen, held back, dropped as
    duplicates, the shown line kinds) for a client short of lines."""
    view = client.rooms.get(room)
    kinds: dict[str, int] = {}
    for line in client.lines:
        kinds[line.kind] = kinds.get(line.kind, 0) + 1
    return [("seen", view.seen if view else None), ("held", len(view.held) if view else None),
            ("dups", client.duplicates_dropped), *kinds.items()]  # fmt: skip


class contextlib_suppress_timeout:  # noqa: N801 (a context manager named as one)
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, *_: object) -> bool:
        return kind is TimeoutError


# ---------------------------------------------------------------------- driver


class Workers:
    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.logs: list[Path] = []

    async def start(self, ports: list[int], clients: int, workers: int, room: str, home: str) -> float:
        per = -(-clients // workers)
        for first in range(0, clients, per):
            self.logs.append(Path(home) / f"worker-{room}-{first}.log")
            with open(self.logs[-1], "ab") as log:  # the clients' warnings
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--worker",
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                )  # fmt: skip
            self.procs.append(proc)
            setup = {"ports": ports, "room": room, "first": first, "count": min(per, clients - first)}
            self._send(proc, setup)
        answers = await self._answers(300)
        return max(a["ready"] for a in answers)

    def _send(self, proc: asyncio.subprocess.Process, obj: dict[str, Any]) -> None:
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(obj) + "\n").encode())

    async def _answers(self, timeout: float) -> list[dict[str, Any]]:
        async def one(proc: asyncio.subprocess.Process) -> dict[str, Any]:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            if not line:
                log = self.logs[self.procs.index(proc)].read_text()
                raise RuntimeError(f"a worker died: {log[-3000:]}")
            answer: dict[str, Any] = json.loads(line)
            return answer

        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in self.procs)), timeout)

    def command(self, **cmd: Any) -> None:
        for proc in self.procs:
            self._send(proc, cmd)

    async def results(self, timeout: float) -> list[dict[str, Any]]:
        return await self._answers(timeout + 30)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib_suppress_oserror():
                    self._send(proc, {"cmd": "stop"})
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class contextlib_suppress_oserror:  # noqa: N801
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, *_: object) -> bool:
        return kind is not None and issubclass(kind, OSError)  # type: ignore[arg-type]


async def hub() -> None:
    """A hub as ``korinet-chat serve --db :memory: --rate 0 --insecure-plaintext`` makes
    it, but taking more than the server's 256 connections per address: every client
    of the bench comes from 127.0.0.1."""
    from korinet_chat.hub import ChatHub, HubSettings

    from korinet.cli import wait_for_stop_signal
    from korinet.cluster import bus_for

    cluster, port = sys.argv[sys.argv.index("--hub") + 1 :][:2]
    chat = ChatHub(":memory:", settings=HubSettings(rate=0), bus=bus_for(cluster) if cluster != "-" else None)
    await chat.start()
    server = chat.server("127.0.0.1", int(port), max_connections_per_address=10_000)
    await server.start()
    print(f"korinet-chat hub on 127.0.0.1:{server.port},", flush=True)
    await wait_for_stop_signal()
    await server.close()
    await chat.aclose()


async def hub_process(
    cluster: str | None, home: str, port: int = 0
) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--hub", cluster or "-", str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "KORINET_HOME": home},
    )  # fmt: skip
    assert proc.stdout is not None
    first = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    if not first.startswith("korinet-chat hub on"):
        raise RuntimeError(f"the hub did not start: {first!r}")
    return proc, int(first.split(":")[1].split(",")[0])


def merge(answers: list[dict[str, Any]]) -> tuple[dict[str, float], bool, int, int]:
    """Every text's arrival at the last member, whether all got all, how many
    deliveries are missing, how many came twice."""
    for a in answers:
        if a["short_clients"]:
            print(f"  short in phase {a['phase']}: {a['short_clients']}", file=sys.stderr)
    last: dict[str, float] = {}
    for a in answers:
        for text, t in a["last"].items():
            last[text] = max(t, last.get(text, 0.0))
    return (
        last,
        all(a["complete"] for a in answers),
        sum(a["short"] for a in answers),
        sum(a["doubles"] for a in answers),
    )


def sent_at(text: str) -> float:
    return float(text.rsplit("|", 1)[1])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def one_setup(args: argparse.Namespace, name: str, cluster: str | None, hubs: int, room: str,
                    home: str, nats_pid: int | None) -> dict[str, Any]:  # fmt: skip
    procs = [await hub_process(cluster, home) for _ in range(hubs)]
    ports = [port for _, port in procs]
    workers = Workers()
    out: dict[str, Any] = {"set-up": name}
    try:
        out["connect_s"] = await workers.start(ports, args.clients, args.workers, room, home)
        print(f"  {name}: {args.clients} clients in, {out['connect_s']:.1f} s", file=sys.stderr)

        def cpu() -> float:
            return sum(cpu_seconds(p.pid) for p, _ in procs)

        # flood
        per_worker = -(-args.senders // args.workers)
        total = per_worker * args.workers * args.messages
        cpu0, nats0 = cpu(), cpu_seconds(nats_pid) if nats_pid else 0.0
        workers.command(cmd="send", phase="f", senders=per_worker, messages=args.messages,
                        interval=0, expect=total, timeout=args.phase_timeout)  # fmt: skip
        answers = await workers.results(args.phase_timeout)
        last, complete, short, doubles = merge(answers)
        first_send = min(sent_at(t) for t in last)
        elapsed = max(last.values()) - first_send
        print(f"  {name}: flood {len(last)} lines, {elapsed:.1f} s, complete {complete}", file=sys.stderr)
        hub_cpu = cpu() - cpu0
        out.update(
            flood_complete=complete and len(last) == total, flood_short=short, flood_doubles=doubles,
            msgs_per_s=total / elapsed, deliveries_per_s=total * args.clients / elapsed,
            deliveries_per_hub_cpu_s=total * args.clients / hub_cpu, hub_cpu_s=hub_cpu,
            nats_cpu_s=(cpu_seconds(nats_pid) - nats0) if nats_pid else 0.0,
        )  # fmt: skip
        # paced
        count = max(1, int(args.rate * args.paced / (per_worker * args.workers)))
        interval = per_worker * args.workers / args.rate
        workers.command(
            cmd="send",
            phase="p",
            senders=per_worker,
            messages=count,
            interval=interval,
            expect=per_worker * args.workers * count,
            timeout=args.paced + args.phase_timeout,
        )
        last, complete, short, doubles = merge(await workers.results(args.paced + args.phase_timeout))
        latencies = [last[t] - sent_at(t) for t in last]
        out.update(
            paced_complete=complete, paced_short=short, paced_doubles=doubles,
            p50_ms=pct(latencies, 0.5) * 1000, p99_ms=pct(latencies, 0.99) * 1000,
        )  # fmt: skip
        if hubs > 1:
            # hub 0 killed; hubs 1 and 2's senders say a burst at once; hub 0 started
            # again on its port: until each of its members shows the burst
            count = max(1, args.messages // 2)
            killed = time.time()
            procs[0][0].kill()
            await procs[0][0].wait()
            workers.command(cmd="send", phase="k", senders=per_worker, messages=count, interval=0,
                            expect=per_worker * args.workers * count, quiet_hubs=[0], watch_hubs=[0],
                            timeout=args.phase_timeout)  # fmt: skip
            procs[0] = await hub_process(cluster, home, port=ports[0])
            restarted = time.time()
            answers = await workers.results(args.phase_timeout)
            last, complete, short, doubles = merge(answers)
            done = max(a["watched_done"] or 0.0 for a in answers)
            out.update(
                failover_complete=complete, failover_short=short, failover_doubles=doubles,
                hub_restart_s=restarted - killed, members_back_s=done - killed,
                after_restart_s=done - restarted, killed_members=len(range(0, args.clients, hubs)),
            )  # fmt: skip
    finally:
        await workers.stop()
        for proc, _ in procs:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
    return out


async def main_async(args: argparse.Namespace) -> None:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServer(Path(tmp) / "nats").start()
        try:
            assert nats.proc is not None
            for run in range(args.runs):
                for n, (name, hubs, cluster) in enumerate(
                    [("1 hub, no bus", 1, None), ("3 hubs + NATS", 3, nats.url)]
                ):
                    if str(hubs) not in args.setups:
                        continue
                    out = await one_setup(args, name, cluster, hubs, f"r{run}s{n}", tmp,
                                          nats.proc.pid if cluster else None)  # fmt: skip
                    out["run"] = run + 1
                    results.append(out)
                    print(json.dumps(out), flush=True)
        finally:
            nats.stop()
    print(f"\n{args.clients} clients in one room, {args.workers} client processes; "
          f"flood {args.senders} x {args.messages}, paced {args.rate:g}/s\n")  # fmt: skip
    keys = ["msgs_per_s", "deliveries_per_s", "p50_ms", "p99_ms", "deliveries_per_hub_cpu_s",
            "hub_cpu_s", "nats_cpu_s", "hub_restart_s", "members_back_s", "after_restart_s"]  # fmt: skip
    print("| set-up | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name in ("1 hub, no bus", "3 hubs + NATS"):
        row = []
        for key in keys:
            values = [r[key] for r in results if r["set-up"] == name and key in r]
            row.append(
                "-" if not values
                else f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"
            )  # fmt: skip
        print(f"| {name} | " + " | ".join(row) + " |")
    bad = [r for r in results if not all(v for k, v in r.items() if k.endswith("_complete"))]
    lost = sum(r.get(k, 0) for r in results for k in ("flood_short", "paced_short", "failover_short"))
    doubled = sum(
        r.get(k, 0) for r in results for k in ("flood_doubles", "paced_doubles", "failover_doubles")
    )
    print(f"\nruns not complete: {len(bad)}; deliveries missing: {lost}; shown twice: {doubled}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=600)
    p.add_argument("--workers", type=int, default=4, help="client processes")
    p.add_argument("--senders", type=int, default=12)
    p.add_argument("--messages", type=int, default=20, help="per sender, in the flood")
    p.add_argument("--rate", type=float, default=10.0, help="lines/s in all, paced")
    p.add_argument("--paced", type=float, default=10.0, help="seconds of paced talk")
    p.add_argument("--outage-talk", type=float, default=6.0, help="seconds of talk around the hub kill")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--setups", default="13", help="1: one hub, 3: three hubs (default both)")
    p.add_argument("--phase-timeout", type=float, default=120.0, help="seconds a phase may take")
    p.add_argument("--quick", action="store_true", help="60 clients, 2 processes, 1 run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    if "--hub" in sys.argv:
        asyncio.run(hub())
        return
    args = p.parse_args()
    if args.worker:
        asyncio.run(worker())
        return
    if args.quick:
        args.clients, args.workers, args.runs, args.paced, args.outage_talk = 60, 2, 1, 4.0, 4.0
        args.senders, args.messages = 6, 10
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
