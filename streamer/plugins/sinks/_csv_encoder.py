"""The CSV sink's worker-side encoder (private to :mod:`.csv_batch`).

It runs in each collector worker (:class:`streamer.SinkEncoder`): it groups a batch by
output file (stream and rotation period, as :meth:`.csv_batch.CsvSink.write` does) and
builds the rows of trades, depth updates and closed klines there, with the same row
encoders as the sink. The writer then only de-duplicates by key and appends the bytes.

Left to the writer as records: markers, order-book snapshots (their column count depends
on the file on disk), unclosed klines (the sink counts and skips them), and every record
of a stream whose rows need CSV quoting (an exchange string with a separator: the sink
quotes and counts them) or whose keys do not increase within the batch (the sink's own
de-duplication decides). No file I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from operator import attrgetter

from streamer import (
    Chunk,
    DepthUpdate,
    EncodedBatch,
    EncoderContext,
    Kline,
    Record,
    SinkEncoder,
    StreamKey,
    Trade,
    kline_stream,
)

from . import _csv_layout as layout

_TRADE_ID = attrgetter("trade_id")
_TRANSACT = attrgetter("transact_time")
_EVENT = attrgetter("event_time")
_UPDATE_ID = attrgetter("last_update_id")
_OPEN_TIME = attrgetter("open_time")
#: Separators per row: aggTrades (spot has ``is_best_match``), depth, klines.
_COMMAS_SPOT = len(layout.aggtrade_columns("spot")) - 1
_COMMAS_FUTURES = len(layout.aggtrade_columns("usdm")) - 1
_COMMAS_DEPTH = len(layout.DEPTH_COLUMNS) - 1
_COMMAS_KLINE = len(layout.KLINE_COLUMNS) - 1


def _increasing(keys: list[int]) -> bool:
    return all(map(int.__lt__, keys, keys[1:]))


class CsvEncoder(SinkEncoder):
    """Builds aggTrades, depth and closed-kline rows in the worker (see the module doc)."""

    def __init__(self, options, context: EncoderContext) -> None:
        super().__init__(options, context)
        self._span = layout.PeriodNamer(options.rotation == "hourly").span
        self._keys: dict[tuple[str, str, str, str], StreamKey] = {}

    def encode(self, batch: Sequence[Record]) -> EncodedBatch:
        # Markers, books and unclosed klines are left to the writer as records.
        groups, rest = layout.group_by_file(batch, self._span, _place)
        table: dict[tuple[str, str, str, str], int] = {}
        streams: list[StreamKey] = []
        chunks: list[Chunk] = []
        last_key: list[int] = []  # per stream index: the last key chunked so far
        refused: set[int] = set()
        for (kind, exchange, market, symbol, interval, period), records in groups.items():
            name = kline_stream(interval) if kind == layout.KLINE else kind
            fast = (exchange, market, symbol, name)
            index = table.get(fast)
            if index is None:
                index = table[fast] = len(streams)
                key = self._keys.get(fast)
                if key is None:
                    key = self._keys[fast] = StreamKey(*fast)
                streams.append(key)
                last_key.append(-1)
            elif index in refused:
                continue
            chunk = _chunk(kind, market, index, period, records)
            if chunk is None or chunk.keys[0] <= last_key[index]:
                refused.add(index)
                continue
            last_key[index] = chunk.keys[-1]
            chunks.append(chunk)
        if refused:
            # The sink's record path handles these streams as it always did.
            chunks = [c for c in chunks if c.stream not in refused]
            gone = {streams[i] for i in refused}
            rest = [r for r in batch if not _chunkable(r) or _stream_of(r) in gone]
        return EncodedBatch(streams, chunks, rest)


def _chunkable(r: Record) -> bool:
    cls = r.__class__
    return cls is Trade or cls is DepthUpdate or (cls is Kline and r.closed)  # type: ignore[union-attr]


def _stream_of(r: Record) -> StreamKey:
    cls = r.__class__
    if cls is Trade:
        name = layout.AGGTRADE
    elif cls is DepthUpdate:
        name = layout.DEPTH
    else:
        name = kline_stream(r.interval)  # type: ignore[union-attr]
    return StreamKey(r.exchange, r.market, r.symbol, name)


def _chunk(kind: str, market: str, index: int, period: int, records: list) -> Chunk | None:
    """The chunk of one file's records, or ``None`` when its rows need quoting or its keys
    do not increase (the sink's record path then deals with them)."""
    row_ends: list[int] = []
    if kind == layout.AGGTRADE:
        lines = layout.trade_rows(records, market == "spot")
        keys = list(map(_TRADE_ID, records))
        times = list(map(_TRANSACT, records))
        event_time = max(map(_EVENT, records))
        commas = _COMMAS_SPOT if market == "spot" else _COMMAS_FUTURES
    elif kind == layout.DEPTH:
        lines = layout.depth_parts(records)
        row_ends = list(accumulate([len(r.bids) + len(r.asks) or 1 for r in records]))
        keys = list(map(_UPDATE_ID, records))
        times = list(map(_EVENT, records))
        event_time = max(times)
        commas = _COMMAS_DEPTH
    else:
        lines = layout.kline_rows(records)
        keys = list(map(_OPEN_TIME, records))
        times = keys
        event_time = max(map(_EVENT, records))
        commas = _COMMAS_KLINE
    if not _increasing(keys):
        return None
    rows = row_ends[-1] if row_ends else len(records)
    text = "".join(lines)
    # An exchange string holding a separator would shift columns (same check as the sink).
    if text.count("\n") != rows or text.count(",") != rows * commas:
        return None
    # Where each record's rows end, in bytes (a str's length is its size when ASCII).
    sizes = map(len, lines) if text.isascii() else [len(x.encode()) for x in lines]
    offsets = list(accumulate(sizes))
    return Chunk(index, period, keys, times, offsets, rows, row_ends, event_time, text.encode())


def _place(r: Record) -> tuple[str, int, str] | None:
    """``(kind, time, interval)`` of what the encoder turns into rows, else ``None``."""
    cls = r.__class__
    if cls is DepthUpdate:
        return layout.DEPTH, r.event_time, ""
    if cls is Kline and r.closed:
        return layout.KLINE, r.open_time, r.interval
    return None
