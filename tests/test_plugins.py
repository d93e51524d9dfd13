"""The plugin manager: registration, conflicts named, disabling, isolation, calls
through pluggy, tracing, the codecs offered, and the link-reopened and ack-timing hooks."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pluggy
import pytest
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Client, MessageType, Server, SessionConfig, hookimpl
from korinet.codecs.base import default_offer
from korinet.codecs.json import JsonCodec
from korinet.hookspecs import hookspec
from korinet.plugins import DISABLE_ENV, TRACE_ENV, PluginConflict, PluginManager
from korinet.session import CLIENT, Session

T = 20 * TIMEOUT_FACTOR


class Notes:
    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [MessageType("notes.put", description="store a note")]


class OtherNotes:
    @hookimpl
    def korinet_register_message_types(self) -> list[MessageType]:
        return [MessageType("notes.put")]


class JsonAgain:
    @hookimpl
    def korinet_register_codecs(self) -> list[JsonCodec]:
        return [JsonCodec()]


def test_builtins_register_through_the_same_hooks() -> None:
    pm = PluginManager.load(entry_points=False)
    assert set(pm.codecs()) == {"msgpack", "json"}
    assert "korinet.echo" in pm.message_types()
    names = {info.name: info for info in pm.plugins()}
    assert names["korinet.codecs"].codecs == ("msgpack", "json")
    assert names["korinet.builtin"].message_types == ("korinet.echo",)


def test_a_plugin_adds_a_message_type() -> None:
    pm = PluginManager.load(entry_points=False, extra=[Notes()])
    assert pm.message_types()["notes.put"].description == "store a note"


def test_two_plugins_claiming_one_message_type_name_both() -> None:
    pm = PluginManager.load(entry_points=False)
    pm.register(Notes(), name="notes")
    pm.register(OtherNotes(), name="other-notes")
    with pytest.raises(PluginConflict) as info:
        pm.message_types()
    assert "notes" in str(info.value) and "other-notes" in str(info.value)
    assert set(info.value.plugins) == {"notes", "other-notes"}


def test_a_codec_name_clash_names_both_plugins() -> None:
    pm = PluginManager.load(entry_points=False)
    pm.register(JsonAgain(), name="json-again")
    with pytest.raises(PluginConflict, match="json-again") as info:
        pm.codecs()
    assert "korinet.codecs" in str(info.value)


def test_plugins_can_be_disabled_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "korinet.builtin")
    pm = PluginManager.load(entry_points=False)
    assert "korinet.echo" not in pm.message_types()
    assert "msgpack" in pm.codecs()


def test_an_impl_without_a_spec_is_refused() -> None:
    class Typo:
        @hookimpl
        def korinet_sesion_opened(self, session: object) -> None: ...

    with pytest.raises(Exception, match="korinet_sesion_opened"):
        PluginManager.load(entry_points=False, extra=[Typo()])


# ---------------------------------------------------------------------- through pluggy


class Recorder:
    """Implements the session hooks, remembering each call in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.event = asyncio.Event()

    def _note(self, *call: Any) -> None:
        self.calls.append((call[0], call[1:]))
        self.event.set()

    async def wait_for(self, hook: str, count: int = 1) -> list[tuple[Any, ...]]:
        async def enough() -> list[tuple[Any, ...]]:
            while len(found := [a for h, a in self.calls if h == hook]) < count:
                self.event.clear()
                await self.event.wait()
            return found

        return await asyncio.wait_for(enough(), T)

    @hookimpl
    def korinet_session_opened(self, session: Any) -> None:
        self._note("opened", session)

    @hookimpl
    def korinet_session_resumed(self, session: Any, replayed: int) -> None:
        self._note("resumed", session, replayed)

    @hookimpl
    def korinet_link_reopened(self, session: Any, resumed: bool, replayed: int) -> None:
        self._note("reopened", session, resumed, replayed)

    @hookimpl
    def korinet_ack_timed(self, session: Any, seq: int, rtt: float) -> None:
        self._note("acked", session, seq, rtt)


class Wrapper:
    """A pluggy wrapper around every other plugin's korinet_session_opened."""

    def __init__(self) -> None:
        self.wrapped = 0

    @hookimpl(wrapper=True)
    def korinet_session_opened(self, session: Any) -> Any:
        result = yield
        self.wrapped += 1
        return result


async def test_hook_calls_go_through_pluggys_caller_so_its_tracing_and_wrappers_see_them() -> None:
    recorder, wrapper = Recorder(), Wrapper()
    pm = PluginManager.load(entry_points=False, extra=[recorder, wrapper])
    seen: list[tuple[str, list[str]]] = []
    undo = pm.pm.add_hookcall_monitoring(
        lambda hook, impls, kwargs: seen.append((hook, [i.plugin_name for i in impls])),
        lambda outcome, hook, impls, kwargs: None,
    )
    async with Server("127.0.0.1", 0, plugins=pm) as server:
        async with await Client.connect("127.0.0.1", server.port, plugins=pm):
            await recorder.wait_for("opened", 2)
    undo()
    hooks = [hook for hook, _ in seen]
    assert hooks.count("korinet_session_opened") == 2  # client and server side
    assert "korinet_server_started" in hooks  # no implementation: still seen while monitored
    assert wrapper.wrapped == 2
    assert pm.pm.monitors == 0


def test_registrations_go_through_pluggys_caller_too() -> None:
    seen: list[str] = []
    pm = PluginManager.load(entry_points=False)
    pm.pm.add_hookcall_monitoring(lambda hook, impls, kwargs: seen.append(hook), lambda *a: None)
    pm.codecs()
    pm.message_types()
    assert seen == ["korinet_register_codecs", "korinet_register_message_types"]


class Slow:
    @hookimpl
    def korinet_session_opened(self, session: Any) -> None:
        pass

    @hookimpl
    async def korinet_session_closed(self, session: Any, reason: str) -> None:
        raise RuntimeError("closed badly")

    @hookimpl
    def korinet_session_lost(self, session: Any, error: BaseException) -> None:
        raise ValueError("lost badly")


async def test_trace_logs_every_call_with_plugin_duration_and_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TRACE_ENV, "1")
    pm = PluginManager.load(entry_points=False)
    pm.register(Slow(), name="slow")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    trace = logging.getLogger("korinet.trace")
    assert trace.getEffectiveLevel() <= logging.INFO  # the env var made it visible
    trace.addHandler(handler)
    try:
        pm.codecs()
        assert pm.session_opened(object()) == []
        assert pm.session_lost(object(), OSError()) == []
        [awaitable] = pm.session_closed(object(), "bye")
        await awaitable.run()
    finally:
        trace.removeHandler(handler)
    pattern = r"{} plugin={} \d+\.\d{{3}} ms {}"
    expected = [
        ("korinet_register_codecs", "korinet.codecs", "ok, 2 registered"),
        ("korinet_session_opened", "slow", "ok"),
        ("korinet_session_lost", "slow", "raised ValueError: lost badly"),
        ("korinet_session_closed", "slow", "returned an awaitable"),
        ("korinet_session_closed", "slow", "awaited: raised RuntimeError: closed badly"),
    ]
    assert len(lines) == len(expected), lines
    for line, (hook, plugin, outcome) in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern.format(hook, re.escape(plugin), re.escape(outcome)), line), line


def test_without_trace_nothing_is_logged_and_unimplemented_hooks_are_not_called(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    pm = PluginManager.load(entry_points=False, trace=False)
    caplog.set_level(logging.DEBUG)
    calls: list[str] = []
    call = pluggy.HookCaller.__call__

    def spy(self: pluggy.HookCaller, **kwargs: Any) -> Any:
        calls.append(self.name)
        return call(self, **kwargs)

    monkeypatch.setattr(pluggy.HookCaller, "__call__", spy)
    assert pm.ack_timed(object(), 1, 0.1) == [] and not pm.times_acks
    assert calls == []  # the per-message path: nobody listens, not even pluggy is called
    recorder = Recorder()
    pm.register(recorder, name="recorder")
    assert pm.times_acks
    pm.ack_timed(object(), 1, 0.1)
    # implemented, without a wrapper or a tracer: called directly, not through pluggy's caller
    assert calls == [] and [h for h, _ in recorder.calls] == ["acked"]
    assert not [r for r in caplog.records if r.name == "korinet.trace"]
    undo = pm.pm.add_hookcall_monitoring(lambda *a: None, lambda *a: None)
    pm.ack_timed(object(), 2, 0.1)  # a monitor sees every call: through pluggy again
    undo()
    assert calls == ["korinet_ack_timed"] and len(recorder.calls) == 2


class _Order:
    def __init__(self, name: str, seen: list[str], answer: bool = False) -> None:
        self.name, self.seen, self.answer = name, seen, answer

    @hookimpl
    def korinet_session_closed(self, session: Any, reason: str) -> Any:
        self.seen.append(self.name)
        return self._later() if self.answer else None

    async def _later(self) -> None:
        self.seen.append(f"{self.name} awaited")


class _First(_Order):
    @hookimpl(tryfirst=True)
    def korinet_session_closed(self, session: Any, reason: str) -> Any:
        return super().korinet_session_closed(session, reason)


async def test_direct_notification_calls_like_pluggy() -> None:
    # The direct path (no wrapper, no tracer) calls the implementations in pluggy's
    # order and returns their awaitables, as pluggy's caller does; with a wrapper
    # registered, pluggy's caller runs again (and the wrapper sees the call).
    seen: list[str] = []
    pm = PluginManager.load(entry_points=False, trace=False)
    for plugin in (_First("first", seen), _Order("a", seen, answer=True), _Order("b", seen)):
        pm.register(plugin, name=plugin.name)
    via_pluggy = pm.pm.hook.korinet_session_closed(session=object(), reason="x")
    order = list(seen)
    seen.clear()
    direct = pm.session_closed(object(), "x")
    assert seen == order == ["first", "b", "a"]
    assert len(direct) == len(via_pluggy) == 1
    await via_pluggy[0].run()
    await direct[0].run()
    assert seen[-1] == "a awaited"

    class CloseWrapper:
        wrapped = 0

        @hookimpl(wrapper=True)
        def korinet_session_closed(self, session: Any, reason: str) -> Any:
            CloseWrapper.wrapped += 1
            return (yield)

    pm.register(CloseWrapper(), name="wrapper")
    seen.clear()
    [awaitable] = pm.session_closed(object(), "x")
    await awaitable.run()
    assert seen == [*order, "a awaited"] and CloseWrapper.wrapped == 1


# ---------------------------------------------------------------------- codecs offered


class Codec:
    def __init__(self, name: str, preference: Any = None) -> None:
        self.name = name
        if preference is not None:
            self.preference = preference

    def encode(self, obj: Any) -> bytes:
        return b""

    def decode(self, data: bytes) -> Any:
        return None


def test_installed_codecs_are_offered_best_first_and_msgpack_is_the_last_resort() -> None:
    codecs = {c.name: c for c in [Codec("json"), Codec("b", 5), Codec("a"), Codec("msgpack"), Codec("c", 5)]}
    codecs["z"] = Codec("z", "high")  # not an int: counts as 0
    codecs["best"] = Codec("best", 50)
    assert default_offer(codecs) == ("best", "b", "c", "a", "z", "msgpack", "json")
    assert default_offer({"json": Codec("json")}) == ("json",)


def test_a_session_offers_the_default_or_the_pinned_list() -> None:
    codecs = {"msgpack": Codec("msgpack"), "json": Codec("json"), "zz": Codec("zz", 1)}
    assert Session(CLIENT, codecs).codec_offer == ("zz", "msgpack", "json")
    pinned = Session(CLIENT, codecs, SessionConfig(codecs=("json", "absent", "msgpack")))
    assert pinned.codec_offer == ("json", "msgpack")


# ---------------------------------------------------------------------- link reopened, ack timing


async def test_link_reopened_follows_resumed_and_acks_are_timed_except_across_a_lost_link() -> None:
    recorder = Recorder()
    pm = PluginManager.load(entry_points=False, extra=[recorder])
    assert pm.times_acks

    async def take(peer: Any) -> None:  # the server's application takes every message
        async for _ in peer:
            pass

    async with Server("127.0.0.1", 0, handler=take, plugins=pm) as server:
        relay = await Relay("127.0.0.1", server.port).start()
        try:
            client = await Client.connect("127.0.0.1", relay.port, plugins=pm, open_timeout=T)
            async with client:
                await client.send("one", timeout=T)
                [(_, seq, rtt)] = [a for a in await recorder.wait_for("acked") if a[0] is client]
                assert seq == 1 and 0 < rtt < T
                assert not await recorder_calls(recorder, "reopened")  # not for the first link

                relay.cut()
                fut = client.send_nowait("across the cut")  # timed from here, while detached
                await asyncio.wait_for(fut, T)
                reopened = [a for a in await recorder.wait_for("reopened") if a[0] is client]
                assert reopened == [(client, True, 1)]  # resumed, the message re-sent
                resumed = [a for h, a in recorder.calls if h == "resumed" and a[0] is client]
                assert resumed == [(client, 1)]
                assert recorder.calls.index(("resumed", (client, 1))) < recorder.calls.index(
                    ("reopened", (client, True, 1))
                )
                assert [a[1] for a in await recorder_calls(recorder, "acked") if a[0] is client] == [1]

                await client.send("three", timeout=T)  # the next one is timed again
                acked = [a for a in await recorder.wait_for("acked", 2) if a[0] is client]
                assert [a[1] for a in acked] == [1, 3]
        finally:
            await relay.close()


async def recorder_calls(recorder: Recorder, hook: str) -> list[tuple[Any, ...]]:
    await asyncio.sleep(0)  # hooks are spawned as tasks: let the pending ones run
    return [a for h, a in recorder.calls if h == hook]


class LookupSpecs:
    """A firstresult lookup hook, as the core may add (main's korinet_cluster_bus is one)."""

    @hookspec(firstresult=True)
    def korinet_test_lookup(self, key: str) -> Any:
        """The first answer wins."""


class Answers:
    @hookimpl
    def korinet_test_lookup(self, key: str) -> Any:
        if key == "boom":
            raise LookupError("no such scheme")
        return f"answer for {key}" if key != "none" else None


def test_a_firstresult_lookup_passes_its_answer_and_its_failure_through_the_guard() -> None:
    pm = PluginManager(trace=True)
    pm.pm.add_hookspecs(LookupSpecs)
    pm.register(Answers(), name="answers")
    hook = pm.pm.hook.korinet_test_lookup
    assert hook(key="x") == "answer for x"  # a notification guard would have swallowed it
    assert hook(key="none") is None
    with pytest.raises(LookupError, match="no such scheme"):  # not isolated: the caller's error
        hook(key="boom")
