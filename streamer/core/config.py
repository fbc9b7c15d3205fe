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
from typing import Annotated, Any

import msgspec
import msgspec.inspect as mi
import yaml

from .plugins import PluginError, Registry
from .shards import parse_shard
from .units import Size, check_size, parse_size

#: Environment variable naming the state directory when neither a flag nor the config does.
STATE_DIR_ENV = "STREAMER_STATE_DIR"
#: The state directory when nothing names one (relative to the current directory).
DEFAULT_STATE_DIR = ".streamer"
#: Longest error message shown: a bad value must not turn into a 100 KB line.
MAX_MESSAGE = 400
#: Largest configuration file read (``/dev/urandom`` or a data file given by mistake).
MAX_CONFIG_BYTES = 4 * 1024 * 1024

#: Smallest ``worker_buffer``/``writer_buffer``: below it a single batch does not fit.
MIN_BUFFER = 64 * 1024

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` as one line: control characters escaped, cut to ``limit`` characters."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_value(value: Any) -> str:
    """A short rendering of a configured value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        digits = str(abs(value))
        return str(value) if len(digits) <= 20 else f"a {len(digits)}-digit number"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        shown = repr(value)
        return shown if len(shown) <= 40 else shown[:36] + "...'"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


class ConfigError(Exception):
    """The configuration is invalid; the message is one line naming the file and path."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


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
    workers: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    #: Keep only the symbols of shard ``"K/N"`` (1-based; :mod:`.shards`); empty: all.
    shard: str = ""


class RuntimeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Process-model settings shared by every pipeline."""

    #: Seconds to drain and flush on SIGTERM before children are killed.
    shutdown_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 15.0
    #: A worker sends a batch when it holds this many records ...
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 2000
    #: ... or when its oldest record is this many seconds old.
    batch_interval: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.05
    #: Batches each channel between processes may hold before backpressure (a second
    #: bound; ``worker_buffer`` and ``writer_buffer`` bound the bytes).
    queue_batches: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 256
    #: Memory a collector worker may hold for the sinks: records not yet sent (estimated
    #: from their type and number of levels) plus encoded batches queued for the writers.
    #: Past half of it the worker pauses reading the exchange's sockets, below a quarter it
    #: resumes; past all of it records are dropped as ``overflow`` markers.
    worker_buffer: Size = "32MB"
    #: Bytes of batches a sink writer may queue before it stops reading its workers'
    #: sockets (backpressure onto the workers).
    writer_buffer: Size = "32MB"
    #: Longest pause before restarting a child that keeps dying.
    restart_backoff_max: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    #: Where the supervisor keeps its pidfile, status file and logs; empty (the default)
    #: means ``$STREAMER_STATE_DIR``, else ``.streamer`` (see :func:`resolve_state_dir`).
    state_dir: str = ""
    #: Seconds between status publications.
    status_interval: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    #: Port of the Prometheus ``/metrics`` endpoint on 127.0.0.1; 0 (default) = off.
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0

    def __post_init__(self) -> None:
        check_size("worker_buffer", self.worker_buffer, minimum=MIN_BUFFER)
        check_size("writer_buffer", self.writer_buffer, minimum=MIN_BUFFER)

    @property
    def worker_buffer_bytes(self) -> int:
        """:attr:`worker_buffer` in bytes."""
        return parse_size(self.worker_buffer)

    @property
    def writer_buffer_bytes(self) -> int:
        """:attr:`writer_buffer` in bytes."""
        return parse_size(self.writer_buffer)


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A whole configuration file."""

    pipelines: list[PipelineConfig] = msgspec.field(default_factory=list)
    sinks: dict[str, dict[str, Any]]
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    #: A storage node's source (``streamer store``): ``{type: nats, ...}``; then the file
    #: has no pipelines and every sink is written from the source.
    source: dict[str, Any] | None = None


_DOLLAR_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_FIELD_PREFIX = re.compile(
    r"^(?P<field>[A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*): (?P<rest>.+)$", re.S
)
_PATH_PART = re.compile(r"\.(?P<key>[^.\[]+)|\[(?P<index>\d+)\]|\[\.\.\.\]")
#: msgspec's wording when a number is of the wrong type or out of its ``Meta`` range.
_NUMBER_ERROR = re.compile(r"^Expected `(?:int|float)`(?:, got `\w+`| [<>]=? \S+)$")
_MISSING = object()


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


def _numeric_rule(info: Any) -> str:
    """``an integer between 1 and 5000`` for an ``IntType``/``FloatType`` with bounds."""
    kind = "an integer" if isinstance(info, mi.IntType) else "a number"
    lo = (">=", info.ge) if info.ge is not None else (">", info.gt)
    hi = ("<=", info.le) if info.le is not None else ("<", info.lt)
    if lo[0] == ">=" and hi[0] == "<=" and lo[1] is not None and hi[1] is not None:
        return f"{kind} between {_number(lo[1])} and {_number(hi[1])}"
    parts = [f"{op} {_number(v)}" for op, v in (lo, hi) if v is not None]
    return f"{kind} {' and '.join(parts)}" if parts else kind


def _locate(root: Any, data: Any, path: str) -> tuple[Any, Any]:
    """The msgspec type info and the raw value at msgspec path ``path`` (``.a[0].b``)."""
    info: Any = mi.type_info(root)
    value = data
    for match in _PATH_PART.finditer(path):
        key, index = match.group("key"), match.group("index")
        if key is None and index is None:  # a dict key msgspec does not name
            return None, _MISSING
        if isinstance(info, mi.UnionType):
            info = next((t for t in info.types if not isinstance(t, mi.NoneType)), None)
        if key is not None:
            fields = {f.encode_name: f.type for f in getattr(info, "fields", ())}
            info = fields.get(key) or getattr(info, "value_type", None)
            value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
        else:
            info = getattr(info, "item_type", None)
            i = int(index)
            value = value[i] if isinstance(value, list) and i < len(value) else _MISSING
    if isinstance(info, mi.UnionType):
        info = next((t for t in info.types if isinstance(t, mi.IntType | mi.FloatType)), info)
    return info, value


def _format_error(
    exc: msgspec.ValidationError, prefix: str = "", *, root: Any = None, data: Any = None
) -> str:
    """Turn msgspec's ``Expected x, got y - at `$.a[0].b``` into ``a[0].b: expected x, got y``.

    Given the ``root`` type and the raw ``data``, a number of the wrong type or outside its
    ``Meta`` range reads ``a.b: must be an integer between 1 and 5000, got '1e300'``.
    """
    text = str(exc)
    match = _DOLLAR_PATH.search(text)
    path = prefix
    if match:
        path = prefix + match.group("path")
        text = text[: match.start()]
        if root is not None and _NUMBER_ERROR.match(text):
            info, value = _locate(root, data, match.group("path"))
            if isinstance(info, mi.IntType | mi.FloatType) and value is not _MISSING:
                text = f"must be {_numeric_rule(info)}, got {show_value(value)}"
    # A Struct's own check may name the field it rejects: "intervals[1]: ...".
    field = _FIELD_PREFIX.match(text)
    if field:
        path = f"{path}.{field.group('field')}"
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
        raise ConfigError(f"{source}: {_format_error(exc, root=Config, data=data)}") from None
    _check_frame(config, source)
    return config


def load_config(path: str | Path) -> Config:
    """Read, safe-load and validate a YAML file; raises :class:`ConfigError` on any problem.

    Every message names the file: missing, unreadable, too large, not UTF-8 text (binary
    garbage), not YAML, or invalid.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: too large for a configuration file (over {MAX_CONFIG_BYTES // 1048576} MB)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    return parse_config(data, source=str(path))


def _check_frame(config: Config, source: str) -> None:
    if config.source is not None:
        if config.pipelines:
            raise ConfigError(
                f"{source}: pipelines: a storage node's file (with 'source') has no pipelines"
            )
        if not isinstance(config.source, dict) or "type" not in config.source:
            raise ConfigError(f"{source}: source.type: the source needs a 'type'")
        if not config.sinks:
            raise ConfigError(f"{source}: sinks: at least one sink is required")
    elif not config.pipelines:
        raise ConfigError(f"{source}: pipelines: at least one pipeline is required")
    seen: set[str] = set()
    for i, pipeline in enumerate(config.pipelines):
        where = f"{source}: pipelines[{i}]"
        if pipeline.name in seen:
            raise ConfigError(f"{where}.name: duplicate pipeline name {show_value(pipeline.name)}")
        seen.add(pipeline.name)
        if not pipeline.symbols:
            raise ConfigError(f"{where}.symbols: the symbol list is empty")
        if pipeline.shard:
            try:
                parse_shard(pipeline.shard)
            except ValueError as exc:
                raise ConfigError(f"{where}.shard: {exc}") from None
        if not pipeline.streams:
            raise ConfigError(f"{where}.streams: no stream types configured")
        if not pipeline.sinks:
            raise ConfigError(f"{where}.sinks: no sinks configured")
        for j, sink in enumerate(pipeline.sinks):
            if sink not in config.sinks:
                defined = ", ".join(sorted(config.sinks)) or "none"
                raise ConfigError(
                    f"{where}.sinks[{j}]: sink {show_value(sink)} is not defined under 'sinks' "
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
        message = _format_error(exc, prefix=path, root=options_type, data=raw or {})
        raise ConfigError(message) from None


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
            writers = body.pop(WRITERS_KEY, _MISSING)
            sink_cls = _named(registry.sink, type_name, f"sinks.{name}.type")
            sinks[name] = (type_name, convert_options(body, sink_cls.Options, f"sinks.{name}"))
            _check_writers(writers, sink_cls, type_name, f"sinks.{name}.{WRITERS_KEY}")
        if config.source is not None:
            validate_source(config, registry)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return resolved, sinks


#: The runtime's own key in a sink's section: how many writer processes run it.
WRITERS_KEY = "writers"
#: Most writer processes one sink instance may run as.
MAX_WRITERS = 1024


def _check_writers(value: Any, sink_cls: Any, type_name: str, path: str) -> None:
    if value is _MISSING:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WRITERS:
        raise ConfigError(
            f"{path}: must be an integer between 1 and {MAX_WRITERS}, got {show_value(value)}"
        )
    if value > 1 and not getattr(sink_cls, "multi_writer", False):
        raise ConfigError(
            f"{path}: sink type {type_name!r} runs as one writer process only, got {value}"
        )


def sink_writers(config: Config) -> dict[str, int | None]:
    """Each sink's ``writers`` setting (``None``: automatic); valid once
    :func:`validate_components` accepted ``config``."""
    return {name: body.get(WRITERS_KEY) for name, body in config.sinks.items()}


def validate_source(config: Config, registry: Registry) -> tuple[str, Any]:
    """A storage node's ``source`` section: ``(type name, options Struct)``."""
    body = dict(config.source or {})
    type_name = body.pop("type", "")
    source_cls = _named(registry.source, type_name, "source.type")
    return type_name, convert_options(body, source_cls.Options, "source")


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
    for name, writers in sink_writers(config).items():
        if writers is not None:
            data["sinks"][name][WRITERS_KEY] = writers
    data["runtime"]["state_dir"] = str(resolve_state_dir(None, config))
    if config.source is not None:
        type_name, options = validate_source(config, registry)
        data["source"] = {"type": type_name, **msgspec.to_builtins(options)}
    else:
        data.pop("source", None)
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
