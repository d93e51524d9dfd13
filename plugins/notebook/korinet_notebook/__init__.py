"""korinet-notebook: a shared key-value notebook kept by a KoriNet server.

Clients ``put``, ``get``, ``delete`` and ``list`` entries, and ``watch`` a key
prefix to be told of every later change, exactly once even across reconnects.
The server is any KoriNet server with this plugin installed (``korinet serve``);
the client side is :mod:`korinet_notebook.remote` or ``korinet notebook ...``.

It is meant to be copied: pure logic in ``notebook.py`` (tested without a network),
hook implementations in ``plugin.py``, the wire calls in ``remote.py``, the command
line in ``cli.py``.
"""

from __future__ import annotations

from .notebook import (
    CHANGED,
    DELETE,
    GET,
    LIST,
    MAX_ENTRIES,
    MAX_KEY_LENGTH,
    MAX_VALUE_BYTES,
    PUT,
    WATCH,
    Entry,
    NoSuchKey,
    Notebook,
    NotebookFull,
)
from .plugin import NotebookPlugin

__all__ = [
    "CHANGED",
    "DELETE",
    "GET",
    "LIST",
    "MAX_ENTRIES",
    "MAX_KEY_LENGTH",
    "MAX_VALUE_BYTES",
    "PUT",
    "WATCH",
    "Entry",
    "NoSuchKey",
    "Notebook",
    "NotebookFull",
    "NotebookPlugin",
]
