"""market-streamer: a plugin-based collector of crypto exchange market data.

Public API for plugin authors: :data:`hookimpl`, the base classes, the records, the record
vocabulary (each record's output stream name and :class:`StreamKey`, resume key and time),
kline interval arithmetic and the plugin-manager factory. Everything else is internal.
"""

from .core.api import (
    Channel,
    EncoderContext,
    ExchangeAdapter,
    ExchangeContext,
    Inbox,
    NoOptions,
    SequenceRule,
    Sink,
    SinkContext,
    SinkEncoder,
    StreamContext,
    StreamKey,
    StreamType,
    Subscription,
    SymbolInfo,
)
from .core.counters import Counters
from .core.hookspecs import hookimpl
from .core.logs import RateLimitedLog
from .core.plugins import PluginError, Registry, make_plugin_manager
from .core.records import (
    AGGTRADE_STREAM,
    DEPTH_STREAM,
    KLINE_STREAM_PREFIX,
    ORDERBOOK_STREAM,
    BookSnapshot,
    Chunk,
    DepthUpdate,
    EncodedBatch,
    Kline,
    Level,
    Marker,
    MarkerKind,
    Record,
    Trade,
    kline_stream,
    record_key,
    record_time,
    stream_key,
    stream_name,
)
from .core.units import (
    KLINE_INTERVALS,
    Duration,
    check_duration,
    interval_ms,
    next_open_time,
    parse_duration,
)

__version__ = "0.1.0"

__all__ = [
    "AGGTRADE_STREAM",
    "DEPTH_STREAM",
    "KLINE_INTERVALS",
    "KLINE_STREAM_PREFIX",
    "ORDERBOOK_STREAM",
    "BookSnapshot",
    "Channel",
    "Chunk",
    "Counters",
    "DepthUpdate",
    "Duration",
    "EncodedBatch",
    "EncoderContext",
    "ExchangeAdapter",
    "ExchangeContext",
    "Inbox",
    "Kline",
    "Level",
    "Marker",
    "MarkerKind",
    "NoOptions",
    "PluginError",
    "RateLimitedLog",
    "Record",
    "Registry",
    "SequenceRule",
    "Sink",
    "SinkContext",
    "SinkEncoder",
    "StreamContext",
    "StreamKey",
    "StreamType",
    "Subscription",
    "SymbolInfo",
    "Trade",
    "__version__",
    "check_duration",
    "hookimpl",
    "interval_ms",
    "kline_stream",
    "make_plugin_manager",
    "next_open_time",
    "parse_duration",
    "record_key",
    "record_time",
    "stream_key",
    "stream_name",
]
