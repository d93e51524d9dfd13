"""The notebook and its validators as pure code."""

from __future__ import annotations

import pytest
from korinet_notebook import MAX_KEY_LENGTH, MAX_VALUE_BYTES, Notebook, NotebookFull
from korinet_notebook.notebook import (
    validate_changed,
    validate_key_request,
    validate_prefix_request,
    validate_put,
)


def test_put_get_delete_list_with_versions() -> None:
    nb = Notebook()
    assert nb.put("a/1", "one").version == 1
    assert nb.put("b", b"\x00bytes").version == 2
    assert nb.put("a/1", "uno").version == 3
    assert nb.get("a/1").value == "uno"
    assert [e.key for e in nb.list()] == ["a/1", "b"]
    assert [e.key for e in nb.list("a/")] == ["a/1"]
    assert nb.delete("a/1") == 4
    assert nb.delete("a/1") is None
    with pytest.raises(KeyError, match="a/1"):
        nb.get("a/1")
    assert len(nb) == 1


def test_a_full_notebook_refuses_new_keys_but_updates_old_ones() -> None:
    nb = Notebook(max_entries=2)
    nb.put("a", "1")
    nb.put("b", "2")
    with pytest.raises(NotebookFull):
        nb.put("c", "3")
    assert nb.put("a", "again").value == "again"


@pytest.mark.parametrize(
    "payload, error",
    [
        ({"key": "k", "value": "v"}, None),
        ({"key": "k", "value": b"\xff"}, None),
        ({"key": "k" * MAX_KEY_LENGTH, "value": "v" * MAX_VALUE_BYTES}, None),
        ("k=v", TypeError),
        ({"key": "k"}, ValueError),
        ({"key": "k", "value": "v", "ttl": 3}, ValueError),
        ({"key": "", "value": "v"}, ValueError),
        ({"key": "two words", "value": "v"}, ValueError),
        ({"key": "bell\a", "value": "v"}, ValueError),
        ({"key": 7, "value": "v"}, TypeError),
        ({"key": "k" * (MAX_KEY_LENGTH + 1), "value": "v"}, ValueError),
        ({"key": "k", "value": 3}, TypeError),
        ({"key": "k", "value": "é" * (MAX_VALUE_BYTES // 2 + 1)}, ValueError),  # counted in UTF-8 bytes
    ],
)
def test_validate_put(payload: object, error: type[Exception] | None) -> None:
    if error is None:
        validate_put(payload)
    else:
        with pytest.raises(error):
            validate_put(payload)


def test_the_other_validators() -> None:
    validate_key_request({"key": "k"})
    validate_prefix_request({"prefix": ""})
    validate_changed({"key": "k", "value": None, "version": 3, "deleted": True})
    with pytest.raises(ValueError):
        validate_key_request({"key": ""})
    with pytest.raises(ValueError):
        validate_prefix_request({"prefix": "a b"})
    with pytest.raises(TypeError):
        validate_changed({"key": "k", "value": "v", "version": True, "deleted": False})
    with pytest.raises(TypeError):
        validate_changed({"key": "k", "value": "v", "version": 1, "deleted": "no"})
