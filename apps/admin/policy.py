"""What each role may do on an agent: which commands (argv patterns), whether through
a shell, in which directories files may be copied.

The policy file is TOML (``--policy FILE``)::

    [roles.admin]              # every client needs the admin role to reach the agent
    commands = ["uptime", "df **", "systemctl status *"]

    [roles.root]
    commands = ["**"]          # any command
    shell = true               # may use --shell
    files = ["/srv/app"]       # may put and get files below /srv/app

A pattern is split like a shell line (shlex) and matched against the argv one
element at a time; a last element ``**`` matches any number of further arguments
(options included), none included. Within one element (``argument_matches``):

* globs match within one path component: the element and the argument are cut at
  ``/`` and must have as many components, each matched by fnmatch (case-sensitive),
  so ``*``, ``?`` and ``[...]`` never match ``/``;
* a ``..`` component is matched only by a literal ``..`` (refused, not normalised:
  ``cat /var/log/*`` never reads ``/var/log/../../etc/shadow``);
* an argument starting with ``-`` (an option) is matched only by an element starting
  with ``-``: ``ls -l *`` refuses ``ls -l --help``; ``--unit=*`` or ``-*`` allow options
  on purpose.

``files`` lists absolute directories: a role may put a file whose parent directory,
resolved (symbolic links followed), is one of them or below one, and get a file
whose resolved path is below one (``check_path``). A client may do what any one of
its roles allows. Without a policy file the ``admin`` role may do everything (the
agent says so when it starts).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final

__all__ = ["DEFAULT_POLICY", "Decision", "Policy", "RoleRules", "argument_matches", "argv_matches"]

ANY: Final = "**"

_FILES_HINT: Final = (
    'list the directories the role may copy files in and out of, e.g. files = ["/srv/app"] '
    '(files = ["/"] means every file on the host, as root if the agent runs as root)'
)


def argument_matches(pattern: str, arg: str) -> bool:
    """Whether one argv element ``arg`` matches one pattern element (see the module
    docstring): component by component, ``..`` only literally, options only by
    patterns that are options."""
    if arg.startswith("-") and not pattern.startswith("-"):
        return False
    pattern_parts, arg_parts = pattern.split("/"), arg.split("/")
    if len(pattern_parts) != len(arg_parts):
        return False
    return all(
        pat == part if part == ".." else fnmatchcase(part, pat)
        for pat, part in zip(pattern_parts, arg_parts, strict=True)
    )


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
    return all(argument_matches(pat, arg) for pat, arg in zip(fixed, argv, strict=False))


def _below(path: str, directory: str) -> bool:
    """Whether ``path`` is strictly below ``directory`` (both absolute, normalised)."""
    return path != directory and path.startswith(directory.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class RoleRules:
    commands: tuple[tuple[str, ...], ...] = ()
    shell: bool = False
    #: absolute directories below which this role may put and get files
    files: tuple[str, ...] = ()

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
            if ANY in pattern[:-1] or any(ANY in element and element != ANY for element in pattern):
                raise ValueError(
                    f"[roles.{role}] bad pattern {text!r}: ** is only allowed on its own, as the last element"
                )
            patterns.append(pattern)
        if not isinstance(table.get("shell", False), bool):
            raise ValueError(f"[roles.{role}] shell must be true or false")
        return cls(
            tuple(patterns), bool(table.get("shell", False)), _parse_files(role, table.get("files", []))
        )


def _parse_files(role: str, value: Any) -> tuple[str, ...]:
    if value is True:  # the old "may copy any file": say what to write instead
        raise ValueError(f"[roles.{role}] files = true is no longer accepted: {_FILES_HINT}")
    if value is False:
        return ()
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        raise ValueError(f"[roles.{role}] files must be a list of directories: {_FILES_HINT}")
    directories = []
    for directory in value:
        if not directory.startswith("/") or ".." in directory.split("/") or "\0" in directory:
            raise ValueError(f"[roles.{role}] files: {directory!r} must be an absolute path without ..")
        directories.append(os.path.normpath(directory))
    return tuple(directories)


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
        """May an identity with ``roles`` copy files at all (before any path is looked at)?"""
        for role in roles:
            rules = self.roles.get(role)
            if rules is not None and rules.files:
                return Decision(True, f"role {role} may copy files in {', '.join(rules.files)}")
        return Decision(False, "no role of this identity may copy files (put/get)")

    def check_path(self, roles: Iterable[str], real: str) -> Decision:
        """May an identity with ``roles`` put or get the file at ``real``?

        ``real`` must already be resolved: the file's real path for get, the real path
        of its directory joined with its name for put. The role's directories are
        resolved here, when the request comes (a directory may be a symbolic link).
        """
        allowed = []
        for role in roles:
            rules = self.roles.get(role)
            for directory in rules.files if rules is not None else ():
                if _below(real, os.path.realpath(directory)):
                    return Decision(True, f"role {role} may copy files in {directory}")
                allowed.append(directory)
        if not allowed:
            return Decision(False, "no role of this identity may copy files (put/get)")
        return Decision(False, f"{real} is outside the directories this identity may copy files in "
                               f"({', '.join(allowed)})")  # fmt: skip


#: Without a policy file: the admin role may do everything.
DEFAULT_POLICY: Final = Policy({"admin": RoleRules(((ANY,),), shell=True, files=("/",))})
