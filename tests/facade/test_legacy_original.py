"""Compatibility with the real KoriNet 0.0.1 package from the index.

The original's module name is ``korinet`` too, so it lives in its own venv
(cached in ~/.cache/korinet-test/venv-original, or $KORINET_ORIGINAL_VENV) and
its scripts run there with ``python -I``: our repository is never on its path.

- The ORIGINAL client talks to OUR ``server(conn)`` (the README server pattern):
  every message arrives, the original parses every reply, and the new server
  tells that the peer speaks the legacy wire.
- Our ``protocol.v2`` writes the same bytes as the original's for the same
  object and id.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import korinet.wire.legacy
from korinet import Hub, KoriNetError, SessionConfig, protocol, server

ORIGINAL = "korinet==0.0.1a1.dev1"
ORIGINAL_VERSION = "0.0.1a1.dev1"
N = 50  # round trips (the original sets no TCP_NODELAY: ~40 ms of Nagle each)
CACHE = Path(os.environ.get("KORINET_ORIGINAL_VENV", Path.home() / ".cache/korinet-test/venv-original"))

# pip's words when it cannot reach an index (or the index lacks the package)
OFFLINE = re.compile(
    r"NewConnectionError|ConnectionError|Could not fetch URL|Temporary failure in name resolution"
    r"|Network is unreachable|ProxyError|ReadTimeoutError|ConnectTimeoutError"
)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def has_original(venv: Path) -> bool:
    if not venv_python(venv).exists():
        return False
    probe = f"import korinet, korinet.client; assert korinet.__version__ == {ORIGINAL_VERSION!r}"
    probed = subprocess.run([venv_python(venv), "-I", "-c", probe], capture_output=True, timeout=60)
    return probed.returncode == 0


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run builds it once
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def original_python() -> Path:
    """The python of a venv holding the original package; built once, then reused."""
    with locked(CACHE.parent / (CACHE.name + ".lock")):
        if has_original(CACHE):
            return venv_python(CACHE)
        shutil.rmtree(CACHE, ignore_errors=True)  # a partial build from an interrupted run
        subprocess.run([sys.executable, "-m", "venv", str(CACHE)], check=True, timeout=300)
        pip = subprocess.run(
            [venv_python(CACHE), "-m", "pip", "install", "--disable-pip-version-check", ORIGINAL],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if pip.returncode != 0:
            shutil.rmtree(CACHE, ignore_errors=True)
            output = pip.stdout + pip.stderr
            if OFFLINE.search(output):
                pytest.skip(f"pip cannot get {ORIGINAL} from the index: {output.strip().splitlines()[-1]}")
            pytest.fail(f"pip install {ORIGINAL} failed:\n{output}")
        assert has_original(CACHE), "the original package is not importable from the new venv"
        return venv_python(CACHE)


def run_original(python: Path, script: str, *args: str, stdin: str = "", timeout: float = 60) -> str:
    """Run ``script`` with the original package (isolated from this repository)."""
    proc = subprocess.run(
        [str(python), "-I", "-c", script, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(python.parent),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


ORIGINAL_CLIENT = """
import json, sys
import korinet
assert korinet.__version__ == "0.0.1a1.dev1", korinet.__file__
from korinet.client import client   # the class lives in the module, in the original

port, n = int(sys.argv[1]), int(sys.argv[2])
C = client("127.0.0.1", port, timeout=10)
replies = []
for num in range(n):
    assert C.send({"type": "ping", "num": num}) is True   # returns after our {"statusP": True}
    replies.append(C.recv())                              # acknowledges with its own statusP
C.protocol.sock.close()
print("RESULT " + json.dumps(replies))
"""


class ReadmeServer:
    """The README server pattern in a thread: accept, server(conn), recv/send."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port: int = self.listener.getsockname()[1]
        self.received: list[dict[str, Any]] = []
        self.legacy: bool | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="readme-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            srv = server(conn)
            self.legacy = srv.legacy
            for _ in range(self.n):
                msg = srv.recv(giveID=True, timeout=20)
                self.received.append(msg)
                srv.send({"status": True, "num": msg["num"]})
            with contextlib.suppress(KoriNetError, OSError):
                srv.recv(timeout=20)  # until the original client hangs up
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.listener.close()


@pytest.mark.timeout(180)  # the first run builds the venv
def test_original_client_against_new_server(original_python: Path) -> None:
    app = ReadmeServer(N)
    started = time.monotonic()
    out = run_original(original_python, ORIGINAL_CLIENT, str(app.port), str(N))
    elapsed = time.monotonic() - started
    app.thread.join(30)
    print(f"\noriginal client -> new server: {N} round trips in {elapsed:.1f}s")
    assert app.error is None, repr(app.error)
    assert app.legacy is True, "server(conn).legacy must tell an original client"

    # every message arrived once, in order, with the original's frame id
    assert [m["num"] for m in app.received] == list(range(N))
    for msg in app.received:
        assert set(msg) == {"type", "num", "id"} and msg["type"] == "ping", msg
        assert re.fullmatch(r"[0-9a-f]{32}", msg["id"]), msg
    assert len({m["id"] for m in app.received}) == N

    # the original parsed every reply (it injects the frame id into the dict)
    assert "Erreur socket" not in out, out  # it never had to reconnect and resend
    [result] = [line for line in out.splitlines() if line.startswith("RESULT ")]
    replies = json.loads(result.removeprefix("RESULT "))
    assert [{k: v for k, v in r.items() if k != "id"} for r in replies] == [
        {"status": True, "num": i} for i in range(N)
    ]
    assert all(re.fullmatch(r"[0-9a-f]{32}", r["id"]) for r in replies)


ORIGINAL_ENCODER = """
import ast, sys
import korinet.protocol

class Capture:
    def sendall(self, data):
        self.data = bytes(data)

for obj, msg_id in ast.literal_eval(sys.stdin.read()):
    sock = Capture()
    v2 = korinet.protocol.v2(sock)
    v2._id = lambda size=16, msg_id=msg_id: msg_id   # every frame id comes from _id()
    v2.send(obj)
    print(sock.data.hex())
"""

SAMPLES: list[tuple[Any, str]] = [
    ({"type": "ping", "num": 0}, "b1f2a20b63ab5fddfb0665c9ad7e2508"),
    ({"statusP": True}, "d534a8187c06ff193e3552c8e23245ca"),
    ({"status": True, "n": 1}, "c8820791307aea07c9b01e6cacd88cbc"),
    ({}, "0" * 32),
    (
        {"nested": {"list": [1, -2, 3.5, None, False], "bytes": b"\x00\xff"}, "é": "ünïcode ✓"},
        "ffffffffffffffffffffffffffffffff",
    ),
    ({"big": 2**63, "neg": -(2**40), "float": 1e300, "tuple": (1, 2)}, "0123456789abcdef0123456789abcdef"),
    ({"blob": b"x" * 70000, "text": "y" * 300}, "abcdefabcdefabcdefabcdefabcdefab"),
    ([1, 2, 3], "1" * 32),
    ("just a string", "2" * 32),
]


class Capture:
    def __init__(self) -> None:
        self.data = b""

    def sendall(self, data: bytes) -> None:
        self.data += bytes(data)


def our_bytes(obj: Any, msg_id: str, monkeypatch: pytest.MonkeyPatch) -> bytes:
    monkeypatch.setattr(korinet.wire.legacy, "new_id", lambda: msg_id)
    sock = Capture()
    protocol.v2(sock).send(obj)  # type: ignore[arg-type]
    return sock.data


@pytest.mark.timeout(180)
def test_v2_bytes_identical_to_original(original_python: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = run_original(original_python, ORIGINAL_ENCODER, stdin=repr(SAMPLES)).split()
    assert len(theirs) == len(SAMPLES)
    for (obj, msg_id), their_hex in zip(SAMPLES, theirs, strict=True):
        assert our_bytes(obj, msg_id, monkeypatch).hex() == their_hex, obj


# The frames of the original's live capture (/work/orig-notes.md §7), checked without the venv.
def test_v2_bytes_match_the_captured_hex_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    ping = our_bytes({"type": "ping", "num": 0}, "b1f2a20b63ab5fddfb0665c9ad7e2508", monkeypatch)
    assert ping == bytes.fromhex(
        "0000003b a2 6464617461 a2 6474797065 6470696e67 636e756d 00 626964 7820"
        + b"b1f2a20b63ab5fddfb0665c9ad7e2508".hex()
    )
    ack = our_bytes({"statusP": True}, "d534a8187c06ff193e3552c8e23245ca", monkeypatch)
    assert len(ack) == 57
    assert ack == bytes.fromhex(
        "00000035 a2 6464617461 a1 67737461747573 50 f5 626964 7820"
        + b"d534a8187c06ff193e3552c8e23245ca".hex()
    )
    reply = our_bytes({"status": True, "n": 1}, "c8820791307aea07c9b01e6cacd88cbc", monkeypatch)
    assert reply == bytes.fromhex(
        "00000037 a2 6464617461 a2 66737461747573 f5 616e 01 626964 7820"
        + b"c8820791307aea07c9b01e6cacd88cbc".hex()
    )
    # and our v2 reads them back as the original did: the frame id inside the dict
    assert decode(ping) == {"type": "ping", "num": 0, "id": "b1f2a20b63ab5fddfb0665c9ad7e2508"}


def decode(frame: bytes) -> Any:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        a.sendall(frame)
        return protocol.v2(b).recv()


ORIGINAL_IDLE_CLIENT = """
import sys, time
from korinet.client import client

C = client("127.0.0.1", int(sys.argv[1]), timeout=10)
time.sleep(float(sys.argv[2]))   # connected, then quiet for a while (a chat waiting for its user)
assert C.send({"type": "ping", "num": 0}) is True
print("RESULT", C.recv())
C.protocol.sock.close()
"""


@pytest.mark.timeout(60)
def test_original_client_quiet_longer_than_the_handshake_timeout(original_python: Path) -> None:
    # The original server waited forever for a client's first frame; ours gives up after
    # handshake_timeout (10 s by default; 1 s here to keep the test short).
    hub = Hub(config=SessionConfig(handshake_timeout=1.0))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(1.0)
    received: list[Any] = []
    failures: list[str] = []
    stop = threading.Event()

    def readme_server() -> None:  # the README pattern: a failed connection goes back to accept
        while not stop.is_set() and not received:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                srv = server(conn, hub=hub)
                received.append(srv.recv(timeout=20))
                srv.send({"status": True})
            except (KoriNetError, OSError) as exc:
                failures.append(repr(exc))

    thread = threading.Thread(target=readme_server, daemon=True)
    thread.start()
    try:
        proc = subprocess.run(
            [str(original_python), "-I", "-c", ORIGINAL_IDLE_CLIENT, str(listener.getsockname()[1]), "2.5"],
            capture_output=True,
            text=True,
            timeout=40,
            cwd=str(original_python.parent),
        )
    finally:
        stop.set()
        thread.join(10)
        listener.close()
    assert proc.returncode == 0, (proc.stderr, failures)
    assert "RESULT {'status': True, 'id'" in proc.stdout, proc.stdout
    assert [m["num"] for m in received] == [0], (received, failures)
