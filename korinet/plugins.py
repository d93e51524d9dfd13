"""The plugin manager: loading, conflict checks and typed, isolated hook calls.

Loading follows tox: block disabled names, load ``korinet`` entry points, register
the internal plugins, then ``check_pending()`` so an impl with no spec is an error.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pluggy

from . import hookspecs
from .exceptions import KoriNetError

if TYPE_CHECKING:
    import argparse

    from .cluster import ClusterBus
    from .codecs.base import Codec
    from .messages import MessageType

__all__ = ["DISABLE_ENV", "PluginConflict", "PluginManager", "default_manager"]

logger = logging.getLogger(__name__)

#: Comma-separated plugin names not to load.
DISABLE_ENV = "KORINET_DISABLE_PLUGINS"

_INTERNAL = ("korinet.codecs", "korinet.builtin")


class PluginConflict(KoriNetError):
    """Two plugins registered the same codec or message type name."""

    def __init__(self, what: str, name: str, first: str, second: str) -> None:
        super().__init__(f"{what} {name!r} is registered by both {first!r} and {second!r}")
        self.what = what
        self.name = name
        self.plugins = (first, second)


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    version: str
    codecs: tuple[str, ...]
    message_types: tuple[str, ...]


class PluginManager:
    """KoriNet's pluggy manager with typed wrappers for every hook call."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._codecs: dict[str, Codec] | None = None
        self._types: dict[str, MessageType] | None = None
        self._codec_owner: dict[str, str] = {}
        self._type_owner: dict[str, str] = {}

    @classmethod
    def load(
        cls, *, entry_points: bool = True, disabled: Iterable[str] = (), extra: Iterable[object] = ()
    ) -> PluginManager:
        """Build a manager: internal plugins, entry points (unless ``entry_points`` is
        False, as in tests), and ``extra`` plugin objects."""
        self = cls()
        blocked = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        blocked.update(disabled)
        for name in blocked:
            self.pm.set_blocked(name)
        import importlib

        for modname in _INTERNAL:
            if modname not in blocked:
                self.pm.register(importlib.import_module(modname), name=modname)
        if entry_points:
            self.pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
        for plugin in extra:
            self.register(plugin)
        self.pm.check_pending()
        return self

    def register(self, plugin: object, name: str | None = None) -> None:
        self.pm.register(plugin, name=name)
        self._codecs = self._types = None

    def unregister(self, plugin: object) -> None:
        self.pm.unregister(plugin)
        self._codecs = self._types = None

    # -------------------------------------------------------------- registries

    def _collect(self, hook: pluggy.HookCaller, what: str) -> tuple[dict[str, Any], dict[str, str]]:
        found: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for impl in reversed(hook.get_hookimpls()):  # registration order
            items = cast("Iterable[Any]", impl.function() or ())
            for item in items:
                name = item.name
                if name in found:
                    raise PluginConflict(what, name, owner[name], impl.plugin_name)
                found[name] = item
                owner[name] = impl.plugin_name
        return found, owner

    def codecs(self) -> dict[str, Codec]:
        """Every registered codec by name.

        Raises:
            PluginConflict: two plugins claim one name.
        """
        if self._codecs is None:
            self._codecs, self._codec_owner = self._collect(self.pm.hook.korinet_register_codecs, "codec")
        return self._codecs

    def message_types(self) -> dict[str, MessageType]:
        """Every registered message type by name.

        Raises:
            PluginConflict: two plugins claim one name.
        """
        if self._types is None:
            self._types, self._type_owner = self._collect(
                self.pm.hook.korinet_register_message_types, "message type"
            )
        return self._types

    def plugins(self) -> list[PluginInfo]:
        """What ``korinet plugins`` lists."""
        self.codecs()
        self.message_types()
        dists = {id(p): d for p, d in self.pm.list_plugin_distinfo()}
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist = dists.get(id(plugin))
            version = dist.version if dist is not None else ""
            infos.append(
                PluginInfo(
                    name=name,
                    version=version,
                    codecs=tuple(n for n, o in self._codec_owner.items() if o == name),
                    message_types=tuple(n for n, o in self._type_owner.items() if o == name),
                )
            )
        return infos

    # -------------------------------------------------------------- notifications

    def _notify(self, hook: pluggy.HookCaller, **kwargs: Any) -> list[Any]:
        """Call every impl on its own, so one failing plugin costs only a log line.
        Returns the awaitables some impls returned, for the caller to await."""
        pending = []
        for impl in reversed(hook.get_hookimpls()):
            args = {k: kwargs[k] for k in impl.argnames}
            try:
                result = impl.function(**args)
            except Exception:
                logger.exception("plugin %r failed in %s", impl.plugin_name, hook.name)
                continue
            if inspect.isawaitable(result):
                pending.append(_Guarded(result, impl.plugin_name, hook.name))
        return pending

    def session_opened(self, session: Any) -> list[Any]:
        return self._notify(self.pm.hook.korinet_session_opened, session=session)

    def session_resumed(self, session: Any, replayed: int) -> list[Any]:
        return self._notify(self.pm.hook.korinet_session_resumed, session=session, replayed=replayed)

    def session_lost(self, session: Any, error: BaseException) -> list[Any]:
        return self._notify(self.pm.hook.korinet_session_lost, session=session, error=error)

    def session_closed(self, session: Any, reason: str) -> list[Any]:
        return self._notify(self.pm.hook.korinet_session_closed, session=session, reason=reason)

    def session_refused(
        self, server: Any, peername: str, fingerprint: str | None, reason: str, code: int
    ) -> list[Any]:
        return self._notify(
            self.pm.hook.korinet_session_refused,
            server=server,
            peername=peername,
            fingerprint=fingerprint,
            reason=reason,
            code=code,
        )

    def message_rejected(self, session: Any, message_type: str, reason: str) -> list[Any]:
        return self._notify(
            self.pm.hook.korinet_message_rejected, session=session, message_type=message_type, reason=reason
        )

    def server_started(self, server: Any) -> list[Any]:
        return self._notify(self.pm.hook.korinet_server_started, server=server)

    def server_stopped(self, server: Any) -> list[Any]:
        return self._notify(self.pm.hook.korinet_server_stopped, server=server)

    def add_cli_commands(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        self._notify(self.pm.hook.korinet_add_cli_commands, subparsers=subparsers)

    def cluster_bus(self, address: str) -> ClusterBus | None:
        """The bus a plugin makes for ``address`` (first answer wins), or None.
        A plugin that fails here is an error of the caller's set-up: it propagates."""
        bus: ClusterBus | None = self.pm.hook.korinet_cluster_bus(address=address)
        return bus


class _Guarded:
    """An awaitable from a hook, awaited with the same isolation as the call."""

    def __init__(self, awaitable: Any, plugin: str, hook: str) -> None:
        self.awaitable, self.plugin, self.hook = awaitable, plugin, hook

    async def run(self) -> None:
        try:
            await self.awaitable
        except Exception:
            logger.exception("plugin %r failed in %s", self.plugin, self.hook)


_default: PluginManager | None = None


def default_manager() -> PluginManager:
    """The process-wide manager with every installed plugin (loaded on first use)."""
    global _default
    if _default is None:
        _default = PluginManager.load()
    return _default
