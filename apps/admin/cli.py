"""The korinet-admin command: ``agent`` on managed hosts; ``exec``, ``attach``, ``jobs``,
``status``, ``put`` and ``get`` from anywhere (docs/ADMIN.md).

Start-up time matters here (``exec host -- true`` is compared with ssh): modules
are imported where they are needed, not at the top.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from korinet.security import ClientTLS

    from .execclient import AdminConnection, Target

__all__ = ["main"]

PROG = "korinet-admin"
#: ssh's code for "the remote command did not run because of the tool itself".
FAILURE = 255
#: Defaults shown in --help (kept equal to those of runner.py and jobs.py, which the
#: client does not import at start-up; a test checks they agree).
OUTAGE_LIMIT = 60.0
RETENTION = 24 * 3600.0
JOB_CAP = 2 << 30
TOTAL_CAP = 10 << 30
DEFAULT_RELAY_PORT = 1238  # protocol.DEFAULT_RELAY_PORT (a test checks they agree)
#: 128 + SIGPIPE: what the shell reports for a tool whose reader (`| head`) left.
PIPE_CLOSED = 141


class _Failure(Exception):
    """korinet-admin cannot go on; the message is the one line the user reads (exit 255)."""


def _err(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _identity_error(exc: OSError | ValueError) -> str:
    """The one line for an identity that cannot be used, naming the file and the fix."""
    from korinet.security import korinet_home

    if isinstance(exc, PermissionError) and exc.filename is None:
        return str(exc)  # too open: Identity names the file and the chmod
    if isinstance(exc, OSError) and exc.filename is not None:
        name = exc.filename
        return (
            f"cannot read {name}: {exc.strerror}; it must be yours and private: "
            f"chown $(id -un) {name} && chmod 600 {name} (or set KORINET_HOME)"
        )
    return f"cannot use the identity in {korinet_home()}: {exc} (`korinet id` shows it)"


# ---------------------------------------------------------------------- shared client bits


def _client_tls(args: argparse.Namespace, key: str | None = None) -> ClientTLS | None:
    """Our TLS settings; ``key``: accept only this agent key (pinned in the inventory)."""
    if args.insecure_plaintext:
        _err("WARNING: --insecure-plaintext: no encryption, no server key check; use on loopback only")
        return None
    from korinet.cli import load_identity, pinning_notice
    from korinet.security import ClientTLS

    try:
        identity = load_identity(
            "korinet-admin",
            hint="on each agent run: korinet authorize {fingerprint} --name NAME --role admin",
        )
    except (OSError, ValueError) as exc:
        raise _Failure(_identity_error(exc)) from None
    notice = pinning_notice("korinet-admin", where="the agent")
    return ClientTLS(identity, fingerprint=key, on_first_use=notice)


async def _connect(args: argparse.Namespace, target: Target, tls: ClientTLS | None) -> AdminConnection | None:
    from korinet import KoriNetError

    from .execclient import AdminConnection, explain

    try:
        return await AdminConnection.open(
            target, tls=tls, open_timeout=args.connect_timeout, outage_limit=args.outage_limit
        )
    except (KoriNetError, OSError) as exc:
        _err(f"{target.label}: {explain(exc)}")
        return None


def _explain(error: BaseException) -> str:
    from .execclient import explain

    return explain(error)


def _one_target(text: str) -> tuple[Target, str | None]:
    """One host: an inventory name (its address and pinned key) or HOST[:PORT]."""
    from .execclient import parse_targets
    from .inventory import load_inventory

    host = load_inventory().hosts.get(text)
    targets = parse_targets(host.address if host is not None else text)
    if len(targets) != 1:
        raise ValueError("give one host here")
    return targets[0], host.key if host is not None else None


# ---------------------------------------------------------------------- exec


async def _exec(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import signal

    from .execclient import _ThreadReader
    from .fleet import Fleet, FleetOptions, Outcome, fleet_exit_code, interrupt_keys, resolve
    from .inventory import load_inventory

    hosts = resolve(args.hosts, load_inventory())
    several = len(hosts) > 1
    if args.tty and several:
        _err("--tty works with one host only")
        return 2
    if args.output_dir is not None:
        try:
            args.output_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            _err(f"--output-dir {args.output_dir}: {exc.strerror or exc}")
            return 2
    tls = _client_tls(args)

    def on_outcome(outcome: Outcome) -> None:
        if args.json:
            sys.stdout.write(json.dumps(outcome.record()) + "\n")
            sys.stdout.flush()

    options = FleetOptions(
        argv=args.command,
        fanout=args.fanout,
        connect_timeout=args.connect_timeout,
        outage_limit=args.outage_limit,
        shell=args.shell,
        tty=args.tty,
        timeout=args.timeout,
        stdin=not (args.no_stdin or several),
        job_id=args.job,
        json=args.json,
        output_dir=args.output_dir,
    )
    terminal = sys.stderr if sys.stderr.isatty() else None
    fleet = Fleet(hosts, options, tls, on_outcome=on_outcome, terminal=terminal)
    loop = asyncio.get_running_loop()
    # On a terminal a fan-out asks what Ctrl-C means; elsewhere (and for one host) it
    # escalates: SIGINT, SIGTERM, SIGKILL to the remote commands, then quit.
    interactive = several and sys.stdin.isatty() and sys.stderr.isatty()
    presses = 0
    choice: asyncio.Future[str] | None = None
    pending: set[asyncio.Task[Any]] = set()

    def escalate() -> None:
        nonlocal presses
        presses += 1
        if presses > 3:
            fleet.say("interrupted again: leaving; the jobs keep running (see: korinet-admin jobs HOST)")
            fleet.cancel("quit")
            return
        sig = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)[presses - 1]
        nxt = {1: " (Ctrl-C again: SIGTERM)", 2: " (Ctrl-C again: SIGKILL)", 3: " (Ctrl-C again: quit)"}
        fleet.say(f"sending {sig.name} to the remote command{'s' if several else ''}{nxt[presses]}")
        pending.update(fleet.signal_all(sig))

    async def ask() -> None:
        nonlocal choice
        choice = loop.create_future()
        fleet.progress.finish()
        fleet.progress.paused = True
        sys.stderr.write(
            "\nCtrl-C: [s]top the remote commands, [d]etach (they keep running), [c]ontinue? [s] "
        )
        sys.stderr.flush()
        reader = _ThreadReader(sys.stdin.fileno(), 1024)
        typed = loop.create_task(reader.get())

        def answered(task: asyncio.Task[bytes]) -> None:
            if choice is not None and not choice.done() and not task.cancelled():
                choice.set_result(interrupt_keys(task.result()))

        typed.add_done_callback(answered)
        answer = await choice
        typed.cancel()
        fleet.progress.paused = False
        if answer == "s":
            escalate()
        elif answer == "d":
            fleet.say("detached: the remote commands keep running")
            fleet.cancel("detached")

    def interrupt() -> None:
        if interactive and choice is None:
            pending.add(loop.create_task(ask()))
        elif choice is not None and not choice.done():
            choice.set_result("s")  # Ctrl-C at the question: stop
        else:
            escalate()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        outcomes = await fleet.run()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        for task in pending:
            task.cancel()
        if choice is not None and not choice.done():
            sys.stderr.write("\n")  # every host ended while the question was open
    if several and not args.json:
        print(fleet.summary(), file=sys.stderr, flush=True)
    for o in outcomes:
        if o.state == "lost" and o.job and o.reason.startswith("detached"):
            print(f"{o.host}: {_attach_line(o.host, o.job)}", file=sys.stderr, flush=True)
    _record_seen(outcomes)
    return fleet_exit_code(outcomes)


def _attach_line(host: str, job: str) -> str:
    from .fleet import attach_command

    return attach_command(host, job)


def _record_seen(outcomes: list[Any]) -> None:
    from .inventory import record_seen

    try:
        record_seen({o.host: (o.state, o.detail) for o in outcomes})
    except OSError as exc:  # the run happened; only the bookkeeping failed
        _err(f"cannot record the hosts' states: {exc}")


async def _hosts(args: argparse.Namespace) -> int:
    import time

    from .inventory import age, load_inventory, load_seen

    inventory = load_inventory()
    if not inventory.hosts:
        print(f"no hosts in {inventory.path} (docs/ADMIN.md, Fleet, shows the format)")
        return 0
    if args.groups:
        groups = inventory.groups()
        width = max(len(g) for g in groups) + 1
        for group, members in groups.items():
            print(f"{'@' + group:<{width}}  {len(members):>4}  {', '.join(members)}")
        return 0
    hosts = inventory.select(args.selection) if args.selection else list(inventory.hosts.values())
    relayed = await _relay_states(hosts, args.timeout)  # asked before reading hosts-seen.json
    seen = load_seen()
    now = time.time()
    rows = [("NAME", "ADDRESS", "GROUPS", "KEY", *(("RELAY",) if relayed else ()), "LAST SEEN")]
    for host in hosts:
        key = host.key[:15] + "…" if host.key else "-"
        last = seen.get(host.name)
        if isinstance(last, dict) and "state" in last:
            when = age(now - float(last.get("at", now)))
            detail = f" ({last['detail']})" if last.get("detail") else ""
            state = f"{last['state']}{detail}, {when}"
        else:
            state = "never"
        relay = (relayed.get(host.name, "-"),) if relayed else ()
        rows.append((host.name, host.address, ",".join(host.groups) or "-", key, *relay, state))
    columns = len(rows[0]) - 1
    widths = [max(len(r[i]) for r in rows) for i in range(columns)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    return 0


async def _relay_states(hosts: list[Any], timeout: float) -> dict[str, str]:
    """What the relay of each dial-home host (``RELAY[:PORT]/AGENT``) says of it, by
    host name: ``parked``, ``not parked (seen …)`` or ``relay unreachable (…)``. Each
    relay is asked once, about its agents in ``hosts`` only (it answers no more)."""
    import asyncio

    from .execclient import parse_targets
    from .inventory import age
    from .relay import query_relay

    by_relay: dict[tuple[str, int], dict[str, str]] = {}  # relay -> {host name: agent name}
    for host in hosts:
        try:
            (target,) = parse_targets(host.address)
        except ValueError:
            continue
        if target.agent is not None:
            by_relay.setdefault((target.host, target.port), {})[host.name] = target.agent

    async def ask(relay: tuple[str, int], agents: dict[str, str]) -> dict[str, str]:
        try:
            answers = await query_relay(*relay, sorted(set(agents.values())), timeout)
        except TimeoutError:
            return dict.fromkeys(agents, f"relay unreachable (no answer within {timeout:g}s)")
        except ConnectionRefusedError:
            return dict.fromkeys(agents, "relay unreachable (connection refused)")
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            return dict.fromkeys(agents, f"relay unreachable ({reason})")
        states = {}
        for name, agent in agents.items():
            answer = answers[agent]
            if answer.parked:
                states[name] = "parked"
            elif answer.seen is None:
                states[name] = "not parked (never seen)"  # since the relay started
            else:
                states[name] = f"not parked (seen {age(answer.seen)})"
        return states

    states: dict[str, str] = {}
    for found in await asyncio.gather(*(ask(relay, agents) for relay, agents in by_relay.items())):
        states.update(found)
    return states


# ---------------------------------------------------------------------- attach, jobs, status


async def _attach(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from korinet import KoriNetError, KoriNetTimeout, MessageRejected

    from .execclient import StdSink
    from .protocol import exit_status
    from .runner import outage_message

    target, key = _one_target(args.host)
    offsets = None
    if args.offsets:
        try:
            out, err = (int(x) for x in args.offsets.split(","))
            offsets = [out, err]
        except ValueError:
            _err("--from takes STDOUT,STDERR byte offsets, e.g. --from 1024,0")
            return 2
    conn = await _connect(args, target, _client_tls(args, key))
    if conn is None:
        return FAILURE
    conn.notify = lambda line: _err(f"{target.label}: {line}")
    loop = asyncio.get_running_loop()
    try:
        run = await conn.attach(args.job, StdSink(), offsets)
        presses = 0

        def interrupt() -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                _err("detached; the job keeps running")
            run._fail(KeyboardInterrupt())

        loop.add_signal_handler(signal.SIGINT, interrupt)
        try:
            notice = await run.wait()
        except KeyboardInterrupt:
            return 130
        return exit_status(notice)
    except MessageRejected as exc:
        _err(f"{target.label}: {_explain(exc)}")
        return FAILURE
    except KoriNetTimeout as exc:
        if conn.client.is_closed:  # the outage limit: the agent is gone, the job is not
            _err(outage_message(target.label, args.job, args.outage_limit))
        else:
            _err(f"{target.label}: {_explain(exc)}")
        return FAILURE
    except KoriNetError as exc:
        _err(f"{target.label}: {_explain(exc)}")
        return FAILURE
    finally:
        await conn.close()


async def _ask(args: argparse.Namespace, request_type: str) -> Any:
    """Connect to the one host in ``args``, make one request, close: the reply, or
    None (the user was told why)."""
    from korinet import KoriNetError

    target, key = _one_target(args.host)
    conn = await _connect(args, target, _client_tls(args, key))
    if conn is None:
        return None
    try:
        return await conn.request({}, request_type)
    except KoriNetError as exc:
        _err(f"{target.label}: {_explain(exc)}")
        return None
    finally:
        await conn.close()


async def _jobs(args: argparse.Namespace) -> int:
    import time

    from .protocol import JOBS, exit_status

    jobs = await _ask(args, JOBS)
    if jobs is None:
        return FAILURE
    if not jobs:
        print("no jobs")
        return 0
    print(f"{'JOB':<32}  {'STATE':<9} {'EXIT':>4}  {'STARTED':<19}  {'OUTPUT':>10}  COMMAND")
    for job in sorted(jobs, key=lambda j: j["started"]):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["started"]))
        code = "" if job["exit"] is None else str(exit_status(job["exit"]))
        state = job["state"] + ("" if job["state"] != "exited" or job["collected"] else "*")
        output = _size(job["stdout"] + job["stderr"])
        print(f"{job['job']:<32}  {state:<9} {code:>4}  {started}  {output:>10}  {_command(job['argv'])}")
    if any(j["state"] == "exited" and not j["collected"] for j in jobs):
        print("* nobody has collected its exit yet: korinet-admin attach HOST JOB")
    return 0


def _command(argv: list[str]) -> str:
    import shlex

    text = shlex.join(argv)
    return text if len(text) <= 60 else text[:57] + "..."


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


async def _status(args: argparse.Namespace) -> int:
    from .protocol import STATUS

    st = await _ask(args, STATUS)
    if st is None:
        return FAILURE
    up = int(st["uptime"])
    days, rest = divmod(up, 86400)
    hours, rest = divmod(rest, 3600)
    print(f"{st['hostname']} ({st['system']}, {st['cpus']} CPUs)")
    print(f"up      {days}d {hours:02d}:{rest // 60:02d}   load {' '.join(f'{x:.2f}' for x in st['load'])}")
    mem = st["memory"]
    used = _size(mem["total"] - mem["available"])
    print(
        f"memory  {used} used of {_size(mem['total'])} ({mem['percent']:.0f}%)"
        f", swap {_size(st['swap']['used'])} of {_size(st['swap']['total'])}"
    )
    for disk in st["disks"]:
        print(
            f"disk    {disk['mount']:<20} {_size(disk['used']):>10} of {_size(disk['total']):>10} "
            f"({disk['percent']:.0f}%) {disk['fstype']}"
        )
    print(f"jobs    {st['jobs']} held by the agent")
    return 0


# ---------------------------------------------------------------------- put, get

TRANSFER_DESCRIPTION = (
    "{what}, in 1 MiB chunks checked with SHA-256. An interrupted copy (a cut, Ctrl-C, a restart) "
    "resumes from where it stopped when run again; the destination appears only once it is whole, "
    "renamed over any file of that name. On a terminal a progress line shows the bytes the other "
    "side has written, percent, rate and time left."
)
SETID_HELP = (
    "keep the setuid, setgid and sticky bits of the file's mode (dropped by default: a setuid "
    "file written by a root agent is a root shell for whoever may run it)"
)


async def _put(args: argparse.Namespace) -> int:
    from pathlib import Path

    from korinet import KoriNetError

    from .progress import Meter
    from .transfer import TransferError, put_file

    source = Path(args.source)
    if not source.is_file():
        _err(f"{source}: not a readable file")
        return 1
    remote = args.destination
    if remote.endswith("/"):
        remote += source.name
    target, key = _one_target(args.host)
    conn = await _connect(args, target, _client_tls(args, key))
    if conn is None:
        return FAILURE
    meter = Meter(f"{source.name} -> {target.label}")
    try:
        done = await put_file(conn.client, source, remote, progress=meter, preserve_setid=args.preserve_setid)
    except (KoriNetError, TransferError, OSError) as exc:
        meter.finish()
        _err(f"put {source} -> {target.label}:{remote}: {exc}")
        return FAILURE
    finally:
        await conn.close()
    meter.finish()
    print(f"{source} -> {target.label}:{done['path']} (sha256 {done['sha256'][:16]}..., verified)")
    return 0


async def _get(args: argparse.Namespace) -> int:
    from pathlib import Path

    from korinet import KoriNetError

    from .progress import Meter
    from .transfer import TransferError, get_file

    destination = Path(args.destination)
    if destination.is_dir():
        destination = destination / Path(args.source).name
    target, key = _one_target(args.host)
    conn = await _connect(args, target, _client_tls(args, key))
    if conn is None:
        return FAILURE
    meter = Meter(f"{target.label}:{Path(args.source).name} -> {destination}")
    try:
        info = await get_file(
            conn.client, args.source, destination, progress=meter, preserve_setid=args.preserve_setid
        )
    except (KoriNetError, TransferError, OSError) as exc:
        meter.finish()
        _err(f"get {target.label}:{args.source} -> {destination}: {exc}")
        return FAILURE
    finally:
        await conn.close()
    meter.finish()
    print(f"{target.label}:{info['path']} -> {destination} (sha256 {info['sha256'][:16]}..., verified)")
    return 0


# ---------------------------------------------------------------------- agent


async def _agent(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    from pathlib import Path

    from korinet.cli import parse_address, wait_for_stop_signal
    from korinet.runtime import Server
    from korinet.runtime.server import raise_open_file_limit
    from korinet.security import AuthorizedKeys, Identity, ServerTLS, korinet_home
    from korinet.session import SessionConfig

    from .agent import DEFAULT_AGENT_PORT, Agent
    from .audit import AuditLog
    from .execclient import admin_plugins
    from .policy import DEFAULT_POLICY, Policy

    relays: list[tuple[str, int]] = []
    try:
        listen = args.listen or ("127.0.0.1:0" if args.connect else "127.0.0.1")
        host, port = parse_address(listen, DEFAULT_AGENT_PORT)
        for item in (args.connect or "").split(","):
            if item.strip():
                relays.append(parse_address(item.strip(), DEFAULT_RELAY_PORT))
    except argparse.ArgumentTypeError as exc:
        _err(str(exc))
        return 2
    if relays and args.insecure_plaintext:
        _err("agent: --connect needs TLS: clients authenticate the agent through the relay")
        return 2
    if args.insecure_plaintext and not _is_loopback(host):
        _err(f"agent: --insecure-plaintext serves loopback only (anyone reaching {host} could run commands)")
        return 2
    state_dir = Path(args.state_dir) if args.state_dir else korinet_home() / "admin"
    try:
        policy = Policy.load(Path(args.policy)) if args.policy else DEFAULT_POLICY
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        audit = AuditLog(Path(args.audit_log) if args.audit_log else state_dir / "audit.log")
        tls = None
        if not args.insecure_plaintext:
            try:
                identity = Identity.load_or_create()
            except (OSError, ValueError) as exc:
                _err(f"agent: {_identity_error(exc)}")
                return 1
            tls = ServerTLS(identity, authorized=AuthorizedKeys())
    except (OSError, ValueError) as exc:
        _err(f"agent: {exc}")
        return 1
    # Before the Server sizes its cap of connections without a session from it.
    open_files, _ = raise_open_file_limit()
    agent = Agent(
        state_dir, policy=policy, audit=audit, insecure=args.insecure_plaintext, keep_jobs=True,
        retention=args.retention, job_cap=args.job_cap, total_cap=args.total_cap,
    )  # fmt: skip
    server = Server(
        host,
        port,
        tls=tls,
        plugins=admin_plugins(),
        accept_plain=False,
        session_ttl=args.session_ttl,
        handler=agent.session,
        legacy=False,
        config=SessionConfig(handshake_timeout=args.handshake_timeout),
    )
    agent.bind(server)
    try:
        await server.start()
    except OSError as exc:
        _err(f"agent: cannot listen on {host}:{port}: {exc.strerror or exc}")
        await agent.close()
        return 1
    say = print
    say(f"{PROG} agent on {host}:{server.port}", flush=True)
    if tls is None:
        _err(
            "WARNING: --insecure-plaintext: no TLS and no authentication: ANYONE who can reach "
            f"{host}:{server.port} can run commands as this user"
        )
    else:
        assert tls.authorized is not None
        try:
            count = len(tls.authorized.entries())
        except ValueError as exc:
            _err(f"agent: {exc}")
            await server.close()
            await agent.close()
            return 1
        say(f"TLS 1.3, agent key {tls.identity.fingerprint}")
        say(f"{count} authorized key(s) in {tls.authorized.path}; clients need the role 'admin'")
    say(
        f"policy: {policy.source}"
        + ("  (the admin role may run anything)" if policy is DEFAULT_POLICY else "")
    )
    if agent.jobs.jobs:
        running = sum(1 for j in agent.jobs.jobs.values() if not j.done.done())
        say(f"jobs: {len(agent.jobs.jobs)} kept from an earlier agent, {running} of them running")
    say(
        f"open files: {open_files if open_files >= 0 else 'no limit'}; at most "
        f"{server.hub.max_handshaking} connections without a session, "
        f"{args.handshake_timeout:g}s each to authenticate"
    )
    dial = None
    if relays:
        import socket

        from .dialhome import DialHome

        assert tls is not None
        name = args.name or socket.gethostname().split(".")[0]
        dial = DialHome(server.hub, server.ssl, tls.identity, relays, name)
        dial.start()
        say(f"dialing home as {name!r} to " + ", ".join(f"{h}:{p}" for h, p in relays))

        async def parked() -> None:
            await dial.registered.wait()
            say(f"parked at the relay as {name!r}: clients reach us as RELAY/{name}", flush=True)

        announce = asyncio.get_running_loop().create_task(parked())
    say(f"state: {state_dir}   audit log: {audit.path}", flush=True)
    audit.record(
        "agent-started", listen=f"{host}:{server.port}", tls=tls is not None, policy=policy.source,
        relays=[f"{h}:{p}" for h, p in relays],
    )  # fmt: skip
    await wait_for_stop_signal()
    if dial is not None:
        announce.cancel()
        await dial.close()
    logging.getLogger(__name__).info("stopping")
    running = sum(1 for j in agent.jobs.jobs.values() if not j.done.done())
    say(f"stopping ({running} running job(s) keep running; the next agent adopts them)", flush=True)
    audit.record("agent-stopped", running_jobs=running)
    await server.close()
    await agent.close()
    return 0


async def _relay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from korinet.cli import parse_address, wait_for_stop_signal
    from korinet.runtime.server import raise_open_file_limit
    from korinet.security import AuthorizedKeys, korinet_home

    from .relay import Relay

    try:
        host, port = parse_address(args.listen, DEFAULT_RELAY_PORT)
    except argparse.ArgumentTypeError as exc:
        _err(str(exc))
        return 2
    path = Path(args.agents) if args.agents else korinet_home() / "relay_agents"
    agents = AuthorizedKeys(path)
    try:
        count = len(agents.entries())
    except (OSError, ValueError) as exc:
        _err(f"relay: {path}: {exc}")
        return 1
    raise_open_file_limit()
    relay = Relay(host, port, agents, max_registering_per_address=args.max_registering_per_address)
    try:
        await relay.start()
    except OSError as exc:
        _err(f"relay: cannot listen on {host}:{port}: {exc.strerror or exc}")
        return 1
    print(f"{PROG} relay on {host}:{relay.port}", flush=True)
    print(f"{count} agent key(s) in {path}; an agent parks under its own name only", flush=True)
    await wait_for_stop_signal()
    await relay.close()
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------- parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _size_arg(text: str) -> int:
    """``BYTES`` with an optional K, M or G (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 2G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Remote execution that survives a dropped network: run commands on hosts "
        "running `korinet-admin agent`, over TLS 1.3 with KoriNet identities.",
        epilog="Quick start: `korinet id` here; on the host `korinet authorize FINGERPRINT --name you "
        "--role admin` and `korinet-admin agent 0.0.0.0`; then `korinet-admin exec HOST -- uptime`. "
        "See docs/ADMIN.md.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND")

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--connect-timeout", type=_positive, default=10.0, metavar="S",
                       help="seconds to open a session with an agent (default 10)")  # fmt: skip
        p.add_argument("--insecure-plaintext", action="store_true",
                       help="for an agent run with --insecure-plaintext (no TLS; loopback only)")  # fmt: skip
        p.add_argument("--outage-limit", type=_positive, default=OUTAGE_LIMIT, metavar="S",
                       help="give up (exit 255) after S seconds without the agent; a job keeps "
                       f"running there (default {OUTAGE_LIMIT:g})")  # fmt: skip

    p = sub.add_parser(
        "exec",
        help="run a command on one or more hosts",
        description="Run CMD on each host's agent. Output streams live; the exit code is the remote "
        "one (255: korinet-admin failed; 128+N: killed by signal N; 124: --timeout; several hosts: 255 "
        "if any host did not finish, else the first non-zero). Ctrl-C sends SIGINT to the remote "
        "command, again SIGTERM, again SIGKILL; in a fan-out on a terminal it asks: stop or detach.",
    )
    p.add_argument("hosts", metavar="SELECTION",
                   help="HOST[:PORT][,...] (default port 1237), inventory names, globs (web*), "
                   "@GROUP, @all, !TERM to exclude (docs/ADMIN.md, Fleet)")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help="one JSON object per host on stdout as it ends, output included")  # fmt: skip
    p.add_argument("--output-dir", type=Path, metavar="DIR",
                   help="write each host's output to DIR/HOST.out and DIR/HOST.err")  # fmt: skip
    p.add_argument("--timeout", type=_positive, metavar="S", help="kill the command after S seconds")
    p.add_argument("--fanout", type=int, default=32, metavar="N", help="hosts at once (default 32)")
    p.add_argument("--shell", action="store_true", help="run CMD through /bin/sh -c (if your role allows)")
    p.add_argument("-t", "--tty", action="store_true", help="give the command a pseudo-terminal")
    p.add_argument("-n", "--no-stdin", action="store_true", help="do not forward stdin (fan-out never does)")
    p.add_argument(
        "--job", metavar="ID", help="the job id (32 hex digits) to use, e.g. to retry a submission"
    )
    client_options(p)
    p.add_argument("command", nargs="*", metavar="-- CMD [ARGS...]", help="the command (after --)")
    p.set_defaults(func=_exec)

    p = sub.add_parser(
        "hosts",
        help="the inventory: hosts, addresses, groups, keys, last states",
        description="List the hosts of the inventory, hosts.toml in the configuration directory "
        "($KORINET_HOME, default ~/.korinet; docs/ADMIN.md, Fleet, shows the format): NAME, "
        "ADDRESS, GROUPS, the pinned KEY, RELAY (for hosts that dial home to a relay: whether "
        "their agent is parked there now, asked of each relay) and LAST SEEN (how the last exec "
        "run found it, from hosts-seen.json beside it).",
        epilog="Examples: `korinet-admin hosts`, `korinet-admin hosts @web` (a group), "
        "`korinet-admin hosts web1,db1`, `korinet-admin hosts --groups`.",
    )
    p.add_argument("selection", nargs="?", metavar="SELECTION", help="only these (as exec takes)")
    p.add_argument("--groups", action="store_true", help="the groups and their hosts")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for each relay of dial-home hosts (default 5)")  # fmt: skip
    p.set_defaults(func=_hosts)

    p = sub.add_parser(
        "attach",
        help="re-join a job: its output from where you left, then its exit",
        description="Re-join a job started by `exec` (after the client gave up, was killed, or ran "
        "elsewhere): its output from byte OUT of stdout and ERR of stderr, then its exit code, "
        "which becomes ours. The host keeps a job's output for 24 h (at most 2 GiB a job); a notice "
        "says how many bytes are gone if some are. Ctrl-C detaches; the job keeps running.",
        epilog="Example: `korinet-admin attach web1 JOB` (`korinet-admin jobs web1` lists the ids).",
    )
    p.add_argument("host", metavar="HOST[:PORT]")
    p.add_argument("job", metavar="JOB", help="the job id (korinet-admin jobs HOST lists them)")
    p.add_argument("--from", dest="offsets", metavar="OUT,ERR",
                   help="stdout,stderr bytes already received (default: all the agent holds)")  # fmt: skip
    client_options(p)
    p.set_defaults(func=_attach)

    p = sub.add_parser(
        "jobs",
        help="list your jobs on a host",
        description="Your jobs on a host, running and finished: id, state, exit code, output size "
        "and command; `*` marks an exit nobody collected (`attach HOST JOB` collects it).",
    )
    p.add_argument("host", metavar="HOST[:PORT]")
    client_options(p)
    p.set_defaults(func=_jobs)

    p = sub.add_parser(
        "status",
        help="uptime, load, memory and disks of a host",
        description="The host's uptime, load averages, memory, swap and disks, as its agent reads them.",
    )
    p.add_argument("host", metavar="HOST[:PORT]")
    client_options(p)
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "put",
        help="copy a local file to a host (checksummed, resumable)",
        description=TRANSFER_DESCRIPTION.format(what="Copy the local file SRC to DST on the host"),
    )
    p.add_argument("host", metavar="HOST[:PORT]")
    p.add_argument("source", metavar="SRC", help="local file")
    p.add_argument("destination", metavar="DST", help="remote path (ending in / : into that directory)")
    p.add_argument("--preserve-setid", action="store_true", help=SETID_HELP)
    client_options(p)
    p.set_defaults(func=_put)

    p = sub.add_parser(
        "get",
        help="copy a file from a host (checksummed, resumable)",
        description=TRANSFER_DESCRIPTION.format(what="Copy the file SRC on the host to DST here"),
    )
    p.add_argument("host", metavar="HOST[:PORT]")
    p.add_argument("source", metavar="SRC", help="remote file")
    p.add_argument("destination", metavar="DST", help="local path or directory")
    p.add_argument("--preserve-setid", action="store_true", help=SETID_HELP)
    client_options(p)
    p.set_defaults(func=_get)

    p = sub.add_parser(
        "agent",
        help="run the agent on this host",
        description="Serve korinet-admin requests: TLS 1.3, only keys in authorized_keys with the role "
        "'admin', what the policy allows, everything in the audit log.",
    )
    p.add_argument("listen", nargs="?", default=None, metavar="HOST[:PORT]",
                   help="where to listen (default 127.0.0.1:1237, or a free loopback port with "
                   "--connect; 0.0.0.0 for the network)")  # fmt: skip
    p.add_argument("--connect", metavar="RELAY[:PORT][,...]",
                   help="dial home: keep connections parked at these relays (default port "
                   f"{DEFAULT_RELAY_PORT}) and serve the clients they splice to us")  # fmt: skip
    p.add_argument("--name", metavar="NAME",
                   help="our name at the relays (default: the host name); the relay's agents "
                   "file must list our key under it")  # fmt: skip
    p.add_argument("--policy", metavar="FILE", help="TOML policy: what each role may run (docs/ADMIN.md)")
    p.add_argument("--state-dir", metavar="DIR", help="job output and ids (default: KORINET_HOME/admin)")
    p.add_argument("--audit-log", metavar="FILE", help="default: STATE_DIR/audit.log")
    p.add_argument("--retention", type=_positive, default=RETENTION, metavar="S",
                   help=f"seconds a finished job's output is kept (default {RETENTION:g}: 24 h)")  # fmt: skip
    p.add_argument("--job-cap", type=_size_arg, default=JOB_CAP, metavar="BYTES",
                   help="output kept per job, e.g. 500M (default 2G); beyond, the oldest "
                   "bytes clients have go")  # fmt: skip
    p.add_argument("--total-cap", type=_size_arg, default=TOTAL_CAP, metavar="BYTES",
                   help="output kept for all jobs (default 10G)")  # fmt: skip
    p.add_argument("--session-ttl", type=_positive, default=600.0, metavar="S",
                   help="seconds a disconnected client's session is kept (default 600)")  # fmt: skip
    p.add_argument("--handshake-timeout", type=_positive, default=10.0, metavar="S",
                   help="seconds a client has from connecting to an authenticated session, TLS "
                   "included (default 10)")  # fmt: skip
    p.add_argument("--insecure-plaintext", action="store_true",
                   help="no TLS, no authentication: anyone reaching the port is admin (tests)")  # fmt: skip
    p.set_defaults(func=_agent)

    p = sub.add_parser(
        "relay",
        help="run a relay that agents behind NAT dial home to",
        description="Park connections of the agents listed in the agents file and splice each "
        "client to the agent it names (RELAY[:PORT]/AGENT). The relay forwards encrypted bytes: "
        "it cannot read a session nor run anything on an agent.",
    )
    p.add_argument("listen", nargs="?", default=f"0.0.0.0:{DEFAULT_RELAY_PORT}", metavar="HOST[:PORT]",
                   help=f"where to listen (default 0.0.0.0:{DEFAULT_RELAY_PORT})")  # fmt: skip
    p.add_argument("--agents", metavar="FILE",
                   help="agent keys: FINGERPRINT NAME lines (default KORINET_HOME/relay_agents)")  # fmt: skip
    p.add_argument("--max-registering-per-address", type=int, default=64, metavar="N",
                   help="agent registrations at once per address (over it: retry later)")  # fmt: skip
    p.set_defaults(func=_relay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    after: list[str] | None = None
    if "exec" in args_list and "--" in args_list[args_list.index("exec") :]:
        # everything after the first -- is the command, options included
        cut = args_list.index("--", args_list.index("exec"))
        args_list, after = args_list[:cut], args_list[cut + 1 :]
    args, unknown = parser.parse_known_args(args_list)
    if unknown:
        hint = "; put the command after --: korinet-admin exec HOST -- CMD [ARGS...]"
        is_exec = getattr(args, "func", None) is _exec
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (hint if is_exec else ""))
    if after is not None:
        if args.command:
            parser.error(f"unexpected argument(s) before --: {' '.join(args.command)}")
        args.command = ["--", *after]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.func is _exec:
        command = list(args.command)
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            parser.error("exec needs a command: korinet-admin exec HOST -- CMD [ARGS...]")
        args.command = command
        if args.fanout < 1:
            parser.error("--fanout must be at least 1")
        if args.job is not None:
            import re

            if not re.fullmatch(r"[0-9a-f]{32}", args.job):
                parser.error("--job takes 32 lowercase hex digits")
    import asyncio
    import logging

    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if args.func in (_agent, _relay):
        level = min(level, logging.INFO) if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose and args.func not in (_agent, _relay):
        # the client reports failures itself; the runtime's warnings would say it twice
        logging.getLogger("korinet").setLevel(logging.ERROR)
    try:
        code = int(asyncio.run(args.func(args)) or 0)
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `| head` left: stop quietly, as other tools do
        code = PIPE_CLOSED
    except _Failure as exc:
        _err(str(exc))
        code = FAILURE
    except ValueError as exc:  # a malformed HOST list, mostly
        _err(str(exc))
        code = 2
    if not _flush_stdout() and code == 0:
        code = PIPE_CLOSED
    return code


def _flush_stdout() -> bool:
    """Flush stdout now; after `| head` closed it, point it at /dev/null so that the
    flush at exit prints no traceback. Returns whether stdout was still open."""
    try:
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return False


if __name__ == "__main__":
    sys.exit(main())
