"""The ``kline`` stream type: each closed candlestick exactly once, missed ones refetched.

Output streams are named ``kline_<interval>``; a kline is keyed by
``(symbol, interval, open_time)``. By default only the final update of a bar (``closed``)
is written. With ``all_updates: true`` every update is written as it arrives (duplicates
from overlapping connections included) and closed bars are still tracked for gaps.

Closed bars go through the same :class:`~streamer.plugins.streams.aggtrade.KeySequencer`
as trades, keyed by open time: a jump in open times, a reconnect, or a restart (resume
from ``StreamContext.resume["kline_<interval>"]``) triggers a fill from
``ExchangeAdapter.backfill_klines``; the live bars arriving meanwhile are held and emitted
in order afterwards. Filled and unfillable ranges become markers.
"""

from __future__ import annotations

import time
from typing import Annotated, ClassVar

import msgspec

from streamer import KLINE_INTERVALS as INTERVALS
from streamer import (
    Channel,
    Duration,
    Kline,
    Record,
    StreamContext,
    Subscription,
    check_duration,
    hookimpl,
    next_open_time,
)

from .aggtrade import GapFillStream, KeySequencer


class KlineOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of the ``kline`` stream type."""

    #: Intervals to collect, e.g. ``[1m, 1h]`` (``1s`` on spot only).
    intervals: list[str] = msgspec.field(default_factory=lambda: ["1m"])
    #: Write every update of a bar, not only the closed one.
    all_updates: bool = False
    #: Fill missed closed bars from the exchange's REST API.
    backfill: bool = True
    #: Wait this long before filling a gap found from open times.
    gap_grace: Duration = "500ms"
    #: Closed bars held per (symbol, interval) while a gap is filled.
    max_held: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = 10_000

    def __post_init__(self) -> None:
        if not self.intervals:
            raise msgspec.ValidationError("intervals: at least one interval is required")
        for i, interval in enumerate(self.intervals):
            if interval not in INTERVALS:
                raise msgspec.ValidationError(
                    f"intervals[{i}]: invalid kline interval {interval!r}; "
                    f"use one of {', '.join(INTERVALS)}"
                )
        if len(set(self.intervals)) != len(self.intervals):
            raise msgspec.ValidationError("intervals: an interval is listed twice")
        check_duration("gap_grace", self.gap_grace)


def _open_time(kline: Kline) -> int:
    return kline.open_time


class KlineStream(GapFillStream):
    """Closed klines exactly once per (symbol, interval, open time); streams ``kline_<i>``."""

    Options: ClassVar[type[msgspec.Struct]] = KlineOptions
    channels: ClassVar[frozenset[Channel]] = frozenset({"kline"})
    _counter_prefix: ClassVar[str] = "klines"

    def __init__(self, options: msgspec.Struct, context: StreamContext) -> None:
        super().__init__(options, context)
        assert isinstance(options, KlineOptions)
        self.opts = options
        served = getattr(context.exchange, "kline_intervals", None)
        if served is not None:
            unsupported = [i for i in options.intervals if i not in served]
            if unsupported:
                raise ValueError(
                    f"kline interval(s) {', '.join(unsupported)} not served by "
                    f"{self._exchange_name} {self._market}; use one of {', '.join(served)}"
                )
        self._streams = {interval: f"kline_{interval}" for interval in options.intervals}
        for symbol in context.symbols:
            for interval, stream in self._streams.items():
                seq = KeySequencer(
                    context.emit, _open_time, lambda t, i=interval: next_open_time(t, i)
                )
                self._add_state(symbol, stream, seq)

    def subscriptions(self) -> list[Subscription]:
        """One ``kline`` channel per symbol and interval."""
        return [
            Subscription(symbol, "kline", interval)
            for symbol in self.context.symbols
            for interval in self.opts.intervals
        ]

    def on_record(self, record: Record) -> None:
        """Emit a closed bar once (or every update with ``all_updates``)."""
        stream = self._streams.get(record.interval)  # type: ignore[union-attr]
        if stream is None:
            return
        if not record.closed:  # type: ignore[union-attr]
            if self.opts.all_updates and (record.symbol, stream) in self._states:
                self.context.emit(record)
            return
        self._offer(record.symbol, stream, record)

    def _fetch(self, symbol: str, stream: str, start: int, end: int | None):
        interval = stream[len("kline_") :]
        if end is None:
            end = time.time_ns() // 1_000_000
        return self.context.exchange.backfill_klines(symbol, interval, start, end)


@hookimpl
def register_streams(register):
    """Register the ``kline`` stream type."""
    register("kline", KlineStream)
