"""The package's layers, checked on the source (AST) of every module of ``streamer``.

* ``streamer.core`` imports nothing from ``streamer.plugins``, ``streamer.testing`` or
  ``streamer.cli`` (plugins and tools build on the core, never the other way round);
* a plugin package (``streamer.plugins.streams``, ``streamer.plugins.sinks``, each
  ``streamer.plugins.exchanges.<name>``) imports no other plugin package, nor
  ``streamer.testing`` or ``streamer.cli``; its modules may share private helpers;
* built-in plugins and the simulator (``streamer.testing``) reach the core only through the
  public API, ``from streamer import ...``, exactly as a third-party plugin must;
* no import cycle among the package's modules.

Every ``import`` counts wherever it is written (module level, inside a function, under
``if TYPE_CHECKING:``): a lazy import hides a dependency, it does not remove it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streamer"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """``(imported streamer module, line)`` for every import statement in the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "streamer":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "streamer":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                # ``from pkg import mod``: the submodule; ``from mod import name``: the module.
                yield (sub if sub in modules else target), node.lineno


def _graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    lines: dict[tuple[str, str], int] = {}
    for name, path in modules.items():
        for target, line in _imports(name, path, modules):
            if target != name:
                graph[name].add(target)
                lines.setdefault((name, target), line)
    return graph, lines


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _plugin_package(name: str) -> str | None:
    """The plugin package a module belongs to, if any."""
    parts = name.split(".")
    if len(parts) < 3 or parts[:2] != ["streamer", "plugins"]:
        return None
    if parts[2] == "exchanges":
        return ".".join(parts[:4]) if len(parts) > 3 else None
    return ".".join(parts[:3])


def _cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """For each strongly connected component of ``graph``: one shortest cycle through it,
    and all its members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan; the package is small enough to recurse
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for component in components:
        start, members = component[0], set(component)
        paths = {start: [start]}  # breadth-first: the shortest way back to ``start``
        queue = [start]
        while queue:
            node = queue.pop(0)
            nexts = sorted(graph[node] & members)
            if start in nexts:
                cycles.append(([*paths[node], start], component))
                break
            for nxt in nexts:
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    queue.append(nxt)
    return cycles


def layer_violations() -> list[str]:
    """Every violation of the rules in the module docstring, one line each."""
    graph, lines = _graph()
    found = []
    for name, targets in sorted(graph.items()):
        own = _plugin_package(name)
        for target in sorted(targets):
            where = f"(line {lines[(name, target)]})"
            if _within(name, "streamer.core"):
                for banned in ("streamer.plugins", "streamer.testing", "streamer.cli"):
                    if _within(target, banned):
                        found.append((f"{name} imports {target}", where))
            if own is not None:
                other = _plugin_package(target)
                if other is not None and other != own:
                    found.append((f"{name} imports {target}", where))
                for banned in ("streamer.testing", "streamer.cli"):
                    if _within(target, banned):
                        found.append((f"{name} imports {target}", where))
            if (own is not None or _within(name, "streamer.testing")) and _within(
                target, "streamer.core"
            ):
                # Built-in plugins (the simulator's included) use only the public API.
                found.append((f"{name} imports {target}, not the public API", where))
    for cycle, members in _cycles(graph):
        more = f"(all of {', '.join(members)})" if len(members) + 1 > len(cycle) else ""
        found.append(("import cycle: " + " -> ".join(cycle), more))
    return [f"{rule} {where}".rstrip() for rule, where in found]


def _rule(line: str) -> str:
    """A violation without its details (the line, the rest of a cycle)."""
    return line.split(" (")[0]


def test_layers_hold():
    violations = layer_violations()
    assert not violations, "layer rules broken:\n" + "\n".join(violations)


# -- the checker itself ------------------------------------------------------------------------
def test_relative_imports_resolve_to_the_module_they_name(tmp_path):
    graph, _ = _graph()
    # ``from ..plugins import ...`` in core/runtime/bootstrap.py is streamer.core.plugins.
    assert "streamer.core.plugins" in graph["streamer.core.runtime.bootstrap"]
    assert not any(_within(t, "streamer.plugins") for t in graph["streamer.core.runtime"])
    # ``from . import _wire as wire`` is the submodule, not the package.
    assert "streamer.testing._wire" in graph["streamer.testing.faults"]
    # ``from streamer import hookimpl`` is the package itself.
    assert "streamer" in graph["streamer.plugins.sinks._csv_layout"]


def test_checker_finds_each_kind_of_violation(monkeypatch):
    real = _graph()[0]

    def violations_with(*edges: tuple[str, str]) -> list[str]:
        fake = {name: set(targets) for name, targets in real.items()}
        for source, target in edges:
            fake[source].add(target)
        monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: (fake, _lines(fake)))
        return [_rule(v) for v in layer_violations()]

    found = violations_with(("streamer.core.ops.health", "streamer.core.units"))
    assert found == [], found  # core -> core is fine
    found = violations_with(("streamer.core.records", "streamer.testing.market"))
    assert "streamer.core.records imports streamer.testing.market" in found
    found = violations_with(
        ("streamer.plugins.streams.kline", "streamer.plugins.sinks._csv_layout")
    )
    assert "streamer.plugins.streams.kline imports streamer.plugins.sinks._csv_layout" in found
    found = violations_with(("streamer.plugins.streams.kline", "streamer.core.units"))
    assert "streamer.plugins.streams.kline imports streamer.core.units, not the public API" in found
    found = violations_with(
        ("streamer.core.units", "streamer.core.api"), ("streamer.core.api", "streamer.core.units")
    )
    cycles = [v for v in found if v.startswith("import cycle:") and "streamer.core.units" in v]
    assert cycles, found


def _lines(graph: dict[str, set[str]]) -> dict[tuple[str, str], int]:
    return {(name, target): 1 for name, targets in graph.items() for target in targets}
