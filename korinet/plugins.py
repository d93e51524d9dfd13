"""The plugin manager: loading, version checks, conflict checks, and typed,
isolated, traceable hook calls.

Loading follows tox: block disabled names, check each installed plugin's declared
KoriNet range *before* importing it, load the ``korinet`` entry points, register the
internal plugins, then ``check_pending()`` so an impl with no spec is an error.

Every hook call goes through pluggy's own caller (``pm.hook.NAME(...)``), so pluggy's
tracing (``add_hookcall_monitoring``, ``enable_tracing``) and hook wrappers see it.
Isolation (one failing plugin costs a log line, not the session) comes from a guard
put around each implementation when its plugin is registered; the same guard times
the call when ``KORINET_TRACE_PLUGINS=1``. A hook nobody implements is not called
at all unless tracing is on (the per-message path stays free; docs/PLUGINS.md §5).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import pluggy

from . import hookspecs
from .codecs.base import default_offer
from .exceptions import KoriNetError

if TYPE_CHECKING:
    import argparse

    from .cluster import ClusterBus
    from .codecs.base import Codec
    from .endpoint import SessionHandle
    from .messages import MessageType

__all__ = [
    "DISABLE_ENV",
    "TRACE_ENV",
    "PluginConflict",
    "PluginInfo",
    "PluginManager",
    "default_manager",
    "supported_range",
]

logger = logging.getLogger(__name__)
#: KORINET_TRACE_PLUGINS lines go here (INFO), to stderr unless logging is set up.
trace_logger = logging.getLogger("korinet.trace")

#: Comma-separated plugin names not to load.
DISABLE_ENV: Final = "KORINET_DISABLE_PLUGINS"
#: Set to 1 to log every hook call with plugin name, duration and outcome.
TRACE_ENV: Final = "KORINET_TRACE_PLUGINS"

_INTERNAL = ("korinet.codecs", "korinet.builtin")

# plugin states, as `korinet plugins` shows them
LOADED: Final = "loaded"
DISABLED: Final = "disabled"
INCOMPATIBLE: Final = "incompatible"
FAILED: Final = "failed"


class PluginConflict(KoriNetError):
    """Two plugins registered the same codec or message type name."""

    def __init__(self, what: str, name: str, first: str, second: str) -> None:
        super().__init__(f"{what} {name!r} is registered by both {first!r} and {second!r}")
        self.what = what
        self.name = name
        self.plugins = (first, second)


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One plugin as ``korinet plugins`` shows it.

    ``state`` is ``loaded``, ``disabled`` (by name), ``incompatible`` (its declared
    KoriNet range excludes this version) or ``failed`` (its import raised); ``detail``
    says why for the last three. ``requires`` is the declared range ("" if none).
    """

    name: str
    version: str
    codecs: tuple[str, ...]
    message_types: tuple[str, ...]
    state: str = LOADED
    requires: str = ""
    detail: str = ""
    distribution: str = ""


def supported_range(dist: importlib.metadata.Distribution) -> str | None:
    """The KoriNet versions a distribution declares it works with: the specifier of
    its ``korinet`` requirement (``dependencies = ["korinet>=0.1,<0.2"]``), "" for a
    bare ``korinet``, None if it does not depend on korinet at all."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    for line in dist.requires or ():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != "korinet":
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra's requirement, not the plugin's own
        # lower bounds first, as people write them (SpecifierSet's own str sorts by text)
        specs = sorted(req.specifier, key=lambda sp: (sp.operator.startswith("<"), str(sp)))
        return ",".join(str(sp) for sp in specs)
    return None


def _incompatible(spec: str, running: str) -> bool:
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        # a pre-release of KoriNet counts as the version it leads to
        return not SpecifierSet(spec).contains(running, prereleases=True)
    except InvalidSpecifier:
        return True


class _Pluggy(pluggy.PluginManager):
    """pluggy's manager, telling ours when someone monitors hook calls (pluggy's
    tracing): then even hooks nobody implements are called, so the monitor sees all."""

    monitors = 0

    def add_hookcall_monitoring(self, before: Any, after: Any) -> Callable[[], None]:
        undo = super().add_hookcall_monitoring(before, after)
        self.monitors += 1

        def undo_and_count() -> None:
            undo()
            self.monitors -= 1

        return undo_and_count


class PluginManager:
    """KoriNet's pluggy manager with typed wrappers for every hook call.

    Args:
        trace: log every hook call (plugin, duration, outcome) on the
            ``korinet.trace`` logger; default: ``KORINET_TRACE_PLUGINS`` is set.
    """

    def __init__(self, *, trace: bool | None = None) -> None:
        self.pm = _Pluggy(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        if trace is None:
            trace = os.environ.get(TRACE_ENV, "").strip() not in ("", "0")
        self.trace = trace
        if trace:
            _show_trace()
        self._codecs: dict[str, Codec] | None = None
        self._types: dict[str, MessageType] | None = None
        self._codec_owner: dict[str, str] = {}
        self._type_owner: dict[str, str] = {}
        self._owner_of: dict[int, str] = {}  # id(item) -> plugin, filled while collecting
        self._implemented: frozenset[str] = frozenset()
        # per notification hook without wrappers: its (guarded function, argnames), in
        # pluggy's call order, for _notify to call without pluggy's caller
        self._direct: dict[str, tuple[tuple[Callable[..., Any], tuple[str, ...]], ...]] = {}
        self._callers: dict[str, pluggy.HookCaller] = dict(vars(self.pm.hook))
        self._not_loaded: list[PluginInfo] = []
        self._dists: dict[str, tuple[str, str, str]] = {}  # plugin -> (dist, version, range)
        #: True when some plugin implements korinet_ack_timed: the runtime times
        #: acknowledgements only then.
        self.times_acks = False

    @classmethod
    def load(
        cls,
        *,
        entry_points: bool = True,
        disabled: Iterable[str] = (),
        extra: Iterable[object] = (),
        trace: bool | None = None,
    ) -> PluginManager:
        """Build a manager: internal plugins, entry points (unless ``entry_points`` is
        False, as in tests), and ``extra`` plugin objects.

        An installed plugin whose declared KoriNet range excludes this version, or
        whose import fails, is not loaded: one warning line names it and says why,
        and :meth:`plugins` reports it. The other plugins load.
        """
        self = cls(trace=trace)
        blocked = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        blocked.update(disabled)
        for name in blocked:
            self.pm.set_blocked(name)
        for modname in _INTERNAL:
            if modname not in blocked:
                self.register(importlib.import_module(modname), name=modname)
        if entry_points:
            self._load_entry_points(blocked)
        for plugin in extra:
            self.register(plugin)
        self.pm.check_pending()
        return self

    def _load_entry_points(self, blocked: set[str]) -> None:
        # entry_points() lists each distribution once (the first on sys.path)
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME):
            if self.pm.get_plugin(ep.name) is None:
                self._load_entry_point(ep, blocked)

    def _load_entry_point(self, ep: importlib.metadata.EntryPoint, blocked: set[str]) -> None:
        from . import __version__

        dist = ep.dist
        dist_name, version = (dist.name, dist.version) if dist is not None else ("", "")
        spec = (supported_range(dist) or "") if dist is not None else ""
        state = detail = ""
        if ep.name in blocked:
            state, detail = DISABLED, f"named in {DISABLE_ENV} or disabled by the program"
        elif spec and _incompatible(spec, __version__):
            state, detail = INCOMPATIBLE, f"supports korinet {spec}; this is korinet {__version__}"
        else:
            try:
                plugin = ep.load()
            except Exception as exc:
                state, detail = FAILED, f"import failed: {type(exc).__name__}: {exc}"
        if state:
            if state != DISABLED:  # the one line at start-up
                logger.warning("plugin %r (%s %s) not loaded: %s", ep.name, dist_name, version, detail)
            self._not_loaded.append(PluginInfo(ep.name, version, (), (), state, spec, detail, dist_name))
            return
        self.register(plugin, name=ep.name)
        self._dists[ep.name] = (dist_name, version, spec)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register ``plugin`` (a module or an object with hookimpl methods)."""
        name = self.pm.register(plugin, name=name)
        if name is None:  # blocked
            return
        for caller in self.pm.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    lookup = bool(caller.spec and caller.spec.opts.get("firstresult"))
                    self._guard(impl, caller.name, lookup)
        self._changed()

    def unregister(self, plugin: object) -> None:
        self.pm.unregister(plugin)
        self._changed()

    def _changed(self) -> None:
        self._codecs = self._types = None
        self._implemented = frozenset(
            caller.name for caller in vars(self.pm.hook).values() if caller.get_hookimpls()
        )
        self._direct = {}
        for caller in vars(self.pm.hook).values():
            impls = caller.get_hookimpls()
            opts = caller.spec.opts if caller.spec else {}
            if opts.get("firstresult") or opts.get("historic"):
                continue
            if any(impl.wrapper or impl.hookwrapper for impl in impls):
                continue  # pluggy's caller runs the wrappers
            # pluggy calls the last registered (after tryfirst/trylast ordering) first
            calls = tuple((impl.function, tuple(impl.argnames)) for impl in reversed(impls))
            self._direct[caller.name] = calls
        self.times_acks = "korinet_ack_timed" in self._implemented

    # -------------------------------------------------------------- guards

    def _guard(self, impl: pluggy.HookImpl, hook: str, lookup: bool = False) -> None:
        """Replace ``impl.function`` with one that isolates and, if asked, traces it.
        Registrations and ``firstresult`` lookups (``lookup``) are traced, not
        isolated: their answer and their failure belong to the caller.

        pluggy then runs the guard in its own caller, so its monitoring and the
        wrappers of other plugins work as usual. The guard takes the positional
        arguments pluggy passes (``impl.argnames`` was computed from the original).
        """
        function: Callable[..., Any] = impl.function
        plugin = impl.plugin_name
        trace = self.trace
        guarded: Callable[..., Any]
        if hook.startswith("korinet_register_"):
            owners = self._owner_of

            # Registrations are not isolated: a broken one stops start-up. The guard
            # notes who returned what, for conflict messages and `korinet plugins`.
            def guarded(*args: Any) -> Any:
                started = time.perf_counter() if trace else 0.0
                try:
                    items = list(function(*args) or ())
                except BaseException as exc:
                    if trace:
                        _trace(hook, plugin, started, f"raised {_describe(exc)}")
                    raise
                for item in items:
                    owners[id(item)] = plugin
                if trace:
                    _trace(hook, plugin, started, f"ok, {len(items)} registered")
                return items

        elif lookup:

            def guarded(*args: Any) -> Any:
                started = time.perf_counter() if trace else 0.0
                try:
                    result = function(*args)
                except BaseException as exc:
                    if trace:
                        _trace(hook, plugin, started, f"raised {_describe(exc)}")
                    raise
                if trace:
                    _trace(hook, plugin, started, "no answer" if result is None else "answered")
                return result

        else:

            def guarded(*args: Any) -> Any:
                started = time.perf_counter() if trace else 0.0
                try:
                    result = function(*args)
                except Exception as exc:
                    logger.exception("plugin %r failed in %s", plugin, hook)
                    if trace:
                        _trace(hook, plugin, started, f"raised {_describe(exc)}")
                    return None
                if result is not None and inspect.isawaitable(result):
                    if trace:
                        _trace(hook, plugin, started, "returned an awaitable")
                    return _Guarded(result, plugin, hook, trace)
                if trace:
                    _trace(hook, plugin, started, "ok")
                return None

        functools.update_wrapper(guarded, function)
        # HookImpl.function is typed Final for pluggy's users; it is a plain slot.
        setattr(impl, "function", guarded)  # noqa: B010

    # -------------------------------------------------------------- registries

    def _collect(self, hook: pluggy.HookCaller, what: str) -> tuple[dict[str, Any], dict[str, str]]:
        found: dict[str, Any] = {}
        owner: dict[str, str] = {}
        self._owner_of.clear()
        try:
            # pluggy returns the lists last-registered first; take them in registration order
            results = cast("list[Iterable[Any]]", hook())
            for items in reversed(results):
                for item in items:
                    name = item.name
                    by = self._owner_of.get(id(item), "?")
                    if name in found:
                        raise PluginConflict(what, name, owner[name], by)
                    found[name] = item
                    owner[name] = by
        finally:
            self._owner_of.clear()
        return found, owner

    def codecs(self) -> dict[str, Codec]:
        """Every registered codec by name.

        Raises:
            PluginConflict: two plugins claim one name.
        """
        if self._codecs is None:
            self._codecs, self._codec_owner = self._collect(self.pm.hook.korinet_register_codecs, "codec")
        return self._codecs

    def codec_offer(self) -> tuple[str, ...]:
        """The codecs a client offers by default, best first (msgpack last)."""
        return default_offer(self.codecs())

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
        """What ``korinet plugins`` lists: the loaded plugins, then the installed ones
        that were not loaded (disabled, incompatible, failed), each with its state."""
        self.codecs()
        self.message_types()
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist, version, spec = self._dists.get(name, ("", "", ""))
            infos.append(
                PluginInfo(
                    name=name,
                    version=version,
                    codecs=tuple(n for n, o in self._codec_owner.items() if o == name),
                    message_types=tuple(n for n, o in self._type_owner.items() if o == name),
                    requires=spec,
                    distribution=dist,
                )
            )
        return infos + self._not_loaded

    # -------------------------------------------------------------- notifications

    def _notify(self, hook: str, **kwargs: Any) -> list[Any]:
        """Call a notification hook through pluggy's caller. Each implementation is
        guarded: one failing plugin costs only a log line. Returns the awaitables
        some implementations returned, for the caller to await (``_Guarded.run``)."""
        if not self.trace and not self.pm.monitors:
            direct = self._direct.get(hook)
            if direct is not None:
                # Nobody traces and no wrapper: call the guarded implementations the
                # way pluggy's caller would (same order, same arguments, the awaitables
                # collected), without its per-call cost (a sampled ack in a
                # stop-and-wait loop is a call per message). None implemented: [].
                results = []
                for function, argnames in direct:
                    result = function(*[kwargs[name] for name in argnames])
                    if result is not None:
                        results.append(result)
                return results
            if hook not in self._implemented:
                return []  # nobody listens, nobody traces: not even pluggy's caller
        try:
            return cast("list[Any]", self._callers[hook](**kwargs))
        except Exception:
            # only a hook wrapper (the implementations are guarded) gets here
            logger.exception("a plugin's hook wrapper failed in %s", hook)
            return []

    def session_opened(self, session: SessionHandle) -> list[Any]:
        return self._notify("korinet_session_opened", session=session)

    def session_resumed(self, session: SessionHandle, replayed: int) -> list[Any]:
        return self._notify("korinet_session_resumed", session=session, replayed=replayed)

    def session_lost(self, session: SessionHandle, error: BaseException) -> list[Any]:
        return self._notify("korinet_session_lost", session=session, error=error)

    def session_closed(self, session: SessionHandle, reason: str) -> list[Any]:
        return self._notify("korinet_session_closed", session=session, reason=reason)

    def link_reopened(self, session: SessionHandle, resumed: bool, replayed: int) -> list[Any]:
        return self._notify("korinet_link_reopened", session=session, resumed=resumed, replayed=replayed)

    def ack_timed(self, session: SessionHandle, seq: int, rtt: float) -> list[Any]:
        return self._notify("korinet_ack_timed", session=session, seq=seq, rtt=rtt)

    def session_refused(
        self, server: Any, peername: str, fingerprint: str | None, reason: str, code: int
    ) -> list[Any]:
        return self._notify(
            "korinet_session_refused",
            server=server,
            peername=peername,
            fingerprint=fingerprint,
            reason=reason,
            code=code,
        )

    def message_rejected(self, session: SessionHandle, message_type: str, reason: str) -> list[Any]:
        return self._notify(
            "korinet_message_rejected", session=session, message_type=message_type, reason=reason
        )

    def server_started(self, server: Any) -> list[Any]:
        return self._notify("korinet_server_started", server=server)

    def server_stopped(self, server: Any) -> list[Any]:
        return self._notify("korinet_server_stopped", server=server)

    def add_cli_commands(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        self._notify("korinet_add_cli_commands", subparsers=subparsers)

    def cluster_bus(self, address: str) -> ClusterBus | None:
        """The bus a plugin makes for ``address`` (first answer wins), or None.
        A plugin that fails here is an error of the caller's set-up: it propagates."""
        bus: ClusterBus | None = self.pm.hook.korinet_cluster_bus(address=address)
        return bus


class _Guarded:
    """An awaitable from a hook, awaited with the same isolation (and tracing) as the call."""

    def __init__(self, awaitable: Any, plugin: str, hook: str, trace: bool = False) -> None:
        self.awaitable, self.plugin, self.hook, self.trace = awaitable, plugin, hook, trace

    async def run(self) -> None:
        started = time.perf_counter() if self.trace else 0.0
        try:
            await self.awaitable
        except Exception as exc:
            logger.exception("plugin %r failed in %s", self.plugin, self.hook)
            if self.trace:
                _trace(self.hook, self.plugin, started, f"awaited: raised {_describe(exc)}")
        else:
            if self.trace:
                _trace(self.hook, self.plugin, started, "awaited: ok")


def _trace(hook: str, plugin: str, started: float, outcome: str) -> None:
    ms = (time.perf_counter() - started) * 1000
    trace_logger.info("%s plugin=%s %.3f ms %s", hook, plugin, ms, outcome)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _show_trace() -> None:
    """Make the trace visible: INFO on its logger, to stderr unless a handler exists."""
    trace_logger.setLevel(logging.INFO)
    if not trace_logger.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("korinet trace: %(message)s"))
        trace_logger.addHandler(handler)
        trace_logger.propagate = False  # a later logging.basicConfig must not print it twice


_default: PluginManager | None = None


def default_manager() -> PluginManager:
    """The process-wide manager with every installed plugin (loaded on first use)."""
    global _default
    if _default is None:
        _default = PluginManager.load()
    return _default
