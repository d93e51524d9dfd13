"""Version and codec choice: pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from korinet.exceptions import NegotiationError, RemoteProtocolError
from korinet.session import choose_codec, choose_version


@pytest.mark.parametrize(
    ("ours", "theirs", "chosen"),
    [
        ((3,), (3,), 3),
        ((3, 4, 5), (1, 2, 3, 4), 4),
        ((5, 4, 3), (3, 4), 4),  # order of either list does not matter, the highest wins
        ((1, 9), (9, 1), 9),
    ],
)
def test_highest_common_version_wins(ours: tuple[int, ...], theirs: tuple[int, ...], chosen: int) -> None:
    assert choose_version(ours, theirs) == chosen


@given(st.sets(st.integers(0, 20), min_size=1), st.sets(st.integers(0, 20), min_size=1))
@settings(max_examples=100, deadline=None)
def test_version_choice_matches_its_definition(ours: set[int], theirs: set[int]) -> None:
    common = ours & theirs
    if common:
        assert choose_version(sorted(ours), sorted(theirs, reverse=True)) == max(common)
    else:
        with pytest.raises(NegotiationError):
            choose_version(sorted(ours), sorted(theirs))


def test_no_common_version_names_both_lists() -> None:
    with pytest.raises(NegotiationError) as info:
        choose_version([3, 4], [1, 2])
    err = info.value
    assert isinstance(err, RemoteProtocolError)
    assert err.what == "protocol version"
    assert (err.local, err.remote) == ([3, 4], [1, 2])
    assert "[3, 4]" in str(err) and "[1, 2]" in str(err)


@pytest.mark.parametrize(
    ("ours", "client", "chosen"),
    [
        (("msgpack", "json"), ("json", "msgpack"), "json"),
        (("json", "msgpack"), ("msgpack", "json"), "msgpack"),
        (("msgpack",), ("zstd+msgpack", "json", "msgpack"), "msgpack"),
        (("a", "b", "c"), ("x", "c", "b"), "c"),
    ],
)
def test_client_preference_order_wins(ours: tuple[str, ...], client: tuple[str, ...], chosen: str) -> None:
    assert choose_codec(ours, client) == chosen


def test_no_common_codec_names_both_lists() -> None:
    with pytest.raises(NegotiationError) as info:
        choose_codec(["msgpack"], ["json", "cbor"])
    err = info.value
    assert err.what == "codec"
    assert (err.local, err.remote) == (["msgpack"], ["json", "cbor"])
    assert "['msgpack']" in str(err) and "['json', 'cbor']" in str(err)
