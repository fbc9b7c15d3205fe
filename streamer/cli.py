"""The ``streamer`` command line, built by :func:`build_app` from a fresh plugin manager.

Plugins add commands through the ``register_commands`` hook. Bad input never shows a
traceback: :class:`~streamer.core.plugins.PluginError`,
:class:`~streamer.core.config.ConfigError` and ``ValueError`` are caught here and printed
as one ``error: ...`` line with exit code 1.

``STREAMER_PLUGIN_MODULES`` (comma-separated import paths) registers extra plugin modules
in every process, for development and tests; ``STREAMER_BLOCK_PLUGINS`` blocks installed
plugins by name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
import yaml

from . import __version__
from .core.api import ExchangeContext
from .core.config import (
    Config,
    ConfigError,
    convert_options,
    effective_config,
    load_config,
    parse_config,
    resolve_state_dir,
    validate_components,
)
from .core.counters import Counters
from .core.plugins import DISTRIBUTION, PluginError, Registry, make_plugin_manager
from .core.runtime import PluginSelection
from .core.runtime.bootstrap import setup_logging
from .core.units import MAX_DURATION

PLUGIN_MODULES_ENV = "STREAMER_PLUGIN_MODULES"
DEFAULT_SYMBOLS = "BTCUSDT,ETHUSDT"
DEFAULT_STREAMS = "aggtrade,depth,kline,orderbook"


class _UsageError(Exception):
    """A bad flag combination; printed like any other bad input."""


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _extra_modules(flag: list[str] | None = None) -> tuple[str, ...]:
    return tuple(_split(os.environ.get(PLUGIN_MODULES_ENV))) + tuple(flag or ())


@contextlib.contextmanager
def _bad_input() -> Iterator[None]:
    """Turn bad input into one ``error:`` line and exit code 1."""
    try:
        yield
    except (PluginError, ConfigError, ValueError, _UsageError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except ImportError as exc:
        typer.echo(f"error: cannot import plugin module: {exc}", err=True)
        raise typer.Exit(1) from None


def _selection(plugins: str | None, modules: list[str] | None = None) -> PluginSelection:
    enabled = None if plugins is None else tuple(_split(plugins))
    return PluginSelection(enabled=enabled, extra_modules=_extra_modules(modules))


def default_config(
    *,
    exchange: str = "binance",
    market: str = "spot",
    symbols: list[str],
    streams: list[str],
    data_dir: str,
    rest_url: str | None = None,
    ws_url: str | None = None,
) -> Config:
    """The one-pipeline configuration ``streamer run`` builds when no file is given."""
    options: dict[str, Any] = {"market": market}
    if rest_url:
        options["rest_url"] = rest_url
    if ws_url:
        options["ws_url"] = ws_url
    data = {
        "pipelines": [
            {
                "name": f"{exchange}-{market}",
                "exchange": exchange,
                "options": options,
                "symbols": symbols,
                "streams": {name: {} for name in streams},
                "sinks": ["csv"],
            }
        ],
        "sinks": {"csv": {"type": "csv", "path": data_dir}},
    }
    return parse_config(data, source="command line")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"streamer ({DISTRIBUTION}) {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    """A fresh CLI: the built-in commands plus whatever plugins add via ``register_commands``."""
    app = typer.Typer(
        name="streamer",
        help="Collect crypto exchange market data into durable files.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def _root(
        version: Annotated[
            bool,
            typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
        ] = False,
    ) -> None:
        """market-streamer: exchange adapters, stream types and sinks composed from YAML."""

    app.command("run")(_run)
    app.command("store")(_store)
    app.command("plugins")(_plugins)
    app.command("symbols")(_symbols)
    app.command("verify")(_verify)
    app.command("report")(_report)
    config_app = typer.Typer(help="Validate or show a configuration file.", no_args_is_help=True)
    config_app.command("check")(_config_check)
    config_app.command("show")(_config_show)
    app.add_typer(config_app, name="config")
    _add_ops_commands(app)
    _add_plugin_commands(app)
    return app


def _add_ops_commands(app: typer.Typer) -> None:
    # daemon, status, health, metrics: operations commands that live in the core.
    from .core.ops.commands import add_commands

    add_commands(app)


def _add_plugin_commands(app: typer.Typer) -> None:
    try:
        extras = [__import__(m, fromlist=["_"]) for m in _extra_modules()]
        pm, _ = make_plugin_manager(None, plugins=extras)
    except (PluginError, ImportError):
        return  # the built-in commands still work and report the problem when used
    pm.hook.register_commands(app=app)


# -- run -------------------------------------------------------------------------------------
def _run(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML configuration file.")
    ] = None,
    plugins: Annotated[
        str | None,
        typer.Option(help="Comma-separated plugins to enable (default: all installed)."),
    ] = None,
    symbols: Annotated[
        str | None, typer.Option(help=f"Without --config: symbols (default {DEFAULT_SYMBOLS}).")
    ] = None,
    streams: Annotated[
        str | None,
        typer.Option(help=f"Without --config: stream types (default {DEFAULT_STREAMS})."),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option("--data-dir", help="Without --config: CSV directory (default ./data)."),
    ] = None,
    market: Annotated[
        str | None,
        typer.Option(help="Without --config: spot or usdm (default spot)."),
    ] = None,
    rest_url: Annotated[
        str | None, typer.Option("--rest-url", help="Without --config: REST base URL.")
    ] = None,
    ws_url: Annotated[
        str | None, typer.Option("--ws-url", help="Without --config: WebSocket base URL.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop cleanly after this many seconds.")
    ] = None,
    state_dir: Annotated[
        str | None,
        typer.Option(
            "--state-dir",
            help="Where status.json goes (default: runtime.state_dir, else "
            "$STREAMER_STATE_DIR, else .streamer).",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log warnings only.")] = False,
    plugin_module: Annotated[
        list[str] | None,
        typer.Option("--plugin-module", help="Extra plugin module to import (development)."),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="K/N: keep the symbols whose stable hash falls in shard K of N (K from 1); "
            "overrides every pipeline's shard.",
        ),
    ] = None,
) -> None:
    """Collect data until SIGINT/SIGTERM (or --duration), then drain, flush and exit."""
    from .core import runtime

    with _bad_input():
        flags = {
            "--symbols": symbols,
            "--streams": streams,
            "--data-dir": data_dir,
            "--market": market,
            "--rest-url": rest_url,
            "--ws-url": ws_url,
        }
        if config is not None:
            used = [name for name, value in flags.items() if value is not None]
            if used:
                raise _UsageError(
                    f"{', '.join(used)} only apply without --config; "
                    "set them in the configuration file instead"
                )
            cfg = load_config(config)
            source = str(config)
            if cfg.source is not None:
                raise _UsageError(
                    f"{config} configures a storage node (it has a 'source'): "
                    f"run `streamer store --config {config}`"
                )
        else:
            raw_symbols = _split(symbols if symbols is not None else DEFAULT_SYMBOLS)
            symbol_list = [s if s == "all" else s.upper() for s in raw_symbols]
            if not symbol_list:
                raise _UsageError("--symbols: the symbol list is empty")
            stream_list = _split(streams if streams is not None else DEFAULT_STREAMS)
            if not stream_list:
                raise _UsageError("--streams: no stream types given")
            cfg = default_config(
                market=market or "spot",
                symbols=symbol_list,
                streams=stream_list,
                data_dir=data_dir or "./data",
                rest_url=rest_url,
                ws_url=ws_url,
            )
            source = "command line"
        # The one rule of every command: --state-dir > config > $STREAMER_STATE_DIR > default.
        cfg.runtime.state_dir = str(resolve_state_dir(state_dir, cfg))
        if shard is not None:
            _apply_shard(cfg, shard)
        if duration is not None and not 0 < duration <= MAX_DURATION:  # also nan and inf
            raise _UsageError(
                f"--duration must be a number of seconds > 0 and <= {MAX_DURATION:.0f}, "
                f"got {duration}"
            )
        setup_logging(logging.WARNING if quiet else logging.INFO)
        selection = _selection(plugins, plugin_module)
        live = None
        if not quiet and sys.stderr.isatty():
            from .core.ops.status_view import LiveSummary

            live = LiveSummary(sys.stderr)
        code = runtime.run(
            cfg,
            selection.enabled,
            extra_plugin_modules=selection.extra_modules,
            duration=duration,
            log_level=logging.WARNING if quiet else logging.INFO,
            source=source,
            on_status=live,
        )
    raise typer.Exit(code)


# -- store -----------------------------------------------------------------------------------
def _store(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="YAML file with a 'source' and 'sinks'.")
    ],
    plugins: Annotated[
        str | None,
        typer.Option(help="Comma-separated plugins to enable (default: all installed)."),
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop cleanly after this many seconds.")
    ] = None,
    state_dir: Annotated[
        str | None,
        typer.Option("--state-dir", help="Where status.json goes (as for `streamer run`)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log warnings only.")] = False,
    plugin_module: Annotated[
        list[str] | None,
        typer.Option("--plugin-module", help="Extra plugin module to import (development)."),
    ] = None,
) -> None:
    """Run a storage node: read records from a bus (source) and write them to the sinks,
    acknowledging only what every sink flushed. No exchange connection."""
    from .core import runtime

    with _bad_input():
        cfg = load_config(config)
        if cfg.source is None:
            raise _UsageError(
                f"{config}: a storage node's file needs a 'source' (and no pipelines); "
                f"run a collector with `streamer run --config {config}`"
            )
        cfg.runtime.state_dir = str(resolve_state_dir(state_dir, cfg))
        if duration is not None and not 0 < duration <= MAX_DURATION:
            raise _UsageError(
                f"--duration must be a number of seconds > 0 and <= {MAX_DURATION:.0f}, "
                f"got {duration}"
            )
        level = logging.WARNING if quiet else logging.INFO
        setup_logging(level)
        selection = _selection(plugins, plugin_module)
        code = runtime.store(
            cfg,
            selection.enabled,
            extra_plugin_modules=selection.extra_modules,
            duration=duration,
            log_level=level,
            source=str(config),
        )
    raise typer.Exit(code)


def _apply_shard(cfg: Config, shard: str) -> None:
    """``--shard K/N``: every pipeline keeps only the symbols of that shard."""
    from .core.shards import parse_shard

    try:
        parse_shard(shard)
    except ValueError as exc:
        raise _UsageError(f"--shard: {exc}") from None
    for pipeline in cfg.pipelines:
        pipeline.shard = shard.strip()


# -- plugins ---------------------------------------------------------------------------------
def _plugins() -> None:
    """List installed plugins: distribution, version, state and what each registers."""
    with _bad_input():
        extras = [__import__(m, fromlist=["_"]) for m in _extra_modules()]
        pm, report = make_plugin_manager(None, plugins=extras)
        registry = Registry.from_manager(pm)
    provides: dict[str, list[str]] = {}
    for (kind, name), owner in sorted(registry.owners.items()):
        provides.setdefault(owner, []).append(f"{kind} {name}")
    commands = {pm.get_name(impl.plugin) for impl in pm.hook.register_commands.get_hookimpls()}
    rows = []
    for info in report.plugins:
        if info.error:
            state = "FAILED"
        elif info.loaded:
            state = "loaded"
        else:
            state = "blocked"
        what = list(provides.get(info.name, []))
        if info.name in commands:
            what.append("commands")
        rows.append((info.name, f"{info.distribution} {info.version}", state, ", ".join(what)))
    for module in _extra_modules():
        rows.append((module, "(module)", "loaded", ", ".join(provides.get(module, []))))
    header = ("NAME", "DISTRIBUTION", "STATE", "PROVIDES")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for name, dist, state, what in [header, *rows]:
        line = f"{name:<{widths[0]}}  {dist:<{widths[1]}}  {state:<{widths[2]}}  {what}"
        typer.echo(line.rstrip())
    for info in report.failed:
        typer.echo(f"error: {info.error}", err=True)


# -- config ----------------------------------------------------------------------------------
def _load_and_validate(file: Path, plugins: str | None) -> tuple[Config, Registry]:
    cfg = load_config(file)
    registry = _selection(plugins).registry()
    validate_components(cfg, registry, source=str(file))
    return cfg, registry


def _config_check(
    file: Annotated[Path, typer.Argument(help="YAML configuration file.")],
    plugins: Annotated[
        str | None, typer.Option(help="Comma-separated plugins to enable (default: all).")
    ] = None,
) -> None:
    """Validate FILE: exit 0 when valid, 1 with a one-line error otherwise.

    Also runs, as ``streamer run`` does before it starts anything, the checks that need
    the exchange adapter but not the network (a depth speed or kline interval the market
    does not serve...) and every sink's start-up check (its path exists or can be created,
    is a directory, is writable)."""
    from .core.runtime import check_source, check_streams
    from .core.runtime.sinklock import check_sinks

    with _bad_input():
        cfg = load_config(file)
        registry = _selection(plugins).registry()
        pipelines, sinks = validate_components(cfg, registry, source=str(file))
        anyio.run(lambda: check_streams(pipelines, registry, source=str(file)))
        if cfg.source is not None:
            check_source(cfg, registry, source=str(file))
        check_sinks(sinks, registry)
    if cfg.source is not None:
        typer.echo(f"{file}: ok (source {cfg.source['type']}, {len(cfg.sinks)} sink(s))")
        return
    typer.echo(f"{file}: ok ({len(cfg.pipelines)} pipeline(s), {len(cfg.sinks)} sink(s))")


def _config_show(
    file: Annotated[Path, typer.Argument(help="YAML configuration file.")],
    plugins: Annotated[
        str | None, typer.Option(help="Comma-separated plugins to enable (default: all).")
    ] = None,
) -> None:
    """Print FILE's effective configuration, every default filled in, as YAML."""
    with _bad_input():
        cfg, registry = _load_and_validate(file, plugins)
        data = effective_config(cfg, registry)
    typer.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())


# -- symbols ---------------------------------------------------------------------------------
def _symbols(
    exchange: Annotated[str, typer.Option(help="Exchange plugin name.")] = "binance",
    market: Annotated[
        str | None, typer.Option(help="Market, e.g. spot or usdm (when the exchange has one).")
    ] = "spot",
    quote: Annotated[str | None, typer.Option(help="Only symbols quoted in this asset.")] = None,
    rest_url: Annotated[str | None, typer.Option("--rest-url", help="REST base URL.")] = None,
    all_status: Annotated[
        bool, typer.Option("--all", help="Include symbols that are not trading.")
    ] = False,
) -> None:
    """List the symbols an exchange market offers (trading ones unless --all)."""
    with _bad_input():
        registry = _selection(None).registry()
        adapter_cls = registry.exchange(exchange)
        raw: dict[str, Any] = {}
        if market:
            raw["market"] = market
        if rest_url:
            raw["rest_url"] = rest_url
        options = convert_options(raw, adapter_cls.Options, "options")
        adapter = adapter_cls(
            options,
            ExchangeContext(
                pipeline="symbols",
                counters=Counters(),
                logger=logging.getLogger(f"streamer.exchange.{exchange}"),
            ),
        )

        async def fetch():
            try:
                return await adapter.list_symbols()
            finally:
                await adapter.aclose()

        try:
            infos = anyio.run(fetch)
        except Exception as exc:  # unreachable exchange, third-party adapter bug...
            raise ValueError(
                f"cannot list the symbols of {exchange}: {type(exc).__name__}: {exc}"
            ) from None
    shown = 0
    for info in sorted(infos, key=lambda i: i.symbol):
        if quote and info.quote_asset != quote.upper():
            continue
        if not all_status and not info.trading:
            continue
        typer.echo(f"{info.symbol}\t{info.status}\t{info.base_asset}\t{info.quote_asset}")
        shown += 1
    typer.echo(f"{shown} symbol(s)", err=True)


# -- verify ----------------------------------------------------------------------------------
def _verify(
    data_dir: Annotated[Path, typer.Argument(help="Root folder a sink wrote (its path).")],
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable JSON.")] = False,
    sink: Annotated[str, typer.Option(help="Type of the sink that wrote it.")] = "csv",
) -> None:
    """Check a sink's files: gaps, duplicates, chain breaks, crossed books, torn rows.

    Exit code 0 when every problem is explained by a marker, 1 otherwise, 2 for bad input.
    """
    try:
        checker = _selection(None).registry().sink(sink).verify
        extra = {"progress": _progress()} if _takes(checker, "progress") else {}
        text, code = checker(data_dir, as_json=json_out, **extra)
    except NotImplementedError:
        typer.echo(f"error: sink type {sink!r} cannot check its files", err=True)
        raise typer.Exit(2) from None
    except (PluginError, ImportError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(text)
    raise typer.Exit(code)


def _progress():
    """A progress line on stderr when it is a terminal, else None (quiet when piped)."""
    from .core.quality import Progress

    return Progress(sys.stderr) if sys.stderr.isatty() else None


def _takes(func: Any, keyword: str) -> bool:
    import inspect

    try:
        return keyword in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


# -- report ----------------------------------------------------------------------------------
def _report(
    data_dir: Annotated[Path, typer.Argument(help="Root folder a sink wrote (its path).")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="HTML file to write (one self-contained page).")
    ] = Path("report.html"),
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the full facts as JSON here.")
    ] = None,
    start: Annotated[
        str | None, typer.Option("--from", help="Start, UTC: YYYY-MM-DD or YYYY-MM-DDTHH:MM.")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="End, UTC (a bare date: the end of that day).")
    ] = None,
    symbols: Annotated[
        str | None, typer.Option("--symbols", help="Only these symbols, comma-separated.")
    ] = None,
    sink: Annotated[str, typer.Option(help="Type of the sink that wrote it.")] = "csv",
) -> None:
    """Data-quality report: coverage, gaps and their causes, rates, latency, bytes.

    Writes one self-contained HTML page (--json: every fact per stream and day).
    Pictures need matplotlib: pip install 'market-streamer\\[report]'.
    Exit code 0, or 2 for bad input.
    """
    from .core.report import PICTURES_HINT, build, parse_when, render_text
    from .core.report_html import have_matplotlib, render_html

    try:
        t0 = parse_when(start) if start else None
        t1 = parse_when(end, end=True) if end else None
        if t0 is not None and t1 is not None and t1 <= t0:
            raise ValueError(f"--to ({end}) is not after --from ({start})")
        names = [s.upper() for s in _split(symbols)] if symbols is not None else None
        if names is not None and not names:
            raise ValueError("--symbols: the symbol list is empty")
        sink_cls = _selection(None).registry().sink(sink)
        facts = sink_cls.report_facts(
            data_dir, start=t0, end=t1, symbols=names, progress=_progress()
        )
        builder = build(facts, str(data_dir), t0, t1)
    except NotImplementedError:
        typer.echo(f"error: sink type {sink!r} cannot describe its files", err=True)
        raise typer.Exit(2) from None
    except (PluginError, ImportError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        if not builder.compacts:
            typer.echo(f"error: {data_dir}: no stream found to report on", err=True)
            raise typer.Exit(2)
        if builder.window() is None:
            typer.echo(
                f"error: {data_dir}: the files hold no rows (only headers or markers)", err=True
            )
            raise typer.Exit(2)
        try:
            output.write_text(render_html(builder), encoding="utf-8")
            if json_path is not None:
                builder.write_json(str(json_path))
        except OSError as exc:
            typer.echo(f"error: cannot write the report: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(render_text(builder))
        wrote = f"report: {output}" + (f", {json_path}" if json_path is not None else "")
        if not have_matplotlib():
            wrote += f" (no pictures: {PICTURES_HINT})"
        typer.echo(wrote)
    finally:
        builder.close()


def main() -> None:
    """Console-script entry point."""
    app = build_app()
    app(prog_name="streamer")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
