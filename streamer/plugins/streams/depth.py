"""The ``depth`` stream type: diff-depth updates passed through, de-duplicated, gap-checked.

Each :class:`~streamer.core.records.DepthUpdate` is written as received, once: an update
whose final id ``last_update_id`` is not above the last one written for the symbol is a
duplicate (overlapping connections during rotation) and is dropped. A break in the chain,
judged by the exchange's :class:`~streamer.core.api.SequenceRule` (spot: ``U > prev_u + 1``;
futures: ``pu != prev_u``), is reported as a ``gap`` marker whose keys bound the missing
update ids; depth diffs cannot be refetched, so the ``orderbook`` stream type resyncs.
"""

from __future__ import annotations

import time
from typing import ClassVar

import msgspec

from streamer import (
    Channel,
    DepthUpdate,
    Marker,
    Record,
    StreamContext,
    StreamKey,
    StreamType,
    Subscription,
    check_duration,
    hookimpl,
)


class DepthOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of the ``depth`` stream type."""

    #: Update speed asked of the exchange (Binance spot 100ms|1000ms, usdm
    #: 0ms|100ms|250ms|500ms); empty uses the exchange's ``depth_speed`` option.
    speed: str = ""

    def __post_init__(self) -> None:
        if self.speed:  # which speeds exist is the exchange's business; "-1s" is nobody's
            check_duration("speed", self.speed)


class DepthStream(StreamType):
    """Diff-depth updates, once each, with gap markers (stream ``depth``)."""

    Options: ClassVar[type[msgspec.Struct]] = DepthOptions
    channels: ClassVar[frozenset[Channel]] = frozenset({"depth"})
    STREAM: ClassVar[str] = "depth"

    def __init__(self, options: msgspec.Struct, context: StreamContext) -> None:
        super().__init__(options, context)
        assert isinstance(options, DepthOptions)
        self.opts = options
        try:
            self._futures = context.exchange.sequence_rule.style == "futures"
        except NotImplementedError:
            raise ValueError(
                f"exchange {type(context.exchange).__name__} does not serve depth"
            ) from None
        self._exchange_name = getattr(context.exchange, "exchange", "")
        self._market = getattr(context.exchange, "market", "")
        # Resume from what the sinks hold: the first update after a restart is checked
        # against the last one written, so the hole between two runs gets its marker.
        self._last: dict[str, int | None] = {
            symbol: context.resume.get(
                StreamKey(self._exchange_name, self._market, symbol, self.STREAM)
            )
            for symbol in context.symbols
        }
        self._resumed = {symbol for symbol, last in self._last.items() if last is not None}
        #: Updates dropped as duplicates (also counted as ``depth_duplicates``).
        self.duplicates = 0

    def subscriptions(self) -> list[Subscription]:
        """One ``depth`` channel per symbol at the configured speed."""
        return [Subscription(s, "depth", self.opts.speed) for s in self.context.symbols]

    def on_record(self, record: Record) -> None:
        """Write ``record`` unless it is a duplicate; mark a sequence break first."""
        assert isinstance(record, DepthUpdate)
        symbol = record.symbol
        if symbol not in self._last:
            return
        last = self._last[symbol]
        if last is not None:
            if record.last_update_id <= last:
                self.duplicates += 1
                self.context.counters.incr("depth_duplicates", symbol, self.STREAM)
                return
            after_restart = symbol in self._resumed
            self._resumed.discard(symbol)
            if self._futures and record.prev_update_id is not None:
                broken = record.prev_update_id != last
            else:
                broken = record.first_update_id > last + 1
            if broken:
                self.context.counters.incr("gaps_gap", symbol, self.STREAM)
                self.context.emit(
                    Marker(
                        self._exchange_name,
                        self._market,
                        symbol,
                        self.STREAM,
                        "gap",
                        last + 1,
                        max(record.first_update_id - 1, last + 1),
                        time.time_ns() // 1_000_000,
                        "restart" if after_restart else "sequence break",
                    )
                )
        self._last[symbol] = record.last_update_id
        self.context.emit(record)


@hookimpl
def register_streams(register):
    """Register the ``depth`` stream type."""
    register("depth", DepthStream)
