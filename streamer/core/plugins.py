"""Plugin discovery: our own entry-point loader, the plugin-manager factory and the registry.

Built-in plugins are entry points of the ``market-streamer`` distribution itself, so they
load exactly like third-party ones. There is no module-level plugin manager: call
:func:`make_plugin_manager` (tests build one per test and register inline plugins).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType

import pluggy

from . import hookspecs
from .api import ExchangeAdapter, Sink, Source, StreamType

ENTRY_POINT_GROUP = "streamer"
DISTRIBUTION = "market-streamer"
#: Comma-separated plugin names that are never loaded (escape hatch for a broken plugin).
BLOCK_ENV = "STREAMER_BLOCK_PLUGINS"
#: Stream types every exchange needs; loaded even when ``--plugins`` does not name them.
ALWAYS_LOADED = frozenset({"aggtrade", "depth", "kline", "orderbook"})


class PluginError(Exception):
    """A plugin could not be discovered, loaded or registered; the message says which."""


@dataclass(frozen=True)
class PluginInfo:
    """One discovered entry point and what became of it."""

    name: str
    distribution: str
    version: str
    value: str
    loaded: bool = False
    error: str | None = None


@dataclass
class LoadReport:
    """What the loader found: loaded plugins, and those blocked or broken (with reasons)."""

    plugins: list[PluginInfo] = field(default_factory=list)

    @property
    def failed(self) -> list[PluginInfo]:
        """Plugins that were wanted but could not be imported."""
        return [p for p in self.plugins if p.error is not None]


def _distribution_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return ("<unknown>", "")
    return (dist.metadata["Name"] or "<unknown>", dist.version or "")


def discover_entry_points() -> list[tuple[metadata.EntryPoint, str, str]]:
    """Every ``streamer`` entry point, sorted by name, as ``(ep, distribution, version)``.

    Raises :class:`PluginError` when two distributions declare the same plugin name
    (naming both) unless that name is blocked, or when none of the built-in plugins is
    declared (the package was imported from a checkout that was never ``pip install``-ed).
    """
    found: dict[str, tuple[metadata.EntryPoint, str, str]] = {}
    blocked = blocked_plugins()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist, version = _distribution_of(ep)
        if ep.name in found:
            other = found[ep.name]
            if other[1] == dist and other[0].value == ep.value:
                continue  # the same distribution seen twice on sys.path
            if ep.name in blocked:
                continue  # blocked: neither is loaded, so the clash does not matter
            raise PluginError(
                f"plugin name {ep.name!r} is declared by two distributions: "
                f"{other[1]} {other[2]} ({other[0].value}) and {dist} {version} ({ep.value}); "
                f"uninstall one or block it with {BLOCK_ENV}={ep.name}"
            )
        found[ep.name] = (ep, dist, version)
    if not any(dist == DISTRIBUTION for _, dist, _ in found.values()):
        raise PluginError(
            "no built-in plugins found: market-streamer's entry points are missing. "
            "Install the package (`pip install -e .` in a checkout) instead of importing "
            "it from a source tree."
        )
    return [found[name] for name in sorted(found)]


def blocked_plugins() -> set[str]:
    """Names listed in the ``STREAMER_BLOCK_PLUGINS`` environment variable."""
    raw = os.environ.get(BLOCK_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def make_plugin_manager(
    enabled: Iterable[str] | None = None,
    *,
    load_entry_points: bool = True,
    plugins: Iterable[object] = (),
) -> tuple[pluggy.PluginManager, LoadReport]:
    """Build a fresh plugin manager.

    ``enabled``: plugin names to load (the built-in stream types are always added); ``None``
    loads every installed plugin. Naming a plugin that is not installed, or that failed to
    import, raises :class:`PluginError`. A plugin that fails to import while not explicitly
    requested is reported in the :class:`LoadReport` and the others still load.
    ``plugins``: extra plugin objects (modules or instances) registered directly, which is
    how tests add inline plugins.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    report = LoadReport()
    wanted = None if enabled is None else set(enabled) | ALWAYS_LOADED
    blocked = blocked_plugins()
    if load_entry_points:
        entries = discover_entry_points()
        available = {ep.name for ep, _, _ in entries}
        if wanted is not None:
            missing = sorted(wanted - available - ALWAYS_LOADED)
            if missing:
                raise PluginError(
                    f"plugin(s) not installed: {', '.join(missing)}; "
                    f"available: {', '.join(sorted(available))}"
                )
        for ep, dist, version in entries:
            info = PluginInfo(ep.name, dist, version, ep.value)
            if ep.name in blocked or (wanted is not None and ep.name not in wanted):
                report.plugins.append(info)
                continue
            try:
                module = _import_entry_point(ep)
            except Exception as exc:  # any import-time failure of third-party code
                message = (
                    f"plugin {ep.name!r} from distribution {dist} {version} failed to "
                    f"import: {type(exc).__name__}: {exc}"
                )
                if wanted is not None and ep.name in wanted - ALWAYS_LOADED:
                    raise PluginError(message) from exc
                report.plugins.append(PluginInfo(ep.name, dist, version, ep.value, error=message))
                continue
            pm.register(module, name=ep.name)
            report.plugins.append(PluginInfo(ep.name, dist, version, ep.value, loaded=True))
    for plugin in plugins:
        pm.register(plugin)
    return pm, report


def _import_entry_point(ep: metadata.EntryPoint) -> ModuleType | object:
    # ep.load() handles "module:attr"; plain modules are imported directly.
    if ":" in ep.value:
        return ep.load()
    return importlib.import_module(ep.value)


@dataclass
class Registry:
    """Component classes by name, collected from one plugin manager's registration hooks."""

    exchanges: dict[str, type[ExchangeAdapter]] = field(default_factory=dict)
    streams: dict[str, type[StreamType]] = field(default_factory=dict)
    sinks: dict[str, type[Sink]] = field(default_factory=dict)
    sources: dict[str, type[Source]] = field(default_factory=dict)
    #: (kind, name) -> name of the plugin that registered it.
    owners: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def from_manager(cls, pm: pluggy.PluginManager) -> Registry:
        """Call every registration hook once and collect the classes.

        Raises :class:`PluginError` when two plugins register the same name for the same
        kind of component.
        """
        registry = cls()
        for kind, hook, table in (
            ("exchange", pm.hook.register_exchanges, registry.exchanges),
            ("stream", pm.hook.register_streams, registry.streams),
            ("sink", pm.hook.register_sinks, registry.sinks),
            ("source", pm.hook.register_sources, registry.sources),
        ):
            for impl in hook.get_hookimpls():
                owner = pm.get_name(impl.plugin) or repr(impl.plugin)
                impl.function(register=registry._registrar(kind, table, owner))
        return registry

    def _registrar(self, kind: str, table: dict, owner: str):
        def register(name: str, component: type) -> None:
            if name in table:
                raise PluginError(
                    f"{kind} {name!r} is registered by two plugins: "
                    f"{self.owners[(kind, name)]} and {owner}"
                )
            table[name] = component
            self.owners[(kind, name)] = owner

        return register

    def exchange(self, name: str) -> type[ExchangeAdapter]:
        """The exchange adapter class called ``name``, or a ``PluginError`` listing choices."""
        return self._lookup("exchange", self.exchanges, name)

    def stream(self, name: str) -> type[StreamType]:
        """The stream type class called ``name``, or a ``PluginError`` listing choices."""
        return self._lookup("stream", self.streams, name)

    def sink(self, name: str) -> type[Sink]:
        """The sink class called ``name``, or a ``PluginError`` listing choices."""
        return self._lookup("sink", self.sinks, name)

    def source(self, name: str) -> type[Source]:
        """The source class called ``name``, or a ``PluginError`` listing choices."""
        return self._lookup("source", self.sources, name)

    @staticmethod
    def _lookup(kind: str, table: dict, name: str):
        try:
            return table[name]
        except KeyError:
            choices = ", ".join(sorted(table)) or "none"
            raise PluginError(f"unknown {kind} {name!r}; available: {choices}") from None
