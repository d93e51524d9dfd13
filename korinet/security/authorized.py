"""The keys a server lets in, each with a name and roles.

``authorized_keys`` in the configuration directory, one key a line::

    # FINGERPRINT                                        NAME   ROLES (comma-separated, optional)
    SHA256:q7Zs0d1xWbIhV0ZcU4S0d3TzWqg3Y2bqJ3eC6QkZ1cQ   alice  admin,chat

``#`` starts a comment. Names and roles are single words. ``korinet authorize``
adds or updates a line; deleting a line revokes the key. The server re-reads the
file when it changes, so both take effect at the next connection (a resume is a
new connection: a revoked key cannot resume its session either).

A file that does not parse refuses everyone until it is fixed (fail closed): a
half-edited file must not keep a revoked key working.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .files import korinet_home, write_atomically
from .identity import PeerIdentity, parse_fingerprint

__all__ = ["AUTHORIZED_KEYS_FILE", "AuthorizedKey", "AuthorizedKeys"]

logger = logging.getLogger(__name__)

AUTHORIZED_KEYS_FILE: Final = "authorized_keys"
_WORD: Final = re.compile(r"[A-Za-z0-9_.@:+-]+")
_HEADER: Final = (
    "# KoriNet authorized keys: who may open a session with this server.\n"
    "# FINGERPRINT NAME [ROLE,ROLE...]  (delete a line to revoke a key)\n"
)


@dataclass(frozen=True, slots=True)
class AuthorizedKey:
    """One line of the file."""

    fingerprint: str
    name: str
    roles: frozenset[str]
    line: int = 0

    def identity(self) -> PeerIdentity:
        return PeerIdentity(self.name, self.fingerprint, self.roles)

    def format(self) -> str:
        roles = ",".join(sorted(self.roles))
        return f"{self.fingerprint} {self.name}{' ' + roles if roles else ''}"


def _check_word(kind: str, value: str) -> str:
    if not _WORD.fullmatch(value):
        raise ValueError(f"bad {kind} {value!r}: use letters, digits and _ . @ : + - only")
    return value


def parse_line(text: str, number: int = 0) -> AuthorizedKey | None:
    """Parse one line (None for a blank or comment line).

    Raises:
        ValueError: the line is malformed.
    """
    fields = text.split("#", 1)[0].split()
    if not fields:
        return None
    if len(fields) not in (2, 3):
        raise ValueError("expected FINGERPRINT NAME [ROLE,ROLE...]")
    roles = frozenset(_check_word("role", r) for r in fields[2].split(",")) if fields[2:] else frozenset()
    return AuthorizedKey(parse_fingerprint(fields[0]), _check_word("name", fields[1]), roles, number)


class AuthorizedKeys:
    """The authorized keys in ``path`` (default: ``authorized_keys`` in
    :func:`~korinet.security.files.korinet_home`), re-read when the file changes.

    A missing file authorizes nobody.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path else korinet_home() / AUTHORIZED_KEYS_FILE
        self._stamp: tuple[int, int, int] | None = None
        self._keys: dict[str, AuthorizedKey] = {}

    def __repr__(self) -> str:
        return f"<AuthorizedKeys {self.path}>"

    def lookup(self, fingerprint: str) -> AuthorizedKey | None:
        """The entry for ``fingerprint``, or None when it is not authorized (or the
        file is malformed: see the module docstring)."""
        self._refresh()
        return self._keys.get(fingerprint)

    def entries(self) -> list[AuthorizedKey]:
        """Every entry, in file order.

        Raises:
            ValueError: the file is malformed (naming the file and line).
        """
        return list(self._parse(self._read()))

    def authorize(self, fingerprint: str, name: str, roles: Iterable[str] = ()) -> bool:
        """Add a key, or replace the line of an already authorized one.

        Returns:
            True when added, False when an existing line was replaced.

        Raises:
            ValueError: a bad fingerprint, name or role, or a malformed file.
        """
        entry = AuthorizedKey(
            parse_fingerprint(fingerprint),
            _check_word("name", name),
            frozenset(_check_word("role", r) for r in roles),
        )
        lines = self._read().splitlines()
        self._parse("\n".join(lines))  # refuse to rewrite a file we cannot read
        added = True
        for i, line in enumerate(lines):
            old = parse_line(line)
            if old is not None and old.fingerprint == entry.fingerprint:
                lines[i] = entry.format()
                added = False
        if added:
            lines.append(entry.format())
        self._write(lines)
        return added

    def revoke(self, fingerprint: str) -> bool:
        """Delete the line of ``fingerprint``; return whether there was one."""
        fingerprint = parse_fingerprint(fingerprint)
        lines = self._read().splitlines()
        self._parse("\n".join(lines))
        kept = [line for line in lines if (e := parse_line(line)) is None or e.fingerprint != fingerprint]
        if len(kept) == len(lines):
            return False
        self._write(kept)
        return True

    # ------------------------------------------------------------------ file

    def _read(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    def _write(self, lines: list[str]) -> None:
        text = "\n".join(lines) + "\n" if lines else ""
        if not text.startswith("#"):
            text = _HEADER + text
        write_atomically(self.path, text.encode("utf-8"), 0o600)
        self._stamp = None

    def _parse(self, text: str) -> Iterable[AuthorizedKey]:
        keys: dict[str, AuthorizedKey] = {}
        for number, line in enumerate(text.splitlines(), 1):
            try:
                entry = parse_line(line, number)
            except ValueError as exc:
                raise ValueError(f"{self.path}:{number}: {exc}") from None
            if entry is None:
                continue
            if entry.fingerprint in keys:
                raise ValueError(
                    f"{self.path}:{number}: {entry.fingerprint} is already authorized on line "
                    f"{keys[entry.fingerprint].line}"
                )
            keys[entry.fingerprint] = entry
        return keys.values()

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._keys = {e.fingerprint: e for e in self._parse(self._read())}
        except ValueError as exc:
            logger.error("authorized keys unusable, refusing every client until fixed: %s", exc)
            self._keys = {}
            return
        if stamp == (0, 0, 0):
            logger.warning("no authorized keys file at %s: every client will be refused", self.path)
        else:
            logger.info("%d authorized key(s) in %s", len(self._keys), self.path)
