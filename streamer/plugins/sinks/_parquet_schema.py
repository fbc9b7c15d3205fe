"""Arrow schemas of the parquet sink and the builders that turn records into record batches
(private to :mod:`.parquet_sink`; imports pyarrow).

Columns are the CSV sink's (:mod:`._sink_layout`), in the same order, plus ``timestamp``: the
record's exchange time (the time that places it in a day, :func:`streamer.record_time`) as
a UTC timestamp in microseconds. Ids and times are int64; prices and quantities are
``decimal128(38, scale)`` (exact: Binance sends at most 8 decimals) or float64 with
``price_type: float``. Order books are one row per snapshot with four list columns,
``bid_price``, ``bid_qty``, ``ask_price``, ``ask_qty`` (best first), instead of the CSV's
``bid_price_0 ...`` columns: any depth fits, and pyarrow, polars and DuckDB all read lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from streamer import BookSnapshot, DepthUpdate, Kline, Marker, Trade

from . import _sink_layout as layout

#: The extra column: the record's exchange time as a UTC timestamp.
TIMESTAMP = "timestamp"
BOOK_LIST_COLUMNS = ("bid_price", "bid_qty", "ask_price", "ask_qty")
#: Column holding the resume key of each kind.
KEY_NAME = {
    layout.AGGTRADE: "agg_trade_id",
    layout.KLINE: "open_time",
    layout.DEPTH: "last_update_id",
    layout.ORDERBOOK: "last_update_id",
}
_TS = pa.timestamp("us", tz="UTC")
_I64 = pa.int64()
_STR = pa.string()
_MICROS = 100_000_000_000_000  # times at or above this are microseconds already


class Unrepresentable(ValueError):
    """A price or quantity that the column type cannot hold exactly."""


class Types:
    """The Arrow types of one sink configuration and the schema of each kind."""

    def __init__(self, price_type: str, scale: int) -> None:
        self.number = pa.float64() if price_type == "float" else pa.decimal128(38, scale)
        self.exact = price_type != "float"
        self._schemas: dict[tuple[str, str], pa.Schema] = {}

    def schema(self, kind: str, market: str) -> pa.Schema:
        key = (kind, market if kind == layout.AGGTRADE else "")
        found = self._schemas.get(key)
        if found is None:
            found = self._schemas[key] = pa.schema(self._fields(kind, market))
        return found

    def _fields(self, kind: str, market: str) -> list[pa.Field]:
        num = self.number
        if kind == layout.AGGTRADE:
            cols = layout.aggtrade_columns(market)
            types = {"price": num, "quantity": num, "is_buyer_maker": pa.bool_(),
                     "is_best_match": pa.bool_()}  # fmt: skip
        elif kind == layout.KLINE:
            cols = layout.KLINE_COLUMNS
            types = {c: num for c in ("open", "high", "low", "close", "volume", "quote_volume",
                                      "taker_buy_volume", "taker_buy_quote_volume")}  # fmt: skip
        elif kind == layout.DEPTH:
            cols = layout.DEPTH_COLUMNS
            types = {"side": _STR, "price": num, "quantity": num}
        elif kind == layout.ORDERBOOK:
            cols = (*layout.BOOK_PREFIX_COLUMNS, *BOOK_LIST_COLUMNS)
            types = {c: pa.list_(num) for c in BOOK_LIST_COLUMNS}
        else:
            cols = layout.MARKER_COLUMNS
            types = {"stream": _STR, "kind": _STR, "reason": _STR}
        return [pa.field(c, types.get(c, _I64)) for c in cols] + [pa.field(TIMESTAMP, _TS)]

    # --- builders: records in, one RecordBatch out ---------------------------------------

    def numbers(self, values: list) -> pa.Array:
        """Exact strings to the number type; raises :class:`Unrepresentable`."""
        try:
            return pa.array(values, _STR).cast(self.number)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise Unrepresentable(str(exc)) from None

    def batch(
        self, kind: str, market: str, records: Sequence, levels: int | None
    ) -> pa.RecordBatch:
        """The rows of ``records`` (all of ``kind``); ``levels`` caps book sides."""
        schema = self.schema(kind, market)
        if kind == layout.AGGTRADE:
            arrays = self._trades(records, market == "spot")
        elif kind == layout.KLINE:
            arrays = self._klines(records)
        elif kind == layout.DEPTH:
            arrays = self._depth(records)
        elif kind == layout.ORDERBOOK:
            arrays = self._books(records, levels)
        else:
            arrays = self._markers(records)
        return pa.record_batch(arrays, schema=schema)

    def _trades(self, rs: Sequence[Trade], spot: bool) -> list:
        num = self.numbers
        cols = [
            pa.array([r.trade_id for r in rs], _I64),
            num([r.price for r in rs]),
            num([r.quantity for r in rs]),
            pa.array([r.first_trade_id for r in rs], _I64),
            pa.array([r.last_trade_id for r in rs], _I64),
            tt := pa.array([r.transact_time for r in rs], _I64),
            pa.array([r.is_buyer_maker for r in rs], pa.bool_()),
        ]
        if spot:
            cols.append(pa.array([r.is_best_match for r in rs], pa.bool_()))
        cols += [
            pa.array([r.event_time for r in rs], _I64),
            pa.array([r.receive_time for r in rs], _I64),
            timestamps(tt),
        ]
        return cols

    def _klines(self, rs: Sequence[Kline]) -> list:
        num = self.numbers
        ot = pa.array([r.open_time for r in rs], _I64)
        return [
            ot,
            num([r.open for r in rs]),
            num([r.high for r in rs]),
            num([r.low for r in rs]),
            num([r.close for r in rs]),
            num([r.volume for r in rs]),
            pa.array([r.close_time for r in rs], _I64),
            num([r.quote_volume for r in rs]),
            pa.array([r.count for r in rs], _I64),
            num([r.taker_buy_volume for r in rs]),
            num([r.taker_buy_quote_volume for r in rs]),
            pa.array([r.event_time for r in rs], _I64),
            pa.array([r.receive_time for r in rs], _I64),
            timestamps(ot),
        ]

    def _depth(self, rs: Sequence[DepthUpdate]) -> list:
        # Per-event values are repeated over the event's rows with one ``take``.
        index: list[int] = []
        sides: list = []
        prices: list = []
        qtys: list = []
        for i, r in enumerate(rs):
            b, a = r.bids, r.asks
            n = len(b) + len(a)
            if not n:
                index.append(i)
                sides.append(None)
                prices.append(None)
                qtys.append(None)
                continue
            index += [i] * n
            if b:
                sides += ["b"] * len(b)
                prices += [p for p, _ in b]
                qtys += [q for _, q in b]
            if a:
                sides += ["a"] * len(a)
                prices += [p for p, _ in a]
                qtys += [q for _, q in a]
        take = pa.array(index, pa.int32())
        et = pa.array([r.event_time for r in rs], _I64).take(take)
        return [
            et,
            pa.array([r.transact_time for r in rs], _I64).take(take),
            pa.array([r.first_update_id for r in rs], _I64).take(take),
            pa.array([r.last_update_id for r in rs], _I64).take(take),
            pa.array([r.prev_update_id for r in rs], _I64).take(take),
            pa.array(sides, _STR),
            self.numbers(prices),
            self.numbers(qtys),
            pa.array([r.receive_time for r in rs], _I64).take(take),
            timestamps(et),
        ]

    def _books(self, rs: Sequence[BookSnapshot], levels: int | None) -> list:
        out = []
        for side in ("bids", "asks"):
            lists = [getattr(r, side) for r in rs]
            if levels is not None:
                lists = [x[:levels] for x in lists]
            offsets = [0]
            total = 0
            for x in lists:
                total += len(x)
                offsets.append(total)
            off = pa.array(offsets, pa.int32())
            prices = self.numbers([p for x in lists for p, _ in x])
            qtys = self.numbers([q for x in lists for _, q in x])
            out.append(pa.ListArray.from_arrays(off, prices, type=pa.list_(self.number)))
            out.append(pa.ListArray.from_arrays(off, qtys, type=pa.list_(self.number)))
        et = [r.event_time or r.receive_time for r in rs]
        return [
            pa.array([r.last_update_id for r in rs], _I64),
            pa.array([r.event_time for r in rs], _I64),
            pa.array([r.receive_time for r in rs], _I64),
            *out,
            timestamps(pa.array(et, _I64)),
        ]

    def _markers(self, rs: Sequence[Marker]) -> list:
        t = pa.array([r.time for r in rs], _I64)
        return [
            t,
            pa.array([r.stream for r in rs], _STR),
            pa.array([r.kind for r in rs], _STR),
            pa.array([r.first_key for r in rs], _I64),
            pa.array([r.last_key for r in rs], _I64),
            pa.array([r.reason for r in rs], _STR),
            timestamps(t),
        ]


def timestamps(times: pa.Array) -> pa.Array:
    """Exchange times (ms, or us on spot with ``timeUnit=MICROSECOND``) as UTC timestamps."""
    us = pc.if_else(pc.less(times, _MICROS), pc.multiply(times, 1000), times)
    return us.cast(_TS)


def rows_of(kind: str, records: Sequence) -> int:
    """Rows ``records`` become (depth: one per level change)."""
    if kind == layout.DEPTH:
        return sum(layout.depth_rows(r) for r in records)
    return len(records)
