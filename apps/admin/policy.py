"""What each role may do on an agent: which commands (argv patterns), whether through
a shell, whether files may be copied.

The policy file is TOML (``--policy FILE``)::

    [roles.admin]              # every client needs the admin role to reach the agent
    commands = ["uptime", "df **", "systemctl status *"]

    [roles.root]
    commands = ["**"]          # any command
    shell = true               # may use --shell
    files = true               # may put and get files

A pattern is split like a shell line (shlex) and matched against the argv one
element at a time (fnmatch, case-sensitive: ``*`` never crosses an argument); a
last element ``**`` matches any number of further arguments, none included. A
client may do what any one of its roles allows. Without a policy file the
``admin`` role may do everything (the agent says so when it starts).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final

__all__ = ["DEFAULT_POLICY", "Decision", "Policy", "RoleRules", "argv_matches"]

ANY: Final = "**"


def argv_matches(pattern: Sequence[str], argv: Sequence[str]) -> bool:
    """Whether ``argv`` matches ``pattern`` (see the module docstring)."""
    if pattern and pattern[-1] == ANY:
        fixed = pattern[:-1]
        if len(argv) < len(fixed):
            return False
    else:
        fixed = pattern
        if len(argv) != len(fixed):
            return False
    return all(fnmatchcase(arg, pat) for pat, arg in zip(fixed, argv, strict=False))


@dataclass(frozen=True, slots=True)
class RoleRules:
    commands: tuple[tuple[str, ...], ...] = ()
    shell: bool = False
    files: bool = False

    @classmethod
    def parse(cls, role: str, table: Any) -> RoleRules:
        if not isinstance(table, dict):
            raise ValueError(f"[roles.{role}] must be a table")
        unknown = set(table) - {"commands", "shell", "files"}
        if unknown:
            raise ValueError(f"[roles.{role}]: unknown key(s) {', '.join(sorted(unknown))}")
        commands = table.get("commands", [])
        if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
            raise ValueError(f"[roles.{role}] commands must be a list of strings")
        patterns = []
        for text in commands:
            try:
                pattern = tuple(shlex.split(text))
            except ValueError as exc:
                raise ValueError(f"[roles.{role}] bad pattern {text!r}: {exc}") from None
            if not pattern:
                raise ValueError(f"[roles.{role}] empty command pattern")
            patterns.append(pattern)
        for flag in ("shell", "files"):
            if not isinstance(table.get(flag, False), bool):
                raise ValueError(f"[roles.{role}] {flag} must be true or false")
        return cls(tuple(patterns), bool(table.get("shell", False)), bool(table.get("files", False)))


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Policy:
    roles: dict[str, RoleRules] = field(default_factory=dict)
    source: str = "built-in default"

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read a policy file.

        Raises:
            OSError: it cannot be read. ValueError: it is not a valid policy (the
            message names the file and the problem).
        """
        import tomllib

        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "mapping") -> Policy:
        unknown = set(data) - {"roles"}
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {', '.join(sorted(unknown))}")
        roles = data.get("roles", {})
        if not isinstance(roles, dict):
            raise ValueError(f"{source}: [roles] must be a table")
        try:
            return cls({name: RoleRules.parse(name, table) for name, table in roles.items()}, source)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def check_command(self, roles: Iterable[str], argv: Sequence[str], shell: bool) -> Decision:
        """May an identity with ``roles`` run ``argv`` (a shell line when ``shell``)?"""
        held = [r for r in roles if r in self.roles]
        if shell:
            for role in held:
                if self.roles[role].shell:
                    return Decision(True, f"role {role} may use a shell")
            return Decision(False, "no role of this identity may use --shell")
        for role in held:
            for pattern in self.roles[role].commands:
                if argv_matches(pattern, argv):
                    return Decision(True, f"role {role} allows {shlex.join(pattern)!r}")
        return Decision(False, f"no role of this identity ({', '.join(sorted(roles)) or 'none'}) "
                               f"allows {shlex.join(argv)!r}")  # fmt: skip

    def check_files(self, roles: Iterable[str]) -> Decision:
        for role in roles:
            rules = self.roles.get(role)
            if rules is not None and rules.files:
                return Decision(True, f"role {role} may copy files")
        return Decision(False, "no role of this identity may copy files (put/get)")


#: Without a policy file: the admin role may do everything.
DEFAULT_POLICY: Final = Policy({"admin": RoleRules(((ANY,),), shell=True, files=True)})
