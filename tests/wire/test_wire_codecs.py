"""The built-in codecs: round trips, and CodecError (never anything else) on failure.

(Kept beside the wire tests: codecs turn application objects into frame payloads.)
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from korinet.codecs import Codec, JsonCodec, MsgpackCodec, korinet_register_codecs
from korinet.exceptions import CodecError

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20)
json_scalars |= st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
msgpack_values = st.recursive(
    json_scalars | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10) | st.integers(-5, 5), inner, max_size=5)
    ),
    max_leaves=30,
)


def test_builtin_codecs_register_through_the_hook() -> None:
    codecs = korinet_register_codecs()
    assert [c.name for c in codecs] == ["msgpack", "json"]
    assert all(isinstance(c, Codec) for c in codecs)


@given(msgpack_values)
@settings(max_examples=200, deadline=None)
def test_msgpack_round_trip(value: Any) -> None:
    codec = MsgpackCodec()
    assert codec.decode(codec.encode(value)) == value


def test_msgpack_keeps_bytes_apart_from_str() -> None:
    codec = MsgpackCodec()
    decoded = codec.decode(codec.encode({"b": b"\xff\x00", "s": "\xff"}))
    assert decoded == {"b": b"\xff\x00", "s": "\xff"}
    assert type(decoded["b"]) is bytes and type(decoded["s"]) is str


@given(json_values)
@settings(max_examples=200, deadline=None)
def test_json_round_trip(value: Any) -> None:
    codec = JsonCodec()
    assert codec.decode(codec.encode(value)) == value


def test_json_is_compact_utf8() -> None:
    assert JsonCodec().encode({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()


@pytest.mark.parametrize("value", [b"bytes", {"k": b"v"}, {1, 2}, object(), {(1, 2): 3}])
def test_json_refuses_what_it_cannot_represent(value: Any) -> None:
    with pytest.raises(CodecError):
        JsonCodec().encode(value)


def test_json_refuses_a_cycle() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(CodecError):
        JsonCodec().encode(cyclic)


def deep(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("codec", [MsgpackCodec(), JsonCodec()], ids=lambda c: c.name)
def test_too_deep_an_object_is_a_codec_error(codec: Codec) -> None:
    with pytest.raises(CodecError):
        codec.encode(deep(100_000))


@pytest.mark.parametrize("value", [object(), {1, 2}, 2**64, -(2**63) - 1, complex(1, 2)], ids=repr)
def test_msgpack_refuses_what_it_cannot_represent(value: Any) -> None:
    with pytest.raises(CodecError):
        MsgpackCodec().encode(value)


def test_msgpack_refuses_a_cycle() -> None:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(CodecError):
        MsgpackCodec().encode(cyclic)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used
        b"\x92\x01",  # array of 2, one element
        b"\x01\x02",  # extra data after a whole value
        b"\x81\x90\x01",  # a map whose key is a list (unhashable)
        b"\x91" * 100_000,  # nested past any sane depth
        b"\xdb\xff\xff\xff\xff",  # a str of 4 GiB announced
    ],
)
def test_msgpack_garbage_is_a_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        MsgpackCodec().decode(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"\xff\xfe", b"[1,]", b"nul", b"1 2", b"[" * 100_000, b'"\\ud800"x', b"9" * 5000],
)
def test_json_garbage_is_a_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        JsonCodec().decode(data)


@pytest.mark.parametrize("codec", [MsgpackCodec(), JsonCodec()], ids=lambda c: c.name)
@given(data=st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_garbage_decode_raises_only_codec_error(codec: Codec, data: bytes) -> None:
    try:
        codec.decode(data)
    except CodecError:
        pass  # the only exception allowed out: anything else fails the test
