"""Hook specifications of the ``streamer`` pluggy project.

Hooks are for discovery and lifecycle only; they are called a handful of times per process,
never per message. A plugin module implements any subset of them with ``@hookimpl``::

    from streamer import hookimpl

    @hookimpl
    def register_sinks(register):
        register("jsonl", JsonLinesSink)

Every hook is documented in CONTRIBUTING.md ("Writing plugins"); a test fails when one is
missing there.

Behaviour that belongs to one component type is a method of its base class, not a hook: for
``streamer verify PATH --sink TYPE`` the core command looks ``TYPE`` up among the registered
sinks and calls its classmethod ``Sink.verify(path, as_json=...)``, so each sink type (CSV,
Parquet, a database) brings the checker for its own data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import typer

    from .api import ExchangeAdapter, Sink, Source, StreamType

PROJECT = "streamer"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_exchanges(register: Callable[[str, type[ExchangeAdapter]], None]) -> None:
    """Register exchange adapter classes by name.

    Called once when a registry is built from a plugin manager (each process builds its
    own). Call ``register(name, cls)`` for each adapter; ``name`` is what a pipeline's
    ``exchange:`` key refers to. Registering a name twice is an error naming both plugins.
    """


@hookspec
def register_streams(register: Callable[[str, type[StreamType]], None]) -> None:
    """Register stream type classes by name.

    Called once per registry. ``name`` is a key of a pipeline's ``streams:`` mapping
    (``aggtrade``, ``kline``...). Registering a name twice is an error naming both plugins.
    """


@hookspec
def register_sinks(register: Callable[[str, type[Sink]], None]) -> None:
    """Register sink classes by name.

    Called once per registry. ``name`` is what a sink instance's ``type:`` refers to.
    Registering a name twice is an error naming both plugins.
    """


@hookspec
def register_sources(register: Callable[[str, type[Source]], None]) -> None:
    """Register source classes by name (what feeds a storage node, ``streamer store``).

    Called once per registry. ``name`` is what the store config's ``source: {type: ...}``
    refers to. Registering a name twice is an error naming both plugins.
    """


@hookspec
def register_commands(app: typer.Typer) -> None:
    """Add sub-commands to the ``streamer`` command line.

    Called once when the CLI is built, after the built-in commands exist. Use
    ``@app.command()`` or ``app.add_typer(...)``; do not replace built-in commands.
    """
