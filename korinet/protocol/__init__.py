"""The raw protocol layer of the original API: ``protocol.v2(sock)``."""

from __future__ import annotations

from .v2 import v2

__all__ = ["v2"]
