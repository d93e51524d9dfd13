"""The Endpoint above a Session, with no I/O at all: an in-memory SessionPair, a
recording driver and waiters that are not asyncio futures (the blocking runtime's
kind), so what both runtimes share is checked apart from either of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from session_helpers import SessionPair

from korinet.endpoint import REALTIME_INBOX, Done, Endpoint
from korinet.exceptions import ConnectionClosedError, MessageRejected
from korinet.hookspecs import hookimpl
from korinet.messages import Message, MessageType
from korinet.plugins import PluginManager
from korinet.session import CloseCode, LinkOpened
from korinet.wire.frames import MessageFlags

REQUEST = int(MessageFlags.REQUEST)


class Box:
    """A waiter without a loop (as the blocking client's)."""

    def __init__(self) -> None:
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.finished

    def set_result(self, result: Any, /) -> None:
        assert not self.finished, "resolved twice"
        self.finished, self.result = True, result

    def set_exception(self, exception: BaseException, /) -> None:
        assert not self.finished, "resolved twice"
        self.finished, self.error = True, exception

    def exception(self) -> BaseException | None:
        return self.error


class Recorder:
    """A Driver that records what the Endpoint asks of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.ended_with: list[BaseException] = []
        self.hooks: list[str] = []
        self.pending: list[tuple[Awaitable[Any], Done]] = []

    def inbox_readable(self) -> None:
        self.calls.append("inbox")

    def space_available(self) -> None:
        self.calls.append("space")

    def flush_soon(self) -> None:
        self.calls.append("flush")

    def link_opened(self, ev: LinkOpened) -> None:
        self.calls.append("opened")

    def ended(self, error: Any) -> None:
        self.ended_with.append(error)

    def call_hook(self, hook: Callable[..., list[Any]], *args: Any) -> None:
        self.hooks.append(hook.__name__)
        hook(*args)

    def call_handler(self, handler: Callable[..., Any], msg: Message) -> Any:
        return handler(None, msg)

    def run_awaitable(self, awaitable: Awaitable[Any], done: Done) -> None:
        self.pending.append((awaitable, done))


async def _later(value: Any) -> Any:
    return {"later": value}


def _fails(peer: Any, msg: Message) -> Any:
    raise ValueError("no such thing")


class Types:
    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [
            MessageType("t.now", handler=lambda peer, msg: {"now": msg.data}),
            MessageType("t.later", handler=lambda peer, msg: _later(msg.data)),
            MessageType("t.fails", handler=_fails),
        ]


@pytest.fixture
def plugins() -> PluginManager:
    pm = PluginManager.load(entry_points=False)
    pm.register(Types(), "test-types")
    return pm


class Side:
    def __init__(self, session: Any, plugins: PluginManager) -> None:
        self.driver = Recorder()
        self.endpoint = Endpoint(session, plugins, session, self.driver)
        self.seen = 0


def step(pair: SessionPair, client: Side, server: Side) -> None:
    """Carry bytes both ways and feed each side's new events to its Endpoint, until quiet."""
    for _ in range(10):
        pair.pump()
        fresh_c = pair.client_events[client.seen :]
        fresh_s = pair.server_events[server.seen :]
        client.seen, server.seen = len(pair.client_events), len(pair.server_events)
        if not fresh_c and not fresh_s:
            return
        client.endpoint.process(fresh_c)
        server.endpoint.process(fresh_s)
    raise AssertionError("the pair never went quiet")


def opened(plugins: PluginManager) -> tuple[SessionPair, Side, Side]:
    pair = SessionPair()
    pair.connect()
    client = Side(pair.client, plugins)
    pair.pump()
    assert pair.server is not None
    server = Side(pair.server, plugins)
    step(pair, client, server)
    assert client.endpoint.links_opened == 1 and server.endpoint.links_opened == 1
    assert "opened" in client.driver.calls
    return pair, client, server


def request(pair: SessionPair, client: Side, type: str, obj: Any) -> tuple[Box, Box]:
    reply, ack = Box(), Box()
    corr = client.endpoint.new_request(reply)
    seq = pair.client.send_message(obj, type, flags=REQUEST, corr=corr)
    client.endpoint.sent(seq, ack)
    client.endpoint.request_sent(corr, seq)
    return reply, ack


def test_acks_resolve_by_seq_and_plain_messages_reach_the_inbox(plugins: PluginManager) -> None:
    pair, client, server = opened(plugins)
    boxes = []
    for i in range(3):
        box = Box()
        client.endpoint.sent(pair.client.send_message(f"m{i}"), box)
        boxes.append(box)
    step(pair, client, server)
    assert [m.data for m, _ in server.endpoint.inbox] == ["m0", "m1", "m2"]
    assert "inbox" in server.driver.calls
    assert not any(b.done() for b in boxes)  # not taken by the application yet
    for msg, epoch in list(server.endpoint.inbox):
        server.endpoint.deliver(msg.seq, epoch=epoch)
    step(pair, client, server)
    assert all(b.done() and b.error is None for b in boxes)
    assert "space" in client.driver.calls


def test_a_request_gets_its_handlers_reply_by_corr(plugins: PluginManager) -> None:
    pair, client, server = opened(plugins)
    first, first_ack = request(pair, client, "t.now", 1)
    second, _ = request(pair, client, "t.now", 2)
    step(pair, client, server)
    assert first.result == {"now": 1} and second.result == {"now": 2}
    assert first_ack.done() and first_ack.error is None  # the reply carried the ack
    assert not server.endpoint.inbox  # a handled type never reaches the inbox


def test_an_async_handler_answers_through_the_driver(plugins: PluginManager) -> None:
    pair, client, server = opened(plugins)
    reply, _ = request(pair, client, "t.later", 7)
    step(pair, client, server)
    assert not reply.done()
    [(awaitable, done)] = server.driver.pending
    coro = awaitable.__await__()
    with pytest.raises(StopIteration) as stop:
        next(coro)
    done(stop.value.value, None)
    assert server.driver.calls[-1] == "flush"  # nothing else would write the late reply
    step(pair, client, server)
    assert reply.result == {"later": 7}


def test_a_failing_handler_rejects_the_request(plugins: PluginManager) -> None:
    pair, client, server = opened(plugins)
    reply, _ = request(pair, client, "t.fails", None)
    unknown, _ = request(pair, client, "t.unknown", None)
    step(pair, client, server)
    assert isinstance(reply.error, MessageRejected) and "no such thing" in str(reply.error)
    assert isinstance(unknown.error, MessageRejected) and "unknown message type" in str(unknown.error)
    assert (
        server.driver.hooks.count("message_rejected") == 1
    )  # the unknown type (a handler's error is a reply)


def test_finish_fails_every_waiter_once_and_tells_the_driver(plugins: PluginManager) -> None:
    pair, client, _ = opened(plugins)
    reply, ack = request(pair, client, "t.now", 1)
    error = ConnectionClosedError(CloseCode.LINK_LOST, "gone")
    assert client.endpoint.finish(error) is True
    assert client.endpoint.finish(ConnectionClosedError(CloseCode.NORMAL, "again")) is False
    assert reply.error is error and ack.error is error
    assert client.driver.ended_with == [error]
    assert client.driver.calls[-2:] == ["space", "inbox"]  # blocked callers wake to see the end


def test_realtime_goes_to_the_realtime_inbox(plugins: PluginManager) -> None:
    pair, client, server = opened(plugins)
    assert pair.client.send_realtime("tick", "")
    step(pair, client, server)
    assert [m.data for m in server.endpoint.rt_inbox or ()] == ["tick"]
    taken = server.endpoint.take_realtime()
    assert taken is not None and taken.data == "tick"
    assert server.endpoint.take_realtime() is None


def test_a_full_realtime_inbox_drops_its_oldest(plugins: PluginManager) -> None:
    pair, client, server = opened(plugins)
    for i in range(REALTIME_INBOX + 2):
        assert pair.client.send_realtime(i, "")
    step(pair, client, server)
    assert pair.server is not None and pair.server.stats.realtime_dropped == 2
    taken = [m.data for m in iter(server.endpoint.take_realtime, None)]
    assert taken == list(range(2, REALTIME_INBOX + 2))
