"""The original korinet 0.0.1a1.dev1 (PyPI), driven through original_helper.py inside
its own venv, bench/.venv-original, since its module name `korinet` clashes with ours.
Server and client are two subprocesses of that venv's Python.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchutil import DRAIN_S

PIN_VERSION = "0.0.1a1.dev1"
BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv-original"
HELPER = BENCH / "original_helper.py"
# -I: ignore PYTHONPATH/user site and don't put the script's or cwd's dir on sys.path,
# so `import korinet` can only be the venv's copy, never /work/main/korinet.
ISOLATED = "-I"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def _has_pin() -> bool:
    if not venv_python().exists():
        return False
    probe = f"import korinet, sys; sys.exit(korinet.__version__ != {PIN_VERSION!r})"
    probed = subprocess.run(
        [venv_python(), ISOLATED, "-c", probe], check=False, capture_output=True, timeout=60
    )
    return probed.returncode == 0


def ensure_venv() -> Path:
    """Create (or reuse) the venv with korinet==PIN_VERSION; returns its python."""
    if _has_pin():
        return venv_python()
    print(f"[original] creating {VENV} with korinet=={PIN_VERSION}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
    subprocess.run(
        [venv_python(), "-m", "pip", "install", "--quiet", "--pre", f"korinet=={PIN_VERSION}"],
        check=True,
        timeout=600,
    )
    if not _has_pin():
        raise RuntimeError(f"korinet=={PIN_VERSION} did not install into {VENV}")
    return venv_python()


def client(port: int, mode: str, n: int, size: int, budget_s: float, cwd: str) -> dict[str, Any]:
    """The original client in a subprocess against whatever serves `port`; its JSON result."""
    argv = [str(venv_python()), ISOLATED, str(HELPER), "client", "--port", str(port), "--mode", mode]
    argv += ["--n", str(n), "--size", str(size), "--budget-s", str(budget_s)]
    out = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        timeout=budget_s + 60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    if out.returncode != 0:
        raise RuntimeError(f"original client failed: {out.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["done"]:
        raise RuntimeError("original client completed no exchange within the budget")
    return result


def run(mode: str, n: int, size: int, budget_s: float) -> dict[str, Any]:
    """One server + one client subprocess; returns the client's JSON result."""
    py = str(venv_python())
    with tempfile.TemporaryDirectory(prefix="korinet-bench-orig-") as cwd:
        server = subprocess.Popen(
            [py, ISOLATED, str(HELPER), "serve", "--mode", mode, "--max-seconds", str(budget_s + 60)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
        )
        try:
            assert server.stdout is not None
            ready, _, _ = select.select([server.stdout], [], [], 30)  # bounded wait for its port
            line = server.stdout.readline() if ready else b""
            if not line:
                raise RuntimeError("original server did not report a port")
            return client(json.loads(line)["port"], mode, n, size, budget_s, cwd)
        finally:
            try:
                server.wait(DRAIN_S)  # it exits by itself once the client hangs up
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(5)
            if server.stdout is not None:
                server.stdout.close()
