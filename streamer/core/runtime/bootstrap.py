"""What every process of a run shares: the child spec, logging and registry building.

Children are started with the ``spawn`` method, so nothing registered in the parent exists
in them: each rebuilds its plugin manager from the same enabled plugin names plus the extra
plugin module import paths (which is how tests and development plugins reach children).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..api import StreamKey
from ..config import Config
from ..plugins import Registry, make_plugin_manager

LOG_FORMAT = "%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class PluginSelection:
    """Which plugins a run loads: entry-point names (``None`` = all) plus extra modules."""

    enabled: tuple[str, ...] | None = None
    extra_modules: tuple[str, ...] = ()

    def registry(self) -> Registry:
        """A fresh registry (raises ``PluginError``/``ImportError`` on failure)."""
        extras = [importlib.import_module(name) for name in self.extra_modules]
        pm, _ = make_plugin_manager(self.enabled, plugins=extras)
        return Registry.from_manager(pm)


@dataclass
class ChildSpec:
    """Everything a spawned child needs; pickled once by ``multiprocessing``."""

    kind: str  # "worker" or "writer"
    child: str
    incarnation: int
    plugins: PluginSelection
    config: Config
    control_path: str
    log_level: int
    #: Sink instance name -> data socket path of each of its writers (index = the writer
    #: owning the symbols :func:`~streamer.core.api.writer_of` maps to it). Workers: the
    #: pipeline's sinks; a writer: its own sink. A plain string counts as one writer.
    sink_paths: dict[str, list[str]]
    #: Worker only: index into ``config.pipelines`` and the symbols it owns.
    pipeline_index: int = -1
    symbols: list[str] = field(default_factory=list)
    resume: dict[StreamKey, int] = field(default_factory=dict)
    #: Writer only: the sink instance this writer owns, and which of its writers it is.
    sink: str = ""
    writer: int = 0
    writers: int = 1


def paths_of(value: str | Sequence[str]) -> list[str]:
    """One ``sink_paths`` entry as a list (a plain string is one writer's path)."""
    return [value] if isinstance(value, str) else list(value)


def setup_logging(level: int) -> None:
    """Log to stderr with the process name, replacing any earlier set-up."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    # httpx logs every request at INFO; REST calls are counted, not logged.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))


def partition(symbols: Sequence[str], workers: int) -> list[list[str]]:
    """Split ``symbols`` round-robin into ``workers`` non-empty groups (order kept)."""
    workers = max(1, min(workers, len(symbols)))
    return [list(symbols[i::workers]) for i in range(workers)]


#: A worker process comfortably handles this many symbols before another one is worth it.
SYMBOLS_PER_WORKER = 100


def auto_workers(symbol_count: int, cpu_count: int | None) -> int:
    """Worker processes for a pipeline when its ``workers`` is 0.

    One per ``SYMBOLS_PER_WORKER`` symbols, at most one per CPU minus one for the writers
    and supervisor (never below one): 2000 symbols on 2 CPUs make 1 worker, not 2000.
    """
    cpus = max(1, (cpu_count or 1) - 1)
    wanted = -(-symbol_count // SYMBOLS_PER_WORKER)
    return max(1, min(cpus, wanted))


#: One writer process per this many symbols feeding a sink (when the sink can run several).
SYMBOLS_PER_WRITER = 500


def auto_writers(symbol_count: int, cpu_count: int | None) -> int:
    """Writer processes for a multi-writer sink without a ``writers`` setting.

    One per ``SYMBOLS_PER_WRITER`` symbols of the pipelines feeding it (spot and futures
    counted separately), at most one per CPU, at least one: up to 500 symbols stay on one
    writer (as before), the full market of 2000+ symbols gets one per CPU.
    """
    wanted = -(-symbol_count // SYMBOLS_PER_WRITER)
    return max(1, min(max(1, cpu_count or 1), wanted))
