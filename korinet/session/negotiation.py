"""Pure functions choosing the protocol version and the codec (docs/PROTOCOL.md §3.2)."""

from __future__ import annotations

from collections.abc import Sequence

from ..exceptions import NegotiationError

__all__ = ["choose_codec", "choose_version"]


def choose_version(ours: Sequence[int], theirs: Sequence[int]) -> int:
    """The highest version both sides speak.

    Raises:
        NegotiationError: none in common; the message names both lists.
    """
    common = set(ours) & set(theirs)
    if not common:
        raise NegotiationError("protocol version", ours, theirs)
    return max(common)


def choose_codec(ours: Sequence[str], client_preference: Sequence[str]) -> str:
    """The client's most preferred codec that this side has.

    Raises:
        NegotiationError: none in common.
    """
    for name in client_preference:
        if name in ours:
            return name
    raise NegotiationError("codec", ours, client_preference)
