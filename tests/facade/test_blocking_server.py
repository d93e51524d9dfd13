"""The blocking ``server(conn)`` drives its session in the caller's thread.

- no event loop: a process using only client() and server() never starts KoriNet's
  loop thread, cuts and resumes included;
- a client that comes back on a new socket resumes in the next server(conn), both
  directions complete, in order, once, with server sends cut while they wait;
- heartbeats are answered while the server application is busy elsewhere;
- a resume on a new socket takes the session from the old server object, whose
  blocked recv() raises ConnectionClosedError;
- a session whose client never comes back is expired and taken off the table;
- beyond max_detached, the session detached longest is expired early, its thread
  gone: its client gets a new session and SessionExpired, the others resume;
- a failed authentication is answered at once: the next client of a
  single-threaded accept loop is not held up; the guesser's address is refused
  until its delay has passed;
- over TLS, a session resumes with its client's key, and only with it.
"""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from relay import Relay
from testutil import TIMEOUT_FACTOR, wait_until

from korinet import AuthenticationError, ConnectionClosedError, KoriNetError, client, server
from korinet.security import AuthorizedKeys, ClientTLS, Identity, ServerTLS, client_context
from korinet.serving import AUTH_DELAY_MAX
from korinet.session import CloseCode, SessionConfig
from korinet.session.handshake import decode_close, decode_control, encode_control
from korinet.sync.server import SessionTable, SyncServerSession
from korinet.wire.buffer import FrameDecoder
from korinet.wire.frames import PREFACE, FrameType

pytestmark = pytest.mark.timeout(90 * TIMEOUT_FACTOR)

T = 20 * TIMEOUT_FACTOR  # generous waits for events


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Give the plaintext server(conn) of this test (with this passphrase) a session
    table of its own."""

    def install(**kwargs: Any) -> SessionTable:
        fresh = SessionTable(**kwargs)
        facade = importlib.import_module("korinet.server")  # (korinet.server is the class)
        monkeypatch.setitem(facade._tables, (id(None), kwargs.get("passphrase")), fresh)
        return fresh

    return install


NO_LOOP_SCRIPT = """
import socket, sys, threading
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from relay import Relay
import korinet._loopthread
from korinet import client, server, KoriNetError

listener = socket.create_server(("127.0.0.1", 0))
got = []

def serve():
    while len(got) < 40:
        conn, _ = listener.accept()
        try:
            srv = server(conn)
            while len(got) < 40:
                got.append(srv.recv(timeout=20))
                srv.send(got[-1])
        except KoriNetError:
            pass

thread = threading.Thread(target=serve, daemon=True)
thread.start()
with Relay(listener.getsockname()) as relay:
    c = client("127.0.0.1", relay.port, timeout=20)
    for n in range(40):
        c.send(n)
        if n in (10, 25):
            relay.cut()
        assert c.recv(timeout=20) == n
    resumes = c.runtime.session.stats.resumes
    c.close()
thread.join(20)
assert got == list(range(40)), got
assert resumes >= 2, resumes
assert korinet._loopthread._loop is None, "the loop was started"
assert not [t for t in threading.enumerate() if t.name == "korinet-loop"]
print("NO LOOP")
"""


def test_client_and_server_alone_never_start_the_loop_thread() -> None:
    here = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, "-c", NO_LOOP_SCRIPT, str(here), str(here.parent)],
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT_FACTOR,
    )
    assert proc.returncode == 0, proc.stderr
    assert "NO LOOP" in proc.stdout


def test_resume_in_the_next_server_conn_loses_and_repeats_nothing() -> None:
    n_messages = 300
    cuts = {40, 41, 120, 200, 299}
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    server_got: list[int] = []
    client_got: list[int] = []
    objects: list[server] = []
    interrupted: list[str] = []
    crashed: list[BaseException] = []
    failed: list[str] = []
    stop = threading.Event()

    def readme_server() -> None:
        # the README loop, carrying on where it was: a send() cut while it waits is
        # delivered on resume, so it is not sent again (and the loop goes on accepting
        # after its last send: that resume is what delivers it)
        received = sent = 0
        doing = ""
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                srv = server(conn)
                objects.append(srv)
                while sent < n_messages:
                    if received == sent:
                        doing = "recv"
                        server_got.append(srv.recv(timeout=T)["n"])
                        received += 1
                    doing = "send"
                    try:
                        srv.send({"n": sent})
                    finally:
                        sent += 1
            except ConnectionClosedError as exc:
                interrupted.append(doing)
                assert exc.code == CloseCode.LINK_LOST, exc
            except OSError as exc:  # a connection the cut reset in its handshake
                failed.append(repr(exc))
            except BaseException as exc:
                crashed.append(exc)
                raise

    thread = threading.Thread(target=readme_server, daemon=True)
    thread.start()
    try:
        with Relay(listener.getsockname()) as relay:
            cli = client("127.0.0.1", relay.port, timeout=T)
            sid = cli.runtime.session_id
            for n in range(n_messages):
                assert not crashed, crashed
                cli.send({"n": n})  # returns once the server application has it...
                if n in cuts:
                    relay.cut()  # ...so its reply's send() is cut while it waits for our ack
                client_got.append(cli.recv(timeout=T)["n"])
            assert cli.runtime.session_id == sid
            resumes = cli.runtime.session.stats.resumes
            cli.close()
    finally:
        stop.set()
        thread.join(T)
        listener.close()
    assert not crashed, crashed
    assert server_got == list(range(n_messages))
    assert client_got == list(range(n_messages))
    assert resumes >= len(cuts) - 1  # (after the last cut, close() may find nothing left to resume for)
    assert len(objects) == resumes + 1, ("one server(conn) per session start or resume", failed)
    assert all(o.peer is objects[0].peer for o in objects), "every server(conn) continued one session"
    assert "send" in interrupted, interrupted


def test_heartbeats_are_answered_while_the_server_application_sleeps(table: Any) -> None:
    heartbeat = 0.2  # a silent peer is dropped after 2.5 heartbeats: 0.5 s
    table(config=SessionConfig(heartbeat_interval=heartbeat))
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[Any] = []
    busy = threading.Event()
    done = threading.Event()

    def app() -> None:
        conn, _ = listener.accept()
        srv = server(conn)
        received.append(srv.recv(timeout=T))
        busy.set()
        done.wait(T)  # busy elsewhere, not calling recv() or send(), for many heartbeats
        received.append(srv.recv(timeout=T))

    thread = threading.Thread(target=app, daemon=True)
    thread.start()
    cli = client(
        "127.0.0.1", listener.getsockname()[1], timeout=T, config=SessionConfig(heartbeat_interval=heartbeat)
    )
    cli.send("before")
    assert busy.wait(T)
    stats = cli.runtime.session.stats
    # ten PONGs (each a new rtt), answered while the server application does not
    # read: four dead-link windows at least
    rtts: set[float] = set()

    def ten_pongs() -> bool:
        if cli.runtime.rtt is not None:
            rtts.add(cli.runtime.rtt)
        return len(rtts) >= 10

    wait_until(ten_pongs, timeout=T, what="ten heartbeats answered")
    assert cli.runtime.links_opened == 1 and stats.links == 1, "the client dropped its link"
    assert stats.heartbeat_timeouts == 0
    done.set()
    cli.send("after")
    thread.join(T)
    assert received == ["before", "after"]
    cli.close()
    listener.close()


def _raw_resume(
    port: int, sid: str, token: str, codec: str, until: FrameType = FrameType.WELCOME
) -> tuple[socket.socket, list[tuple[int, bytes]]]:
    """Resume session ``sid`` by hand on a new socket; return it and the server's
    first frames, up to the first of type ``until``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=T)
    fields = {
        "versions": [3],
        "codecs": [codec],
        "heartbeat": 60.0,
        "window": 64,
        "window_bytes": 1 << 20,
        "max_frame": 1 << 20,
        "resume": {"id": sid, "token": token, "received": 0},
        "agent": "test",
    }
    sock.sendall(PREFACE + encode_control(FrameType.HELLO, fields))
    decoder = FrameDecoder(1 << 20)
    frames: list[tuple[int, bytes]] = []
    while all(kind != until for kind, _ in frames):
        data = sock.recv(65536)
        assert data, "the server closed instead of answering"
        decoder.feed(data)
        frames += decoder.frames()
    return sock, frames


def test_a_resume_takes_the_session_from_the_old_server_object() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    first: list[server] = []
    outcome: list[BaseException | Any] = []
    ready = threading.Event()

    def old_app() -> None:
        conn, _ = listener.accept()
        srv = server(conn)
        first.append(srv)
        outcome.append(srv.recv(timeout=T))
        ready.set()
        try:
            outcome.append(srv.recv(timeout=T))  # blocked here when the session moves
        except KoriNetError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=old_app, daemon=True)
    thread.start()
    cli = client("127.0.0.1", port, timeout=T)
    cli.send("hello")
    assert ready.wait(T)
    session = cli.runtime.session
    assert session.session_id is not None and session.token is not None
    # the old link still looks alive to the server: a new socket resumes the session
    accepted: list[server] = []
    taker = threading.Thread(target=lambda: accepted.append(server(listener.accept()[0])), daemon=True)
    taker.start()
    assert session.codec is not None
    raw, frames = _raw_resume(port, session.session_id, session.token, session.codec.name)
    taker.join(T)
    assert frames[0][0] == FrameType.WELCOME and decode_control(frames[0][1])["resumed"] is True
    thread.join(T)
    assert outcome[0] == "hello"
    assert isinstance(outcome[1], ConnectionClosedError), outcome
    assert accepted and accepted[0].peer is first[0].peer
    peer = accepted[0].peer
    assert isinstance(peer, SyncServerSession) and peer.adoptions == 2
    # the old object's calls raise at once; its send is still delivered on resume
    with pytest.raises(ConnectionClosedError):
        first[0].recv(timeout=T)
    # The real client lost its link to the takeover: it resumes on a third socket.
    raw.close()
    third: list[Any] = []

    def third_app() -> None:
        srv = server(listener.accept()[0])
        third.append(srv.recv(timeout=T))
        srv.send("back")

    thread = threading.Thread(target=third_app, daemon=True)
    thread.start()
    cli.send("again")
    assert cli.recv(timeout=T) == "back"
    thread.join(T)
    assert third == ["again"]
    assert cli.runtime.session_id == session.session_id
    cli.close()
    listener.close()


def test_a_session_whose_client_never_returns_is_reaped(table: Any) -> None:
    sessions = table(session_ttl=0.2)
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[Any] = []

    def app() -> None:
        srv = server(listener.accept()[0])
        got.append(srv.recv(timeout=T))

    thread = threading.Thread(target=app, daemon=True)
    thread.start()
    cli = client("127.0.0.1", listener.getsockname()[1], timeout=T)
    cli.send("bye")
    thread.join(T)
    (handle,) = sessions.sessions.values()
    cli.runtime.abort()  # gone without a CLOSE: the session waits for it, then expires
    wait_until(lambda: not sessions.sessions, timeout=T, what="the expired session reaped")
    assert isinstance(handle.endpoint.ended, ConnectionClosedError)
    assert handle.endpoint.ended.code == CloseCode.SESSION_UNKNOWN
    assert got == ["bye"]
    listener.close()


def test_tls_sessions_resume_and_stay_bound_to_their_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KORINET_HOME", str(tmp_path / "home"))
    server_key, alice, bob = Identity.generate(), Identity.generate(), Identity.generate()
    keys = AuthorizedKeys(tmp_path / "authorized_keys")
    keys.authorize(alice.fingerprint, "alice")
    keys.authorize(bob.fingerprint, "bob")
    tls = ServerTLS(server_key, authorized=keys)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    got: list[tuple[Any, str]] = []
    refusals: list[KoriNetError] = []
    stop = threading.Event()

    def readme_server() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                srv = server(conn, tls=tls)
                while True:
                    got.append((srv.recv(timeout=T), srv.peer.identity.name))
                    srv.send(got[-1][0])
            except KoriNetError:
                pass

    def thief_server(second: socket.socket) -> None:
        try:
            server(second.accept()[0], tls=tls)
        except AuthenticationError as exc:
            refusals.append(exc)

    thread = threading.Thread(target=readme_server, daemon=True)
    thread.start()
    try:
        with Relay(listener.getsockname()) as relay:
            pinned = ClientTLS(alice, fingerprint=server_key.fingerprint)
            cli = client("127.0.0.1", relay.port, timeout=T, tls=pinned)
            for n in range(20):
                cli.send(n)
                if n in (5, 12):
                    relay.cut()
                assert cli.recv(timeout=T) == n
            assert cli.runtime.session.stats.resumes >= 2
            # Bob is authorized, and holds alice's session id and token: not enough.
            session = cli.runtime.session
            assert session.session_id is not None and session.token is not None and session.codec is not None
            # (another accept loop, the same ServerTLS: the same session table)
            second = socket.create_server(("127.0.0.1", 0))
            thief_thread = threading.Thread(target=lambda: thief_server(second), daemon=True)
            thief_thread.start()
            raw = client_context(bob).wrap_socket(socket.create_connection(second.getsockname()))
            fields = {
                "versions": [3],
                "codecs": [session.codec.name],
                "heartbeat": 5.0,
                "window": 64,
                "window_bytes": 1 << 20,
                "max_frame": 1 << 20,
                "resume": {"id": session.session_id, "token": session.token, "received": 0},
                "agent": "thief",
            }
            raw.sendall(PREFACE + encode_control(FrameType.HELLO, fields))
            raw.settimeout(T)
            decoder = FrameDecoder(1 << 20)
            while data := raw.recv(65536):
                decoder.feed(data)
            raw.close()
            thief_thread.join(T)
            second.close()
            ((ftype, body),) = list(decoder.frames())
            assert ftype == FrameType.CLOSE
            code, reason, _ = decode_close(body)
            assert code == CloseCode.AUTH_FAILED and "another identity" in reason
            # alice's session was not touched
            cli.send("still mine")
            assert cli.recv(timeout=T) == "still mine"
            assert cli.runtime.links_opened == cli.runtime.session.stats.links
            cli.close()
    finally:
        stop.set()
        thread.join(T)
        listener.close()
    assert [data for data, _ in got] == [*range(20), "still mine"]
    assert {name for _, name in got} == {"alice"}
    assert len(refusals) == 1 and "another identity" in str(refusals[0])


def test_tls_runs_over_memory_bios_with_messages_larger_than_its_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The blocking driver decrypts through TLSEngine (security/tlsbio.py), a TLS record
    # at a time into a 256 KiB shared buffer: messages around and beyond those sizes
    # come through whole, both ways, on a plain socket (no ssl.SSLSocket and its buffer).
    monkeypatch.setenv("KORINET_HOME", str(tmp_path / "home"))
    server_key = Identity.generate()
    tls = ServerTLS(server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    sizes = [1, 16 * 1024 - 40, 16 * 1024 + 1, 100_000, 256 * 1024 + 7, 600_000]
    echoed: list[int] = []
    links: list[Any] = []

    def app() -> None:
        srv = server(listener.accept()[0], tls=tls)
        links.append(srv.peer._sock)
        for _ in sizes:
            data = srv.recv(timeout=T)
            echoed.append(len(data))
            srv.send(data)

    thread = threading.Thread(target=app, daemon=True)
    thread.start()
    pinned = ClientTLS(fingerprint=server_key.fingerprint)
    cli = client("127.0.0.1", listener.getsockname()[1], timeout=T, tls=pinned)
    for i, size in enumerate(sizes):
        payload = bytes((i + k) % 251 for k in range(size))
        cli.send(payload)
        assert cli.recv(timeout=T) == payload
    thread.join(T)
    assert echoed == sizes
    assert type(links[0]) is socket.socket and type(cli.runtime._sock) is socket.socket
    cli.close()
    listener.close()


def _accept_loop(listener: socket.socket, stop: threading.Event, outcomes: list[Any], **kwargs: Any) -> None:
    """The README's server, in one thread: accept, server(conn), next; each
    server(conn) or its exception goes to ``outcomes``, in order."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        try:
            outcomes.append(server(conn, **kwargs))
        except (KoriNetError, OSError) as exc:
            outcomes.append(exc)


def _server_threads(besides: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("korinet-server-") and t not in besides]


def test_beyond_max_detached_the_session_detached_longest_expires_and_its_thread_ends(table: Any) -> None:
    sessions = table(max_detached=3)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    served: list[Any] = []
    stop = threading.Event()
    before = set(threading.enumerate())
    thread = threading.Thread(target=_accept_loop, args=(listener, stop, served), daemon=True)
    thread.start()
    raws: list[socket.socket] = []
    try:
        clients = [client("127.0.0.1", port, timeout=T) for _ in range(6)]
        ids = [c.runtime.session_id for c in clients]
        wait_until(lambda: len(served) == 6, timeout=T, what="six sessions")
        handles = [sessions.sessions[i] for i in ids]
        assert [s.peer for s in served] == handles  # (one connection at a time, in order)
        creds = []
        for c in clients:
            s = c.runtime.session
            assert s.session_id is not None and s.token is not None and s.codec is not None
            creds.append((s.session_id, s.token, s.codec.name))
        for c, h in zip(clients, handles, strict=True):
            c.runtime.abort()  # vanishes without a CLOSE
            wait_until(lambda h=h: h.detached_at is not None, timeout=T, what=f"{h!r} detached")
        # the three that detached first were expired, oldest first; three are kept
        wait_until(lambda: set(sessions.sessions) == set(ids[3:]), timeout=T, what="three expired")
        assert list(sessions.detached) == handles[3:]
        for h in handles[:3]:
            assert isinstance(h.endpoint.ended, ConnectionClosedError)
            assert h.endpoint.ended.code == CloseCode.SESSION_UNKNOWN
        # and their background threads are gone: three sessions, three threads
        wait_until(lambda: len(_server_threads(before)) == 3, timeout=T, what="three server threads")
        assert not any(h._bg_thread.is_alive() for h in handles[:3])
        # the application's send to a kept session waits for its client's return
        with pytest.raises(ConnectionClosedError):
            served[5].send("while away")
        # an expired one's client comes back: a new session, told its old one expired
        raw, frames = _raw_resume(port, *creds[0])
        raws.append(raw)
        welcome = decode_control(frames[0][1])
        assert frames[0][0] == FrameType.WELCOME and welcome["resumed"] is False
        assert welcome["expired"] == ids[0] and welcome["session"] not in ids
        fresh = welcome["session"]
        # a kept one's resumes, and gets what was sent while it was away
        raw, frames = _raw_resume(port, *creds[5], until=FrameType.MSG)
        raws.append(raw)
        welcome = decode_control(frames[0][1])
        assert frames[0][0] == FrameType.WELCOME and welcome["resumed"] is True
        assert frames[-1][0] == FrameType.MSG and b"while away" in frames[-1][1]
        wait_until(lambda: len(served) == 8, timeout=T, what="both served")
        assert served[7].peer is handles[5] and handles[5] not in sessions.detached
        assert served[6].peer.session_id == fresh and fresh in sessions.sessions
    finally:
        stop.set()
        thread.join(T)
        listener.close()
        for raw in raws:
            raw.close()
        for h in list(sessions.sessions.values()):
            h.abort()


def test_a_table_of_its_own_holds_its_limits_and_its_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """server(conn, table=...): the application's own limits (here one session at a
    time) and its own TLS identity and authorized keys, without the shared table."""
    monkeypatch.setenv("KORINET_HOME", str(tmp_path / "home"))
    server_key, alice, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    keys = AuthorizedKeys(tmp_path / "authorized_keys")
    keys.authorize(alice.fingerprint, "alice")
    table = SessionTable(tls=ServerTLS(server_key, authorized=keys), max_sessions=1)
    with socket.socket() as unused, pytest.raises(ValueError, match="carries its own"):
        server(unused, table=table, tls=ServerTLS(server_key))
    with pytest.raises(ValueError, match="not both"):
        SessionTable(tls=ServerTLS(server_key), authorized=keys)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    served: list[Any] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=_accept_loop, args=(listener, stop, served), kwargs={"table": table}, daemon=True
    )
    thread.start()
    pinned = ClientTLS(alice, fingerprint=server_key.fingerprint)
    try:
        first = client("127.0.0.1", port, timeout=T, tls=pinned)
        sending = threading.Thread(target=first.send, args=("one",), daemon=True)
        sending.start()  # (send() returns once the server's application has it)
        wait_until(lambda: len(served) == 1, timeout=T, what="the first session served")
        assert served[0].recv(timeout=T) == "one"
        sending.join(T)
        assert served[0].peer.identity.name == "alice"
        assert set(table.sessions) == {first.runtime.session_id}  # this table's, not the shared one
        # a key the table does not list is refused
        with pytest.raises(AuthenticationError):
            client("127.0.0.1", port, timeout=T, tls=ClientTLS(mallory, fingerprint=server_key.fingerprint))
        # a second session while the first lives: "try again later" (max_sessions=1),
        # and the client does, until the first session ends
        later: list[Any] = []
        second = threading.Thread(
            target=lambda: later.append(client("127.0.0.1", port, timeout=T, tls=pinned)),
            daemon=True,
        )
        second.start()
        wait_until(
            lambda: any(
                isinstance(o, ConnectionClosedError) and o.code == CloseCode.TRY_AGAIN_LATER for o in served
            ),
            timeout=T,
            what="the second session refused for now",
        )
        first.close()
        second.join(T)
        (again,) = later
        sending = threading.Thread(target=again.send, args=("two",), daemon=True)
        sending.start()
        assert served[-1].recv(timeout=T) == "two"
        sending.join(T)
        assert set(table.sessions) == {again.runtime.session_id}
        again.close()
    finally:
        stop.set()
        thread.join(T)
        listener.close()


def test_a_wrong_passphrase_does_not_hold_up_the_accept_loop(table: Any) -> None:
    secret = "the right passphrase"
    sessions = table(passphrase=secret)
    # 127.0.0.2 failed 7 times, 20 s ago (the delay of the last, 16 s, has passed):
    # it may try again, and its next failure imposes the longest delay
    with sessions._lock:
        for _ in range(7):
            sessions._auth_failures.failed("127.0.0.2", time.monotonic() - 20, "earlier guesses")
    listener = socket.create_server(("127.0.0.1", 0))
    outcomes: list[Any] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=_accept_loop, args=(listener, stop, outcomes), kwargs={"passphrase": secret}, daemon=True
    )
    thread.start()
    try:
        with Relay(listener.getsockname(), source="127.0.0.2") as guesser:
            started = time.monotonic()
            with pytest.raises(AuthenticationError, match="wrong passphrase"):
                client("127.0.0.1", guesser.port, passphrase="a guess", timeout=T)
            # the same loop serves the next client at once, not after AUTH_DELAY_MAX
            good = client("127.0.0.1", listener.getsockname()[1], passphrase=secret, timeout=T)
            assert time.monotonic() - started < AUTH_DELAY_MAX / 3
            wait_until(lambda: len(outcomes) == 2, timeout=T, what="both served")
            assert isinstance(outcomes[0], AuthenticationError)
            assert outcomes[1].peer.session_id == good.runtime.session_id
            # the guesser's next attempts, within its delay, are closed at once, before
            # any handshake (no guess is checked); its client retries until it gives up
            with pytest.raises(KoriNetError):
                client("127.0.0.1", guesser.port, passphrase="another guess", timeout=2)
            wait_until(lambda: len(outcomes) >= 3, timeout=T, what="the refusal")
            for refusal in outcomes[2:]:
                assert isinstance(refusal, ConnectionClosedError), refusal
                assert refusal.code == CloseCode.TRY_AGAIN_LATER
                assert "too many failed authentications from 127.0.0.2, retry in" in str(refusal)
            with sessions._lock:
                assert sessions._auth_failures._failures["127.0.0.2"][0] == 8  # (7, then ours)
            good.close()
    finally:
        stop.set()
        thread.join(T)
        listener.close()
