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
    ServerHandshake,
    Session,
    SessionConfig,
)

SESSIONS = 200
#: A Session and its Endpoint took 6,923 B here before their deques and sets were made
#: on first use and both classes had slots; 1,260 B since (CPython 3.11). Generous, but
#: one more empty deque (760 B) or instance dict would not fit in the margin.
IDLE_BYTES = 2_000


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
