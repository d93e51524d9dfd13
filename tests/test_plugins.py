"""The plugin manager: registration, conflicts named, disabling, isolation."""

from __future__ import annotations

import pytest

from korinet import MessageType, hookimpl
from korinet.codecs.json import JsonCodec
from korinet.plugins import DISABLE_ENV, PluginConflict, PluginManager


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
