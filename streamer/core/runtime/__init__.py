"""The multiprocess runtime behind ``streamer run``.

Process model (design.md §2)::

    supervisor (this process: resolve symbols, spawn, watch, restart, publish status)
     ├─ <pipeline>.worker<i>   exchange adapter + stream types for a slice of the symbols
     └─ sink.<name>            one writer per sink instance: de-duplicate, write, flush
                               (or sink.<name>#<i>: N writers, each owning some symbols)

Children use the ``spawn`` start method and rebuild their own plugin registry
(:mod:`.bootstrap`). Records cross processes as ``encode_batch`` MessagePack bytes (or, for
a sink with a worker-side encoder, as its ready bytes: ``encode_encoded``) over
framed Unix sockets (:mod:`.channels`); the worker side is in :mod:`.worker`, the writer
side in :mod:`.writer`, restarts and shutdown in :mod:`.supervisor`, the published status
file in :mod:`.status`.

From Python::

    from streamer.core.config import load_config
    from streamer.core.runtime import run

    exit_code = run(load_config("streamer.yaml"), ["binance", "csv"], duration=60)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence

import anyio

from ..api import ExchangeAdapter, ExchangeContext, StreamContext
from ..config import (
    Config,
    ConfigError,
    ResolvedPipeline,
    sink_writers,
    validate_components,
    validate_source,
)
from ..counters import Counters
from ..shards import in_shard, parse_shard
from .bootstrap import PluginSelection, auto_workers, auto_writers, partition
from .keys import HighWater
from .sinklock import check_sinks
from .status_file import read_status
from .supervisor import PipelinePlan, Supervisor

__all__ = [
    "HighWater",
    "PipelinePlan",
    "PluginSelection",
    "auto_workers",
    "auto_writers",
    "check_source",
    "check_streams",
    "partition",
    "plan_pipelines",
    "plan_writers",
    "read_status",
    "run",
    "store",
]

log = logging.getLogger("streamer.runtime")


async def plan_pipelines(
    config: Config, plugins: PluginSelection, *, source: str = "<config>"
) -> tuple[list[PipelinePlan], dict[str, str]]:
    """Validate ``config`` against the plugins and resolve every pipeline's symbols.

    Returns the plans and each sink instance's type name. Raises ``ConfigError``,
    ``PluginError`` or ``ValueError`` (an unknown symbol) before any process starts.
    Everything ``streamer config check`` checks (:func:`check_streams`, the sinks' own
    checks) is checked before the exchange is asked for its symbols.
    """
    registry = plugins.registry()
    resolved, sinks = validate_components(config, registry, source=source)
    await check_streams(resolved, registry, source=source)
    check_sinks(sinks, registry)  # local checks first; the supervisor then locks the paths
    plans = []
    for index, pipeline in enumerate(resolved):
        cfg = pipeline.config
        adapter = _build_adapter(pipeline, registry)
        try:
            try:
                symbols = await adapter.resolve_symbols(cfg.symbols)
            except ValueError as exc:
                raise ValueError(f"{source}: pipelines[{index}].symbols: {exc}") from None
            except Exception as exc:  # unreachable exchange, third-party adapter bug...
                raise ValueError(
                    f"{source}: pipelines[{index}]: cannot list the symbols of "
                    f"{cfg.exchange}: {type(exc).__name__}: {exc}"
                ) from None
        finally:
            await adapter.aclose()
        if not symbols:
            raise ValueError(f"{source}: pipelines[{index}].symbols: no trading symbol left")
        if cfg.shard:
            shard = parse_shard(cfg.shard)
            symbols = [s for s in symbols if in_shard(s, shard)]
            if not symbols:
                raise ValueError(
                    f"{source}: pipelines[{index}].shard: no symbol of this pipeline falls "
                    f"in shard {cfg.shard}"
                )
        workers = cfg.workers or auto_workers(len(symbols), os.cpu_count())
        plans.append(
            PipelinePlan(
                index=index,
                name=cfg.name,
                exchange=getattr(adapter, "exchange", ""),
                market=getattr(adapter, "market", ""),
                symbols=symbols,
                groups=partition(symbols, workers),
            )
        )
    return plans, {name: type_name for name, (type_name, _) in sinks.items()}


def plan_writers(
    config: Config,
    plans: Sequence[PipelinePlan],
    sink_types: dict[str, str],
    plugins: PluginSelection,
    cpu_count: int | None = None,
) -> dict[str, int]:
    """Writer processes per sink instance: its ``writers`` setting, else (for a sink type
    that can run several, :attr:`~streamer.core.api.Sink.multi_writer`)
    :func:`~.bootstrap.auto_writers` of the symbols of the pipelines feeding it; else 1."""
    registry = plugins.registry()
    cpus = os.cpu_count() if cpu_count is None else cpu_count
    out = {}
    for name, setting in sink_writers(config).items():
        if name not in sink_types:
            continue
        if setting is not None:
            out[name] = setting
        elif registry.sink(sink_types[name]).multi_writer:
            symbols = sum(len(p.symbols) for p in plans if name in config.pipelines[p.index].sinks)
            out[name] = auto_writers(symbols, cpus)
        else:
            out[name] = 1
    return out


def _build_adapter(pipeline: ResolvedPipeline, registry) -> ExchangeAdapter:
    cfg = pipeline.config
    return registry.exchange(cfg.exchange)(
        pipeline.exchange_options,
        ExchangeContext(
            pipeline=cfg.name,
            counters=Counters(),
            logger=logging.getLogger(f"streamer.exchange.{cfg.exchange}"),
        ),
    )


#: Channels whose records say which subscription they answer (a kline carries its
#: interval); on the others, two stream types asking different params would each receive
#: both feeds, so the runtime refuses that at start-up.
_PARAM_CARRIED = frozenset({"kline"})

#: The symbol :func:`check_streams` builds stream types for: the check is about channels
#: and their params, which do not depend on the symbol (and it needs no network).
PLACEHOLDER_SYMBOL = "SYMBOL"


async def check_streams(
    pipelines: Sequence[ResolvedPipeline], registry, *, source: str = "<config>"
) -> None:
    """The exchange-dependent checks of every pipeline, without the network.

    Builds each pipeline's exchange adapter and stream types from their validated options
    (for :data:`PLACEHOLDER_SYMBOL`), so every stream type's constructor checks run (a
    kline interval or an order-book depth the market does not serve), and lets the adapter
    judge the subscriptions they ask for (:meth:`ExchangeAdapter.check_subscriptions`: a
    depth speed it does not serve...). Two stream types reading one channel at different
    params are refused too. ``streamer config check`` and ``streamer run`` both call this
    before anything starts, so they print the same line. Raises ``ConfigError`` or
    ``ValueError`` with one line naming the pipeline and stream type.
    """
    for index, pipeline in enumerate(pipelines):
        where = f"{source}: pipelines[{index}]"
        try:
            adapter = _build_adapter(pipeline, registry)
        except Exception as exc:  # __init__ must not do I/O; anything raised is the options'
            raise ValueError(f"{where}.options: {_one_line(exc)}") from None
        try:
            _check_pipeline_streams(pipeline, registry, adapter, where)
        finally:
            await adapter.aclose()


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 240:
        text = text[:237] + "..."
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


def _check_pipeline_streams(
    pipeline: ResolvedPipeline, registry, adapter: ExchangeAdapter, where: str
) -> None:
    wanted: dict[str, tuple[str, str]] = {}
    for name, options in pipeline.stream_options.items():
        context = StreamContext(
            pipeline=pipeline.config.name,
            exchange=adapter,
            symbols=[PLACEHOLDER_SYMBOL],
            emit=lambda record: None,
            counters=Counters(),
            logger=log,
        )
        try:
            subscriptions = registry.stream(name)(options, context).subscriptions()
            adapter.check_subscriptions(subscriptions)
        except Exception as exc:  # a third-party bug still gets one line
            raise ValueError(f"{where}.streams.{name}: {_one_line(exc)}") from None
        for sub in subscriptions:
            if sub.channel in _PARAM_CARRIED:
                continue
            other = wanted.setdefault(sub.channel, (name, sub.param))
            if other[1] != sub.param:
                raise ConfigError(
                    f"{where}.streams: {other[0]} and {name} both read the {sub.channel!r} "
                    f"channel but ask for different speeds ({other[1] or 'default'!r} vs "
                    f"{sub.param or 'default'!r}); give them the same value"
                )


def run(
    config: Config,
    enabled_plugins: Iterable[str] | None = None,
    *,
    extra_plugin_modules: Sequence[str] = (),
    duration: float | None = None,
    log_level: int = logging.INFO,
    source: str = "<config>",
    on_status: Callable[[dict], None] | None = None,
) -> int:
    """Run ``config`` until SIGINT/SIGTERM or ``duration`` seconds; returns the exit code.

    ``duration`` counts from when every worker process is up.

    ``enabled_plugins``: entry-point plugin names to load (``None``: all installed; the
    built-in stream types are always loaded). ``extra_plugin_modules``: import paths of
    modules registered as plugins in every process (how tests add inline plugins).
    Bad input (config, plugins, unknown symbols) raises ``ConfigError``, ``PluginError``
    or ``ValueError`` before any child starts. Returns 0 after a clean drain, 1 when the
    shutdown timed out, 130 when a second signal forced the exit. ``on_status`` is called
    in the supervisor with every status document it publishes (the live terminal summary).
    """
    plugins = PluginSelection(
        enabled=None if enabled_plugins is None else tuple(enabled_plugins),
        extra_modules=tuple(extra_plugin_modules),
    )

    async def main() -> int:
        plans, sink_types = await plan_pipelines(config, plugins, source=source)
        supervisor = Supervisor(
            config,
            plugins,
            plans,
            sink_types=sink_types,
            sink_writers=plan_writers(config, plans, sink_types, plugins),
            log_level=log_level,
            duration=duration,
            on_status=on_status,
        )
        return await supervisor.run()

    return anyio.run(main)


def check_source(config: Config, registry, *, source: str = "<config>") -> None:
    """A storage node's source check (:meth:`Source.check`): one-line ``ValueError``."""
    type_name, options = validate_source(config, registry)
    try:
        registry.source(type_name).check(options)
    except ValueError as exc:
        raise ValueError(f"{source}: source: {exc}") from None


#: The plan of a storage node: one source worker feeding every sink of the file.
STORE_PLAN = "store"


def store(
    config: Config,
    enabled_plugins: Iterable[str] | None = None,
    *,
    extra_plugin_modules: Sequence[str] = (),
    duration: float | None = None,
    log_level: int = logging.INFO,
    source: str = "<config>",
    on_status: Callable[[dict], None] | None = None,
) -> int:
    """Run a storage node (``streamer store``): ``config.source`` feeds every sink through
    the same writers, status, health and shutdown as :func:`run`; see :mod:`.source`.
    Same arguments and exit codes as :func:`run`."""
    plugins = PluginSelection(
        enabled=None if enabled_plugins is None else tuple(enabled_plugins),
        extra_modules=tuple(extra_plugin_modules),
    )
    if config.source is None or config.pipelines:
        raise ConfigError(f"{source}: a storage node's file names a 'source' and no pipelines")

    async def main() -> int:
        registry = plugins.registry()
        _, sinks = validate_components(config, registry, source=source)
        check_source(config, registry, source=source)
        check_sinks(sinks, registry)
        for name, writers in sink_writers(config).items():
            if writers is not None and writers > 1:
                raise ConfigError(
                    f"{source}: sinks.{name}.writers: a storage node runs each sink as one "
                    f"writer, got {writers}"
                )
        plan = PipelinePlan(
            index=-1,
            name=STORE_PLAN,
            exchange="",
            market="",
            symbols=[],
            groups=[[]],
            source=True,
            sinks=sorted(sinks),
        )
        supervisor = Supervisor(
            config,
            plugins,
            [plan],
            sink_types={name: type_name for name, (type_name, _) in sinks.items()},
            log_level=log_level,
            duration=duration,
            on_status=on_status,
        )
        return await supervisor.run()

    return anyio.run(main)
