"""market-streamer: a plugin-based collector of crypto exchange market data.

Public API for plugin authors: :data:`hookimpl`, the base classes, the records and the
plugin-manager factory. Everything else is internal.
"""

from .core.api import (
    ExchangeAdapter,
    ExchangeContext,
    Inbox,
    NoOptions,
    SequenceRule,
    Sink,
    SinkContext,
    StreamContext,
    StreamKey,
    StreamType,
    Subscription,
    SymbolInfo,
)
from .core.hookspecs import hookimpl
from .core.metrics import Counters
from .core.plugins import PluginError, Registry, make_plugin_manager
from .core.records import BookSnapshot, DepthUpdate, Kline, Level, Marker, Record, Trade

__version__ = "0.1.0"

__all__ = [
    "BookSnapshot",
    "Counters",
    "DepthUpdate",
    "ExchangeAdapter",
    "ExchangeContext",
    "Inbox",
    "Kline",
    "Level",
    "Marker",
    "NoOptions",
    "PluginError",
    "Record",
    "Registry",
    "SequenceRule",
    "Sink",
    "SinkContext",
    "StreamContext",
    "StreamKey",
    "StreamType",
    "Subscription",
    "SymbolInfo",
    "Trade",
    "__version__",
    "hookimpl",
    "make_plugin_manager",
]
