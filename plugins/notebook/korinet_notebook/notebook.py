"""The notebook itself and the validation of every message: pure code, no I/O.

Validators receive a decoded payload and raise ``ValueError`` or ``TypeError`` to
refuse it; KoriNet then rejects the message and the sender's ``send()`` or
``request()`` raises :class:`korinet.MessageRejected` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

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
    "validate_changed",
    "validate_key_request",
    "validate_prefix_request",
    "validate_put",
]

# Message type names: "<plugin>.<what>", unique among installed plugins.
PUT: Final = "notebook.put"
GET: Final = "notebook.get"
DELETE: Final = "notebook.delete"
LIST: Final = "notebook.list"
WATCH: Final = "notebook.watch"
CHANGED: Final = "notebook.changed"  # server -> watcher

MAX_KEY_LENGTH: Final = 128
MAX_VALUE_BYTES: Final = 64 * 1024
#: Every buffer is bounded: a full notebook refuses new keys (updates still work).
MAX_ENTRIES: Final = 10_000


class NotebookFull(Exception):
    """A put of a new key into a notebook holding MAX_ENTRIES keys."""


class NoSuchKey(KeyError):
    """A get of a key the notebook does not hold."""

    def __str__(self) -> str:  # KeyError's repr-quoting would reach the user as \"'...'\"
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class Entry:
    """One key's value; ``version`` is the notebook's change counter when it was set."""

    key: str
    value: str | bytes
    version: int

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value, "version": self.version}


class Notebook:
    """Keys to values, each change numbered (as etcd's revisions), bounded in size."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.version = 0
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: str, value: str | bytes) -> Entry:
        """Set ``key`` and return the new entry.

        Raises:
            NotebookFull: ``key`` is new and the notebook is full.
        """
        if key not in self._entries and len(self._entries) >= self.max_entries:
            raise NotebookFull(f"the notebook is full ({self.max_entries} keys)")
        self.version += 1
        entry = self._entries[key] = Entry(key, value, self.version)
        return entry

    def get(self, key: str) -> Entry:
        """Raises: NoSuchKey (a KeyError): no such key."""
        try:
            return self._entries[key]
        except KeyError:
            raise NoSuchKey(f"no such key: {key!r}") from None

    def delete(self, key: str) -> int | None:
        """Remove ``key``; return the change's version, or None if it was absent."""
        if self._entries.pop(key, None) is None:
            return None
        self.version += 1
        return self.version

    def list(self, prefix: str = "") -> list[Entry]:
        """Entries whose key starts with ``prefix``, by key."""
        return sorted((e for k, e in self._entries.items() if k.startswith(prefix)), key=lambda e: e.key)


# ---------------------------------------------------------------------- validation


def _fields(obj: Any, required: set[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise TypeError(f"expected a map, got {type(obj).__name__}")
    missing = required - obj.keys()
    if missing:
        raise ValueError(f"missing field(s): {', '.join(sorted(missing))}")
    extra = obj.keys() - required - optional
    if extra:
        raise ValueError(f"unknown field(s): {', '.join(sorted(map(str, extra)))}")
    return obj


def _check_key(key: Any, what: str = "key") -> None:
    if not isinstance(key, str):
        raise TypeError(f"{what} must be a string, not {type(key).__name__}")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"{what} longer than {MAX_KEY_LENGTH} characters")
    if what == "key" and not key:
        raise ValueError("key must not be empty")
    if any(not ch.isprintable() or ch.isspace() for ch in key):
        raise ValueError(f"{what} {key!r} contains whitespace or control characters")


def validate_put(obj: Any) -> None:
    """``{"key": str, "value": str | bytes}``."""
    fields = _fields(obj, {"key", "value"})
    _check_key(fields["key"])
    value = fields["value"]
    if not isinstance(value, str | bytes):
        raise TypeError(f"value must be text or bytes, not {type(value).__name__}")
    size = len(value.encode()) if isinstance(value, str) else len(value)
    if size > MAX_VALUE_BYTES:
        raise ValueError(f"value of {size} bytes exceeds {MAX_VALUE_BYTES}")


def validate_key_request(obj: Any) -> None:
    """``{"key": str}`` (get, delete)."""
    _check_key(_fields(obj, {"key"})["key"])


def validate_prefix_request(obj: Any) -> None:
    """``{"prefix": str}``, possibly empty (list, watch)."""
    _check_key(_fields(obj, {"prefix"})["prefix"], "prefix")


def validate_changed(obj: Any) -> None:
    """``{"key", "value", "version", "deleted"}``: what a watcher receives."""
    fields = _fields(obj, {"key", "value", "version", "deleted"})
    _check_key(fields["key"])
    if not isinstance(fields["version"], int) or isinstance(fields["version"], bool):
        raise TypeError("version must be an integer")
    if not isinstance(fields["deleted"], bool):
        raise TypeError("deleted must be a boolean")
