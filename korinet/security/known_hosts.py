"""Trust on first use: the server keys a client has seen, by ``host:port``.

As in SSH: the first connection to an address records the server's fingerprint
(and the client says so, so that a careful user can compare it with what
``korinet id`` prints on the server); every later connection must present the
same key, or it is refused with :class:`~korinet.exceptions.HostKeyChanged`
naming both fingerprints and the line to delete.

The file (``known_hosts`` in the configuration directory) holds one
``ADDRESS FINGERPRINT`` pair a line; ``#`` starts a comment. Addresses are kept
as the client was given them: ``localhost:1235`` and ``127.0.0.1:1235`` are
pinned separately.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

from ..exceptions import HostKeyChanged
from .files import ensure_home, korinet_home

__all__ = ["KNOWN_HOSTS_FILE", "KnownHosts", "host_address"]

logger = logging.getLogger(__name__)

KNOWN_HOSTS_FILE: Final = "known_hosts"
_HEADER: Final = (
    "# KoriNet known hosts: the key each server presented on first contact.\n"
    "# Delete a server's line to accept a new key from it.\n"
)


def host_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class KnownHosts:
    """The pinned server keys in ``path`` (default: ``known_hosts`` in
    :func:`~korinet.security.files.korinet_home`). The file is read on every
    check, so an edit takes effect at the next connection."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path else korinet_home() / KNOWN_HOSTS_FILE

    def __repr__(self) -> str:
        return f"<KnownHosts {self.path}>"

    def lookup(self, address: str) -> tuple[str, int] | None:
        """The pinned fingerprint of ``address`` and its line number, or None."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].split()
            if not line:
                continue
            if len(line) != 2:
                logger.warning("%s:%d: ignoring a malformed line", self.path, number)
                continue
            if line[0] == address:
                return line[1], number
        return None

    def check(self, address: str, fingerprint: str) -> bool:
        """Accept ``fingerprint`` for ``address`` if it is the pinned one, or pin it
        if the address is new.

        Returns:
            True when the address was new and is now pinned (tell the user).

        Raises:
            HostKeyChanged: another key is pinned for this address.
        """
        pinned = self.lookup(address)
        if pinned is None:
            self.add(address, fingerprint)
            return True
        if pinned[0] != fingerprint:
            raise HostKeyChanged(address, pinned[0], fingerprint, str(self.path), pinned[1])
        return False

    def add(self, address: str, fingerprint: str) -> None:
        """Append a pin (one ``write`` of one line, so concurrent clients do not mix)."""
        if any(c.isspace() or c == "#" for c in address):
            raise ValueError(f"bad address {address!r}")
        ensure_home(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as f:
            if f.tell() == 0:
                f.write(_HEADER.encode())
            f.write(f"{address} {fingerprint}\n".encode())
