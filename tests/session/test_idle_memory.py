"""What an idle session costs a server in Python allocations: the Session a hub
makes for a client, and the Endpoint above it, once the handshake is done and
before any message. Counted with tracemalloc over many sessions: bytes, not time.

Most of a server's sessions are idle (README: 10,000 at a few KiB each), so an
empty deque, set or instance dict per session is what this guards against.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from session_helpers import CODECS

from korinet.endpoint import Done, Endpoint
from korinet.messages import Message
from korinet.plugins import PluginManager
from korinet.session import (
    CLIENT,
    SERVER,
    HandshakeOutcome,
    Hello,
    LinkOpened,
    MessageReceived,
    ServerHandshake,
    Session,
    SessionConfig,
)

SESSIONS = 200
#: A Session and its Endpoint took 6,923 B here before their deques and sets were made
#: on first use and both classes had slots; 1,260 B since (CPython 3.11). Generous, but
#: one more empty deque (760 B) or instance dict would not fit in the margin.
IDLE_BYTES = 2_000
#: What one exchange may leave behind in a client and server session pair: 4,611 B
#: when their emptied queues were kept (760 B each, two on the client, four on the
#: server); ~0 B since they are dropped.
PER_EXCHANGE = 500


class Quiet:
    """A Driver that allocates nothing of its own (what it keeps would be counted)."""

    def inbox_readable(self) -> None:
        pass

    def space_available(self) -> None:
        pass

    def flush_soon(self) -> None:
        pass

    def link_opened(self, ev: LinkOpened) -> None:
        pass

    def ended(self, error: Any) -> None:
        pass

    def call_hook(self, hook: Callable[..., list[Any]], *args: Any) -> None:
        hook(*args)

    def call_handler(self, handler: Callable[..., Any], msg: Message) -> Any:
        return handler(None, msg)

    def run_awaitable(self, awaitable: Awaitable[Any], done: Done) -> None:
        raise AssertionError("no handler runs in an idle session")


def _hello(config: SessionConfig) -> Hello:
    client = Session(CLIENT, CODECS, config)
    client.connection_made(0.0)
    handshake = ServerHandshake(config, tuple(CODECS))
    assert handshake.receive_data(client.data_to_send()) is HandshakeOutcome.HELLO
    assert handshake.hello is not None
    return handshake.hello


def _idle_session(hello: Hello, config: SessionConfig, plugins: PluginManager) -> Endpoint:
    """What a hub holds for one idle client: an accepted Session and its Endpoint,
    the WELCOME written and the LinkOpened processed."""
    session = Session(SERVER, CODECS, config)
    endpoint = Endpoint(session, plugins, session, Quiet())  # type: ignore[arg-type]
    session.accept(hello, 0.0)
    assert session.data_to_send()
    endpoint.process(session.events_received())
    assert endpoint.links_opened == 1
    return endpoint


def test_an_idle_server_session_and_its_endpoint_stay_small() -> None:
    config = SessionConfig()  # one for all, as a hub's
    plugins = PluginManager.load(entry_points=False)
    hello = _hello(config)
    _idle_session(hello, config, plugins)  # warm up: caches, interned names
    held: list[Endpoint | None] = [None] * SESSIONS  # allocated before counting
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(SESSIONS):
            held[i] = _idle_session(hello, config, plugins)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per_session = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / SESSIONS
    assert all(e is not None and e.session.state.name == "OPEN" for e in held)
    assert per_session <= IDLE_BYTES, f"an idle Session and Endpoint take {per_session:,.0f} B"


class Box:
    """A waiter without a loop."""

    def __init__(self) -> None:
        self.finished = False
        self.result: Any = None

    def done(self) -> bool:
        return self.finished

    def set_result(self, result: Any, /) -> None:
        self.finished, self.result = True, result

    def set_exception(self, exception: BaseException, /) -> None:
        self.finished, self.result = True, exception

    def exception(self) -> BaseException | None:
        return None


def _opened_pair(config: SessionConfig, plugins: PluginManager) -> tuple[Session, Endpoint]:
    """A client Session and the server's Endpoint, joined by hand (no pair helper:
    its logs would be counted too)."""
    client = Session(CLIENT, CODECS, config)
    client.connection_made(0.0)
    handshake = ServerHandshake(config, tuple(CODECS))
    assert handshake.receive_data(client.data_to_send()) is HandshakeOutcome.HELLO
    assert handshake.hello is not None
    server = Session(SERVER, CODECS, config)
    endpoint = Endpoint(server, plugins, server, Quiet())  # type: ignore[arg-type]
    server.accept(handshake.hello, 0.0)
    client.receive_data(server.data_to_send(), 0.0)
    endpoint.process(server.events_received())
    assert client.state.name == "OPEN" and client.events_received()
    return client, endpoint


def _converse(client: Session, endpoint: Endpoint) -> None:
    """One message each way, taken by the application and acknowledged."""
    server = endpoint.session
    client.send_message("up")
    server.receive_data(client.data_to_send(), 0.0)
    endpoint.process(server.events_received())
    assert endpoint.take().data == "up"
    box = Box()
    endpoint.sent(server.send_message("down"), box)
    client.receive_data(server.data_to_send(), 0.0)  # the ACK of "up", then "down"
    (received,) = [e for e in client.events_received() if isinstance(e, MessageReceived)]
    client.message_delivered(received.seq, client.epoch)
    server.receive_data(client.data_to_send(), 0.0)
    endpoint.process(server.events_received())
    assert box.finished and box.result is None and client.unacked == 0 and server.unacked == 0


def test_a_session_idle_again_after_traffic_gives_its_queues_back() -> None:
    config = SessionConfig()
    plugins = PluginManager.load(entry_points=False)
    warm = _opened_pair(config, plugins)
    _converse(*warm)
    pairs = [_opened_pair(config, plugins) for _ in range(SESSIONS)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for client, endpoint in pairs:
            _converse(client, endpoint)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per_pair = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / SESSIONS
    assert per_pair <= PER_EXCHANGE, f"a client and server session grew {per_pair:,.0f} B by one exchange"


def test_first_use_makes_what_an_idle_session_lacks() -> None:
    """The lazily made queues work from the first message on both sides (and the
    session and endpoint keep no instance dict to put anything else in)."""
    config = SessionConfig()
    plugins = PluginManager.load(entry_points=False)
    endpoint = _idle_session(_hello(config), config, plugins)
    session = endpoint.session
    assert not hasattr(session, "__dict__") and not hasattr(endpoint, "__dict__")
    assert session.unacked == 0 and session.can_send(10)
    assert session.snapshot().messages == () and session.unacked_after(0) == []
    seq = session.send_message({"n": 1})
    assert session.unacked == 1 and session.unacked_after(0)[0][0] == seq
