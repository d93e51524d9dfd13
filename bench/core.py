#!/usr/bin/env python3
"""Issue 13's benchmark table in one run: every KoriNet figure beside the figure it is
judged against, both measured in the same run, in alternation, with the target and
whether it holds. Progress goes to stderr, the markdown table to stdout (and --out).

    python bench/core.py --quick                       # < 5 min
    python bench/core.py --out bench/results/core-DATE.md   # about 15-20 min

Every server side runs in another process (spawned, or a subprocess); TCP on 127.0.0.1.
Each repetition runs every measurement once, in table order, so the two sides of a
ratio see the same machine; a cell is the median of the repetitions (min-max beside
it), a ratio is the ratio of the medians. bench/.venv-original is created on first use
(pip install korinet==0.0.1a1.dev1). The heavy figures (idle-session memory, 10,000
sessions, soak) run as subprocesses of bench/tls_cost.py, bench/scale.py and
bench/soak.py, each bounded in time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peer_asyncio
import peer_korinet
import peer_original
import peer_socket
import peer_zmq
from benchutil import korinet_setup
from run import cpu_model, fmt_number

import korinet

HERE = Path(__file__).resolve().parent
SMALL, LARGE = 64, 4096

# README's figures (2026-11-26) that must not regress, with the slack a shared machine
# needs for a yes/no (rates may be 10% lower, memory 5% higher).
README_PIPELINED_64 = 163_340.0  # msgs/s
README_PIPELINED_4K = 468.0  # MB/s
README_SCALE_KIB = 10.6  # server RSS per session, 10,000 sessions
README_STORM_S = 1.13  # 1,000 of them cut at once: time until all resumed
README_SOAK_RATE = 5_113_400 / 1800  # echoed msgs/s over 30 min, a cut every ~3 s
RATE_SLACK, MEMORY_SLACK = 0.9, 1.05


@dataclass(frozen=True)
class Profile:
    name: str
    reps: int  # light measurements
    heavy_reps: int  # memory, scale, soak
    budget_s: float  # per light run
    n_stop: int  # stop-and-wait and round-trip exchanges per run, at most
    n_pipe_64: int
    n_pipe_4k: int
    idle_sessions: int
    scale_sessions: int
    soak_minutes: float


QUICK = Profile("quick", 3, 1, 1.0, 2_000, 40_000, 10_000, 1_000, 2_000, 0.33)
FULL = Profile("full", 3, 3, 3.0, 20_000, 400_000, 100_000, 5_000, 10_000, 1.0)

Figures = dict[str, float]


# --------------------------------------------------------------------------- measurements


def _rate(done_seconds: tuple[int, float]) -> Figures:
    done, seconds = done_seconds
    return {"rate": done / seconds}


def _mbps(done_seconds: tuple[int, float], size: int) -> Figures:
    done, seconds = done_seconds
    return {"rate": done * size / seconds / 1e6}


def _original(mode: str, p: Profile, size: int) -> Figures:
    r = peer_original.run(mode, p.n_stop, size, p.budget_s)
    return {"rate": r["done"] / r["elapsed"]}


def _idle_kib(p: Profile, tls: bool) -> Figures:
    argv = [sys.executable, str(HERE / "tls_cost.py"), "--one", "idle_kib"]
    argv += ["--sessions", str(p.idle_sessions)] + (["--tls"] if tls else [])
    return _json_subprocess(argv, timeout=900)  # 5,000 TLS handshakes on a loaded machine


def _scale(p: Profile) -> Figures:
    argv = [sys.executable, str(HERE / "scale.py"), "--json", "--sessions", str(p.scale_sessions)]
    argv += ["--max-seconds", "300"]
    figures = _json_subprocess(argv, timeout=360)
    if figures["sessions"] < p.scale_sessions:
        raise RuntimeError(f"only {figures['sessions']:.0f} of {p.scale_sessions} sessions open")
    return figures


def _soak(p: Profile) -> Figures:
    argv = [sys.executable, str(HERE / "soak.py"), "--json", "--minutes", str(p.soak_minutes)]
    argv += ["--sample-every", str(max(2.0, p.soak_minutes * 6))]
    return _json_subprocess(argv, timeout=p.soak_minutes * 60 + 180)


def _json_subprocess(argv: list[str], timeout: float) -> Figures:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1:] or ["no output"]  # the exception, one line
        raise RuntimeError(f"{Path(argv[1]).name} failed: {last[0][-300:]}")
    figures: Figures = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


# name -> one run of it. Order is the order of a repetition: each KoriNet figure is
# next to its reference, so the pair runs back to back.
MEASURES: dict[str, Callable[[Profile], Figures]] = {
    "blocking_saw_64": lambda p: _rate(peer_korinet.blocking_stop_and_wait(p.n_stop, SMALL, p.budget_s)),
    "original_saw_64": lambda p: _original("ack", p, SMALL),
    "original_vs_new_64": lambda p: _rate(
        peer_korinet.original_client_stop_and_wait(p.n_stop, SMALL, p.budget_s)
    ),
    "blocking_saw_4k": lambda p: _rate(peer_korinet.blocking_stop_and_wait(p.n_stop, LARGE, p.budget_s)),
    "original_saw_4k": lambda p: _original("ack", p, LARGE),
    "blocking_rtt": lambda p: peer_korinet.blocking_round_trip(p.n_stop, SMALL, p.budget_s),
    "socket_rtt": lambda p: peer_socket.round_trip(p.n_stop, SMALL, p.budget_s),
    "async_echo": lambda p: peer_korinet.echo_send_recv(p.n_stop, SMALL, p.budget_s),
    "zmq_reqrep": lambda p: peer_zmq.reqrep(p.n_stop, SMALL, p.budget_s),
    "async_request": lambda p: peer_korinet.reqrep(p.n_stop, SMALL, p.budget_s),
    "async_saw_64": lambda p: _rate(peer_korinet.stop_and_wait(p.n_stop, SMALL, p.budget_s)),
    "raw_echo_64": lambda p: _rate(peer_asyncio.echo_round_trips(p.n_stop, SMALL, p.budget_s)),
    "async_saw_4k": lambda p: _rate(peer_korinet.stop_and_wait(p.n_stop, LARGE, p.budget_s)),
    "raw_echo_4k": lambda p: _rate(peer_asyncio.echo_round_trips(p.n_stop, LARGE, p.budget_s)),
    "pipelined_64": lambda p: _rate(peer_korinet.pipelined(p.n_pipe_64, SMALL, p.budget_s)),
    "raw_pipelined_64": lambda p: _rate(peer_asyncio.pipelined(p.n_pipe_64, SMALL, p.budget_s)),
    "pipelined_4k": lambda p: _mbps(peer_korinet.pipelined(p.n_pipe_4k, LARGE, p.budget_s), LARGE),
    "raw_pipelined_4k": lambda p: _mbps(peer_asyncio.pipelined(p.n_pipe_4k, LARGE, p.budget_s), LARGE),
    "idle_tls": lambda p: _idle_kib(p, tls=True),
    "idle_plain": lambda p: _idle_kib(p, tls=False),
    "scale": _scale,
    "soak": _soak,
}
HEAVY = {"idle_tls", "idle_plain", "scale", "soak"}


# --------------------------------------------------------------------------- rows

Ref = tuple[str, str]  # (measure, key in its figures)


@dataclass(frozen=True)
class Row:
    label: str
    ours: Ref
    ref: Ref | None  # the figure it is judged against, same run; None: judged on its own
    ref_label: str
    # "ratio>=": ours/ref >= bound; "ratio<=": ours/ref <= bound;
    # ">=" / "<=": ours against the bound itself
    kind: str
    bound: float
    target: str
    unit: str = ""


def rows(p: Profile) -> list[Row]:
    idle, scale = f"{p.idle_sessions:,}", f"{p.scale_sessions:,}"
    soak = f"{p.soak_minutes * 60:.0f} s"
    pipe_64, pipe_4k = README_PIPELINED_64 * RATE_SLACK, README_PIPELINED_4K * RATE_SLACK
    return [
        Row("blocking `client()` vs `server(conn)` stop-and-wait, 64 B, msg/s",
            ("blocking_saw_64", "rate"), ("original_saw_64", "rate"),
            "original 0.0.1 against itself", "ratio>=", 1.0, ">= 1.0x"),
        Row("blocking `client()` vs `server(conn)` stop-and-wait, 4 KiB, msg/s",
            ("blocking_saw_4k", "rate"), ("original_saw_4k", "rate"),
            "original 0.0.1 against itself", "ratio>=", 1.0, ">= 1.0x"),
        Row("original 0.0.1 client against the new `server(conn)`, 64 B, msg/s",
            ("original_vs_new_64", "rate"), ("original_saw_64", "rate"),
            "original against original", "ratio>=", 1.0, ">= 1.0x"),
        Row("blocking `send()`+`recv()` round trip p50, µs",
            ("blocking_rtt", "p50"), ("socket_rtt", "p50"),
            "raw blocking-socket ping-pong (length prefix)", "ratio<=", 2.0, "<= 2.0x"),
        Row("asyncio `await send()`+`recv()` echo p50, µs",
            ("async_echo", "p50"), ("zmq_reqrep", "p50"),
            "pyzmq REQ/REP", "ratio<=", 1.1, "<= 1.1x"),
        Row("asyncio `await request()` echo p50, µs",
            ("async_request", "p50"), ("zmq_reqrep", "p50"),
            "pyzmq REQ/REP", "ratio<=", 1.1, "<= 1.1x"),
        Row("asyncio `await send()` stop-and-wait, 64 B, msg/s",
            ("async_saw_64", "rate"), ("raw_echo_64", "rate"),
            "raw asyncio echo, 64 B, round trips/s", "ratio>=", 1.0, ">= 1.0x"),
        Row("asyncio `await send()` stop-and-wait, 4 KiB, msg/s",
            ("async_saw_4k", "rate"), ("raw_echo_4k", "rate"),
            "raw asyncio echo, 4 KiB, round trips/s", "ratio>=", 1.0, ">= 1.0x"),
        Row("pipelined acked 64 B, msg/s",
            ("pipelined_64", "rate"), ("raw_pipelined_64", "rate"),
            "raw asyncio (length prefix, msgpack decode, ack every 64)", "ratio>=", 1.0, ">= 1.0x"),
        Row("pipelined acked 64 B, msg/s (no regression)",
            ("pipelined_64", "rate"), None, f"README {README_PIPELINED_64:,.0f}",
            ">=", pipe_64, f">= {pipe_64:,.0f} (README -10%)"),
        Row("pipelined acked 4 KiB, MB/s",
            ("pipelined_4k", "rate"), ("raw_pipelined_4k", "rate"),
            "raw asyncio (length prefix, msgpack decode, ack every 64)", "ratio>=", 1.0, ">= 1.0x"),
        Row("pipelined acked 4 KiB, MB/s (no regression)",
            ("pipelined_4k", "rate"), None, f"README {README_PIPELINED_4K:g}",
            ">=", pipe_4k, f">= {pipe_4k:.0f} (README -10%)"),
        Row(f"server memory per idle TLS 1.3 session ({idle} sessions), KiB",
            ("idle_tls", "idle_kib"), None, "target", "<=", 40.0, "<= 40 KiB"),
        Row(f"server memory per idle plaintext session ({idle} sessions), KiB",
            ("idle_plain", "idle_kib"), None, "target", "<=", 16.0, "<= 16 KiB"),
        Row(f"scale: server RSS per session ({scale} sessions), KiB",
            ("scale", "rss_kib_per_session"), None, f"README {README_SCALE_KIB}",
            "<=", README_SCALE_KIB * MEMORY_SLACK, f"<= {README_SCALE_KIB * MEMORY_SLACK:.1f} (README +5%)"),
        Row(f"scale: time to open {scale} sessions, s",
            ("scale", "open_s"), None, "bounded", "<=", 300.0, "<= 300 s"),
        Row("scale: a tenth cut at once, time until all resumed, s",
            ("scale", "storm_resume_s"), None, f"README {README_STORM_S}",
            "<=", README_STORM_S / RATE_SLACK, f"<= {README_STORM_S / RATE_SLACK:.2f} (README +10%)"),
        Row("scale: cut sessions not back + given a new id + request failed",
            ("scale", "storm_lost"), None, "none", "<=", 0.0, "0"),
        Row(f"soak ({soak}, a cut every ~3 s): echoed msg/s",
            ("soak", "rate"), None, f"README {README_SOAK_RATE:,.0f} (30 min)",
            ">=", README_SOAK_RATE * RATE_SLACK, f">= {README_SOAK_RATE * RATE_SLACK:,.0f} (README -10%)"),
        Row(f"soak ({soak}): messages missing or duplicated",
            ("soak", "missing"), None, "none", "<=", 0.0, "0"),
        Row(f"soak ({soak}): server RSS growth after warm-up, %",
            ("soak", "server_rss_growth_pct"), None, "README +0.1% (30 min)", "<=", 1.0, "<= 1%"),
    ]  # fmt: skip


def _derive(name: str, figures: Figures) -> Figures:
    """Figures the rows need that a measurement reports in parts."""
    if name == "scale":
        lost = figures["storm_not_back"] + figures["storm_new_id"] + figures["storm_failed"]
        figures["storm_lost"] = lost
    if name == "soak":
        figures["missing"] = abs(figures["sent"] - figures["echoed"])
    return figures


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Stat:
    median: float
    lo: float
    hi: float
    n: int


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure_all(
    p: Profile, only: set[str] | None, after_rep: Callable[[dict[str, list[Figures]], list[str], int], None]
) -> tuple[dict[str, list[Figures]], list[str]]:
    runs: dict[str, list[Figures]] = {name: [] for name in MEASURES}
    errors: list[str] = []
    for rep in range(max(p.reps, p.heavy_reps)):
        if rep:
            after_rep(runs, errors, rep)
        for name, fn in MEASURES.items():
            if only is not None and name not in only:
                continue
            if rep >= (p.heavy_reps if name in HEAVY else p.reps):
                continue
            t0 = time.monotonic()
            try:
                figures = _derive(name, fn(p))
            except Exception as exc:  # one broken figure must not sink the table
                errors.append(f"{name} #{rep + 1}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
                _log(f"  {name} #{rep + 1} FAILED: {exc!r}")
                continue
            runs[name].append(figures)
            shown = ", ".join(f"{k}={v:,.1f}" for k, v in figures.items() if k in ("rate", "p50", "idle_kib"))
            _log(f"  {name} #{rep + 1}: {shown or figures} ({time.monotonic() - t0:.1f}s)")
    return runs, errors


def stat(runs: dict[str, list[Figures]], ref: Ref) -> Stat | None:
    values = [figures[ref[1]] for figures in runs.get(ref[0], []) if ref[1] in figures]
    if not values:
        return None
    return Stat(statistics.median(values), min(values), max(values), len(values))


def cell(s: Stat | None) -> str:
    if s is None:
        return "err"

    def num(v: float) -> str:
        return f"{v:.0f}" if v == int(v) else fmt_number(v)

    if s.n == 1 or s.lo == s.hi:
        return num(s.median)
    return f"{num(s.median)} ({num(s.lo)}-{num(s.hi)})"


def judge(row: Row, ours: Stat | None, ref: Stat | None) -> tuple[str, str]:
    """(ratio text, holds text)."""
    if ours is None or (row.ref is not None and ref is None):
        return "", "not measured"
    if row.kind.startswith("ratio"):
        assert ref is not None
        ratio = ours.median / ref.median
        ok = ratio >= row.bound if row.kind == "ratio>=" else ratio <= row.bound
        return f"{ratio:.2f}x", "**yes**" if ok else "no"
    ok = ours.median >= row.bound if row.kind == ">=" else ours.median <= row.bound
    return "", "**yes**" if ok else "no"


def render(
    p: Profile,
    runs: dict[str, list[Figures]],
    errors: list[str],
    started: str,
    only: set[str] | None,
    partial: str = "",
) -> str:
    ended = dt.datetime.now(dt.UTC).strftime("%H:%M UTC")
    lines = [
        f"## KoriNet core benchmark, issue 13 ({p.name})",
        "",
        f"- date: {started} to {ended}",
        (
            f"- machine: `uname -m` {platform.machine()}, {cpu_model()}, {os.cpu_count()} CPUs, "
            f"Linux {platform.release()}, Python {platform.python_version()}; "
            f"load average {os.getloadavg()[0]:.2f} at the end"
        ),
        f"- code: korinet {korinet.__version__} at {_git_head()}; {korinet_setup()}",
        (
            f"- method: `python bench/core.py{' --quick' if p.name == 'quick' else ''}`; TCP on 127.0.0.1, "
            "every server side in another process; each cell is the median of the runs with "
            "(min-max), the two sides of a ratio alternating within one run; ratio = ratio of medians; "
            f"{p.reps} runs of each light figure (at most {p.budget_s:g} s each), {p.heavy_reps} of "
            "memory, scale and soak; MB = 10^6 payload bytes"
        ),
        *([f"- **partial**: {partial}"] if partial else []),
        "",
        "| figure | KoriNet | judged against | reference | ratio | target | holds |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for row in rows(p):
        if only is not None and not ({row.ours[0], (row.ref or row.ours)[0]} <= only):
            continue  # not asked for (--only)
        ours = stat(runs, row.ours)
        ref = stat(runs, row.ref) if row.ref is not None else None
        ratio, holds = judge(row, ours, ref)
        ref_cell = cell(ref) if row.ref is not None else ""
        cells = [row.label, cell(ours), row.ref_label, ref_cell, ratio, row.target, holds]
        lines.append("| " + " | ".join(cells) + " |")
    if errors:
        lines += ["", "Failed runs (left out of the medians):"] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def _git_head() -> str:
    def last(*paths: str) -> str:
        argv = ["git", "-C", str(HERE.parent), "log", "-1", "--format=%h %s", "--", *paths]
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        return f"`{out.stdout.strip()[:80]}`" if out.returncode == 0 and out.stdout else "unknown"

    dirty = subprocess.run(
        ["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "korinet"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{last()}; korinet/ last changed in {last('korinet')}" + (
        " (+ uncommitted changes)" if dirty else ""
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run (< 5 min)")
    ap.add_argument("--only", help="comma-separated measurement names (see MEASURES)")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args()
    p = QUICK if args.quick else FULL
    only = set(args.only.split(",")) if args.only else None
    if only is not None and not only <= MEASURES.keys():
        ap.error(f"unknown: {sorted(only - MEASURES.keys())}; known: {', '.join(MEASURES)}")
    if only is None or only & {"original_saw_64", "original_saw_4k", "original_vs_new_64"}:
        peer_original.ensure_venv()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()

    def after_rep(runs: dict[str, list[Figures]], errors: list[str], done: int) -> None:
        # A table after every repetition, so a run cut short still leaves its figures.
        if args.out is not None:
            note = f"{done} of {max(p.reps, p.heavy_reps)} repetitions done when this was written"
            args.out.write_text(render(p, runs, errors, started, only, note))

    runs, errors = measure_all(p, only, after_rep)
    text = render(p, runs, errors, started, only)
    _log(f"# {time.monotonic() - t0:.0f} s")
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
