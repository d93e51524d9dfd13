#!/usr/bin/env python3
"""Run the peer benchmark and print a markdown table: one column per system, one row
per figure, medians over a few runs, the systems taking turns within each figure.
Progress goes to stderr, the table to stdout.

    python bench/run.py --quick                # short run (< 3 min)
    python bench/run.py                        # normal run (< 10 min)
    python bench/run.py --only asyncio,zmq     # a subset of systems (keys of peers.SYSTEMS)

All traffic is TCP on 127.0.0.1; every run is bounded in messages and seconds.
Issue 13's targets, each KoriNet figure beside the one it is judged against: bench/core.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

from benchutil import ACK_EVERY, WINDOW
from peers import ROWS, SIZES_FULL, SIZES_QUICK, SYSTEMS, System


@dataclass(frozen=True)
class Stat:
    median: float
    lo: float
    hi: float


Cell = Stat | str  # figures over the runs, or "err"
MISSING = "—"


@dataclass(frozen=True)
class Profile:
    name: str
    reps: int
    budget_s: float  # per run
    sizes: dict[str, int]


QUICK = Profile("quick", reps=3, budget_s=2.0, sizes=SIZES_QUICK)
FULL = Profile("full", reps=5, budget_s=5.0, sizes=SIZES_FULL)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _as_dict(result: float | dict[str, float]) -> dict[str | None, float]:
    if isinstance(result, (int, float)):
        return {None: float(result)}
    return {key: value for key, value in result.items()}  # widen the key type for mypy


def measure(
    systems: list[System], profile: Profile, notes: list[str]
) -> dict[str, dict[tuple[str, str | None], Cell]]:
    """Median of each figure of each system. Within a figure the systems take turns,
    run 1 of each, then run 2 of each...: this machine's speed drifts by 2-3x within
    minutes, and a figure measured minutes after its neighbour would compare phases,
    not systems. A failing method becomes "err" plus a note."""
    runs: dict[tuple[str, str], list[dict[str | None, float]]] = {}
    failed: set[tuple[str, str]] = set()
    methods = dict.fromkeys(row.method for row in ROWS)  # ordered, unique
    for method in methods:
        takers = [s for s in systems if callable(getattr(s, method, None))]
        n = profile.sizes[method]
        for rep in range(profile.reps):
            for system in takers:
                if (system.name, method) in failed:
                    continue
                t0 = time.monotonic()
                try:
                    result = _as_dict(getattr(system, method)(n))
                except Exception as exc:  # one broken peer must not sink the table
                    notes.append(f"{system.name} / {method}: {type(exc).__name__}: {exc}")
                    _log(f"  {system.name} {method} FAILED: {exc!r}")
                    failed.add((system.name, method))
                    continue
                runs.setdefault((system.name, method), []).append(result)
                shown = ", ".join(f"{k or 'value'}={v:,.1f}" for k, v in result.items())
                _log(f"  {method} #{rep + 1} {system.name}: {shown} ({time.monotonic() - t0:.1f}s)")
    results: dict[str, dict[tuple[str, str | None], Cell]] = {s.name: {} for s in systems}
    for system in systems:
        cells = results[system.name]
        for row in ROWS:
            if (system.name, row.method) in failed:
                cells[(row.method, row.key)] = "err"
            elif (system.name, row.method) in runs:
                values = [run[row.key] for run in runs[(system.name, row.method)]]
                cells[(row.method, row.key)] = Stat(statistics.median(values), min(values), max(values))
    return results


def fmt_number(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fmt(cell: Cell | None, spread: bool) -> str:
    if cell is None:
        return MISSING
    if isinstance(cell, str):
        return cell
    text = fmt_number(cell.median)
    return f"{text} ({fmt_number(cell.lo)}-{fmt_number(cell.hi)})" if spread else text


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render(
    profile: Profile,
    systems: list[System],
    results: dict[str, dict[tuple[str, str | None], Cell]],
    versions: list[str],
    notes: list[str],
    spread: bool,
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## KoriNet peer benchmark ({profile.name})",
        "",
        f"- date: {now}",
        (
            f"- machine: {platform.machine()} (`uname -m`), {cpu_model()}, {os.cpu_count()} CPUs, "
            f"Linux {platform.release()}, Python {platform.python_version()}; "
            f"load average {os.getloadavg()[0]:.2f} at the end"
        ),
        (
            f"- method: TCP on 127.0.0.1, server side in its own process; median of {profile.reps} runs, "
            "the systems taking turns within each figure (run 1 of each, then run 2...), "
            f"each run bounded by a message count and {profile.budget_s:g} s; window {WINDOW}, "
            f"ack every {ACK_EVERY}; MB = 10^6 payload bytes"
            + ("; cells: median (min-max)" if spread else "")
        ),
    ]
    if versions:
        lines.append(f"- versions: {'; '.join(versions)}")
    lines += ["", "| figure | " + " | ".join(s.name for s in systems) + " |"]
    lines.append("|---|" + "---:|" * len(systems))
    for row in ROWS:
        cells = [fmt(results[s.name].get((row.method, row.key)), spread) for s in systems]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Errors:"] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer messages, runs and seconds")
    ap.add_argument("--only", help=f"comma-separated systems among: {','.join(SYSTEMS)}")
    ap.add_argument("--reps", type=int, help="runs per figure (default 3 quick, 5 full)")
    ap.add_argument("--spread", action="store_true", help="show min-max over the runs next to each median")
    args = ap.parse_args(argv)

    profile = QUICK if args.quick else FULL
    if args.reps:
        profile = Profile(profile.name, args.reps, profile.budget_s, profile.sizes)
    names = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else list(SYSTEMS)
    unknown = [x for x in names if x not in SYSTEMS]
    if unknown:
        ap.error(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")

    started = time.monotonic()
    systems: list[System] = []
    results: dict[str, dict[tuple[str, str | None], Cell]] = {}
    versions: list[str] = []
    notes: list[str] = []
    ready: list[System] = []
    try:
        for key in names:
            system = SYSTEMS[key](profile.budget_s)
            systems.append(system)
            _log(f"[{key}] {system.name}: setting up")
            try:
                system.setup()
                versions.append(system.version())
                ready.append(system)
            except Exception as exc:  # report it in the table instead
                notes.append(f"{system.name} / setup: {type(exc).__name__}: {exc}")
                results[system.name] = {
                    (row.method, row.key): "err" for row in ROWS if hasattr(system, row.method)
                }
        results.update(measure(ready, profile, notes))
    finally:
        for system in systems:
            system.teardown()
    print(render(profile, systems, results, [v for v in versions if v], notes, args.spread))
    _log(f"total {time.monotonic() - started:.0f}s")
    return 1 if notes else 0


if __name__ == "__main__":
    sys.exit(main())
