"""YAML configuration decoded into msgspec Structs, with errors that name the exact path.

The file's shape::

    pipelines:
      - name: spot
        exchange: binance
        options: {market: spot}
        symbols: [BTCUSDT, ETHUSDT]
        streams: {aggtrade: {}, kline: {intervals: [1m]}}
        sinks: [csv]
    sinks:
      csv: {type: csv, path: ./data}
    runtime: {shutdown_timeout: 10}

The core validates the frame; each component's options are validated against that
component's own ``Options`` Struct (:func:`validate_components`), so a typo in a stream's
option is reported as ``pipelines[0].streams.kline.intervals[1]: expected ...``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml

from .plugins import PluginError, Registry

#: Environment variable naming the state directory when neither a flag nor the config does.
STATE_DIR_ENV = "STREAMER_STATE_DIR"
#: The state directory when nothing names one (relative to the current directory).
DEFAULT_STATE_DIR = ".streamer"


class ConfigError(Exception):
    """The configuration is invalid; the message is one line naming the file and path."""


class PipelineConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One exchange market, its symbols, the stream types to run and the sinks to feed."""

    name: str
    exchange: str
    symbols: list[str]
    streams: dict[str, dict[str, Any]]
    sinks: list[str]
    #: Exchange adapter options, validated against the adapter's ``Options``.
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Collector worker processes for this pipeline; 0 picks from symbols and CPUs.
    workers: int = 0


class RuntimeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Process-model settings shared by every pipeline."""

    #: Seconds to drain and flush on SIGTERM before children are killed.
    shutdown_timeout: float = 15.0
    #: A worker sends a batch when it holds this many records ...
    batch_size: int = 2000
    #: ... or when its oldest record is this many seconds old.
    batch_interval: float = 0.05
    #: Batches each channel between processes may hold before backpressure.
    queue_batches: int = 256
    #: Longest pause before restarting a child that keeps dying.
    restart_backoff_max: float = 30.0
    #: Where the supervisor keeps its pidfile, status file and logs; empty (the default)
    #: means ``$STREAMER_STATE_DIR``, else ``.streamer`` (see :func:`resolve_state_dir`).
    state_dir: str = ""
    #: Seconds between status publications.
    status_interval: float = 1.0
    #: Port of the Prometheus ``/metrics`` endpoint on 127.0.0.1; 0 (default) = off.
    metrics_port: int = 0


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A whole configuration file."""

    pipelines: list[PipelineConfig]
    sinks: dict[str, dict[str, Any]]
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)


_DOLLAR_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_FIELD_PREFIX = re.compile(
    r"^(?P<field>[A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*): (?P<rest>.+)$", re.S
)


def _format_error(exc: msgspec.ValidationError, prefix: str = "") -> str:
    """Turn msgspec's ``Expected x, got y - at `$.a[0].b``` into ``a[0].b: expected x, got y``."""
    text = str(exc)
    match = _DOLLAR_PATH.search(text)
    path = prefix
    if match:
        path = prefix + match.group("path")
        text = text[: match.start()]
    else:
        # A component's own check may name the field it rejects: "intervals[1]: ...".
        field = _FIELD_PREFIX.match(text)
        if field:
            path = f"{prefix}.{field.group('field')}"
            text = field.group("rest")
    path = path.lstrip(".") or "<top level>"
    return f"{path}: {text[:1].lower()}{text[1:]}"


def parse_config(data: Any, *, source: str = "<config>") -> Config:
    """Validate already-loaded YAML data (the frame only, not component options)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'pipelines' key")
    try:
        config = msgspec.convert(data, Config, str_keys=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_format_error(exc)}") from None
    _check_frame(config, source)
    return config


def load_config(path: str | Path) -> Config:
    """Read, safe-load and validate a YAML file; raises :class:`ConfigError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    return parse_config(data, source=str(path))


#: Runtime settings that must be positive (the process model cannot work otherwise).
_POSITIVE_RUNTIME = (
    "shutdown_timeout",
    "batch_size",
    "batch_interval",
    "queue_batches",
    "restart_backoff_max",
    "status_interval",
)


def _check_frame(config: Config, source: str) -> None:
    for name in _POSITIVE_RUNTIME:
        value = getattr(config.runtime, name)
        if value <= 0:
            raise ConfigError(f"{source}: runtime.{name}: must be > 0, got {value}")
    if not config.pipelines:
        raise ConfigError(f"{source}: pipelines: at least one pipeline is required")
    seen: set[str] = set()
    for i, pipeline in enumerate(config.pipelines):
        where = f"{source}: pipelines[{i}]"
        if pipeline.name in seen:
            raise ConfigError(f"{where}.name: duplicate pipeline name {pipeline.name!r}")
        seen.add(pipeline.name)
        if not pipeline.symbols:
            raise ConfigError(f"{where}.symbols: the symbol list is empty")
        if not pipeline.streams:
            raise ConfigError(f"{where}.streams: no stream types configured")
        if not pipeline.sinks:
            raise ConfigError(f"{where}.sinks: no sinks configured")
        if pipeline.workers < 0:
            raise ConfigError(f"{where}.workers: must be >= 0 (0 = automatic)")
        for j, sink in enumerate(pipeline.sinks):
            if sink not in config.sinks:
                defined = ", ".join(sorted(config.sinks)) or "none"
                raise ConfigError(
                    f"{where}.sinks[{j}]: sink {sink!r} is not defined under 'sinks' "
                    f"(defined: {defined})"
                )
    for name, body in config.sinks.items():
        if not isinstance(body, dict) or "type" not in body:
            raise ConfigError(f"{source}: sinks.{name}.type: every sink needs a 'type'")


def convert_options(raw: dict[str, Any], options_type: type[msgspec.Struct], path: str) -> Any:
    """Validate one component's options; errors name ``path`` plus the key inside it."""
    try:
        return msgspec.convert(raw or {}, options_type, str_keys=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_format_error(exc, prefix=path)) from None


class ResolvedPipeline(msgspec.Struct, kw_only=True):
    """A pipeline with every component's options validated into their Structs."""

    config: PipelineConfig
    exchange_options: Any
    stream_options: dict[str, Any]


def validate_components(config: Config, registry: Registry, *, source: str = "<config>"):
    """Check every named component exists and its options are valid.

    Returns ``(pipelines, sinks)``: a :class:`ResolvedPipeline` per pipeline and, per sink
    instance, ``(type name, options Struct)``. Raises :class:`ConfigError`.
    """
    resolved: list[ResolvedPipeline] = []
    try:
        for i, pipeline in enumerate(config.pipelines):
            where = f"pipelines[{i}]"
            exchange_cls = _named(registry.exchange, pipeline.exchange, f"{where}.exchange")
            exchange_options = convert_options(
                pipeline.options, exchange_cls.Options, f"{where}.options"
            )
            stream_options = {}
            for stream_name, raw in pipeline.streams.items():
                stream_cls = _named(registry.stream, stream_name, f"{where}.streams")
                stream_options[stream_name] = convert_options(
                    raw, stream_cls.Options, f"{where}.streams.{stream_name}"
                )
            resolved.append(
                ResolvedPipeline(
                    config=pipeline,
                    exchange_options=exchange_options,
                    stream_options=stream_options,
                )
            )
        sinks = {}
        for name, body in config.sinks.items():
            body = dict(body)
            type_name = body.pop("type")
            sink_cls = _named(registry.sink, type_name, f"sinks.{name}.type")
            sinks[name] = (type_name, convert_options(body, sink_cls.Options, f"sinks.{name}"))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return resolved, sinks


def _named(lookup, name: str, path: str):
    try:
        return lookup(name)
    except PluginError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def effective_config(config: Config, registry: Registry) -> dict[str, Any]:
    """The configuration with every default filled in, as plain data (for ``config show``)."""
    pipelines, sinks = validate_components(config, registry)
    data = msgspec.to_builtins(config)
    for out, resolved in zip(data["pipelines"], pipelines, strict=True):
        out["options"] = msgspec.to_builtins(resolved.exchange_options)
        out["streams"] = {
            name: msgspec.to_builtins(opts) for name, opts in resolved.stream_options.items()
        }
    data["sinks"] = {
        name: {"type": type_name, **msgspec.to_builtins(opts)}
        for name, (type_name, opts) in sinks.items()
    }
    data["runtime"]["state_dir"] = str(resolve_state_dir(None, config))
    return data


def resolve_state_dir(
    flag: str | os.PathLike[str] | None,
    config: Config | RuntimeConfig | None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """The state directory, by the one rule every command uses: the ``--state-dir`` flag,
    else the config's ``runtime.state_dir``, else ``$STREAMER_STATE_DIR`` (``env``,
    default ``os.environ``), else ``.streamer``. Empty values count as unset; ``~`` is
    expanded; a relative path stays relative to the current directory."""
    runtime = config.runtime if isinstance(config, Config) else config
    environ = os.environ if env is None else env
    for value in (flag, runtime.state_dir if runtime else None, environ.get(STATE_DIR_ENV)):
        if value is not None and str(value):
            return Path(value).expanduser()
    return Path(DEFAULT_STATE_DIR)
