"""The fleet's inventory: named hosts, their addresses, pinned keys and groups, in
``hosts.toml`` in KoriNet's configuration directory, and the last state each host
was seen in (``hosts-seen.json`` beside it, written by exec runs).

::

    [hosts.web1]
    address = "192.0.2.11"            # HOST[:PORT]; the default port is the agent's
    key = "SHA256:…"                  # optional: accept only this agent key
    groups = ["web", "eu"]

    [hosts.db1]
    address = "[2001:db8::5]:1237"

    [groups]
    db = ["db1"]                      # a group may also list its members here

A selection (what ``exec`` takes instead of ``HOST[,HOST…]``) is a comma-separated
list of terms, taken in order:

* ``@GROUP``: the group's hosts (``@all``: every host in the file);
* ``NAME`` or a glob ``web*`` / ``web[1-3]``: hosts of the inventory by name;
* ``HOST[:PORT]`` not in the inventory: that address, as before;
* ``!TERM``: remove what TERM selects from what the terms before it selected.

Pure functions and small files; the exec command does the I/O with the agents.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Host",
    "Inventory",
    "InventoryError",
    "age",
    "inventory_path",
    "load_inventory",
    "load_seen",
    "parse_inventory",
    "record_seen",
    "seen_path",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_GLOB_CHARS = frozenset("*?[")


class InventoryError(ValueError):
    """The hosts file is malformed, or a selection names nothing that exists; the
    text is one line for the user."""


@dataclass(frozen=True)
class Host:
    name: str
    address: str  # HOST[:PORT] as written (or as given on the command line)
    key: str | None = None
    groups: tuple[str, ...] = ()
    #: False: not from the inventory, an address given on the command line
    known: bool = True


@dataclass
class Inventory:
    hosts: dict[str, Host] = field(default_factory=dict)
    path: Path | None = None

    def groups(self) -> dict[str, list[str]]:
        """Every group with its hosts' names, in file order (``all`` included)."""
        found: dict[str, list[str]] = {"all": list(self.hosts)}
        for host in self.hosts.values():
            for group in host.groups:
                found.setdefault(group, []).append(host.name)
        return found

    def select(self, selection: str) -> list[Host]:
        """The hosts a selection names, each once, in the order first selected.

        Raises:
            InventoryError: an unknown group, a glob that matches no host, an empty term.
        """
        chosen: dict[str, Host] = {}
        groups = self.groups()
        for raw in selection.split(","):
            term = raw.strip()
            exclude = term.startswith("!")
            if exclude:
                term = term[1:].strip()
            if not term:
                raise InventoryError(f"an empty item in {selection!r}")
            hosts = self._term(term, groups)
            for host in hosts:
                if exclude:
                    chosen.pop(host.name, None)
                else:
                    chosen.setdefault(host.name, host)
        if not chosen:
            raise InventoryError(f"{selection!r} selects no host")
        return list(chosen.values())

    def _term(self, term: str, groups: dict[str, list[str]]) -> list[Host]:
        where = f" in {self.path}" if self.path is not None else ""
        if term.startswith("@"):
            group = term[1:]
            if group not in groups:
                known = ", ".join("@" + g for g in sorted(groups)) or "none"
                raise InventoryError(f"no group {group!r}{where} (groups: {known})")
            return [self.hosts[name] for name in groups[group]]
        if term in self.hosts:
            return [self.hosts[term]]
        if _GLOB_CHARS & set(term):
            matched = [h for name, h in self.hosts.items() if fnmatch.fnmatchcase(name, term)]
            if not matched:
                raise InventoryError(f"{term!r} matches no host{where}")
            return matched
        return [Host(term, term, known=False)]  # an address, as before the inventory


def inventory_path() -> Path:
    from korinet.security.files import korinet_home

    return korinet_home() / "hosts.toml"


def seen_path() -> Path:
    from korinet.security.files import korinet_home

    return korinet_home() / "hosts-seen.json"


def load_inventory(path: Path | None = None) -> Inventory:
    """Read the hosts file (an empty inventory if there is none).

    Raises:
        InventoryError: unreadable or malformed, with the file and what is wrong.
    """
    path = path or inventory_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Inventory(path=path)
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"{path}: {exc}") from None
    return parse_inventory(data, path)


def parse_inventory(data: dict[str, Any], path: Path | None = None) -> Inventory:
    where = str(path) if path is not None else "hosts file"
    unknown = set(data) - {"hosts", "groups"}
    if unknown:
        raise InventoryError(f"{where}: unknown section(s) {', '.join(sorted(unknown))} (hosts, groups)")
    hosts_table = data.get("hosts", {})
    groups_table = data.get("groups", {})
    if not isinstance(hosts_table, dict) or not isinstance(groups_table, dict):
        raise InventoryError(f"{where}: [hosts.NAME] tables and a [groups] table expected")
    member_of: dict[str, list[str]] = {}
    for group, members in groups_table.items():
        _check_name(where, "group", group)
        if group == "all":
            raise InventoryError(f"{where}: 'all' is every host already; name the group otherwise")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise InventoryError(f"{where}: groups.{group} must be a list of host names")
        for member in members:
            if member not in hosts_table:
                raise InventoryError(
                    f"{where}: groups.{group} lists {member!r}, which has no [hosts.{member}]"
                )
            member_of.setdefault(member, []).append(group)
    hosts: dict[str, Host] = {}
    for name, entry in hosts_table.items():
        _check_name(where, "host", name)
        if not isinstance(entry, dict):
            raise InventoryError(f"{where}: hosts.{name} must be a table")
        extra = set(entry) - {"address", "key", "groups"}
        if extra:
            raise InventoryError(f"{where}: hosts.{name}: unknown key(s) {', '.join(sorted(extra))}")
        address = entry.get("address", name)
        key = entry.get("key")
        own_groups = entry.get("groups", [])
        if not isinstance(address, str) or not address:
            raise InventoryError(f"{where}: hosts.{name}.address must be HOST[:PORT]")
        if key is not None and (not isinstance(key, str) or not key.startswith("SHA256:")):
            raise InventoryError(f"{where}: hosts.{name}.key must be a fingerprint (SHA256:…)")
        if not isinstance(own_groups, list) or not all(isinstance(g, str) for g in own_groups):
            raise InventoryError(f"{where}: hosts.{name}.groups must be a list of names")
        for group in own_groups:
            _check_name(where, "group", group)
        groups = tuple(dict.fromkeys([*own_groups, *member_of.get(name, [])]))
        hosts[name] = Host(name, address, key, groups)
    return Inventory(hosts, path)


def _check_name(where: str, what: str, name: str) -> None:
    if not _NAME.match(name) or _GLOB_CHARS & set(name):
        raise InventoryError(f"{where}: {what} name {name!r}: letters, digits, '.', '_' and '-' only")


# ---------------------------------------------------------------------- last seen


def load_seen(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Host name -> {"state": ..., "at": unix time, "detail": ...}; empty if unknown."""
    path = path or seen_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_seen(states: dict[str, tuple[str, str]], path: Path | None = None) -> None:
    """Merge ``{host: (state, detail)}`` into the last-seen file (0600, atomic)."""
    from korinet.security.files import ensure_home, write_atomically

    path = path or seen_path()
    seen = load_seen(path)
    now = time.time()
    for host, (state, detail) in states.items():
        seen[host] = {"state": state, "at": now, "detail": detail}
    ensure_home(path.parent)
    write_atomically(path, json.dumps(seen, indent=1, sort_keys=True).encode(), 0o600)


def age(seconds: float) -> str:
    """A short "how long ago" for the hosts listing."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"
