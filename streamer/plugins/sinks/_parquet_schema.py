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
from itertools import accumulate, chain

import pyarrow as pa
import pyarrow.compute as pc
from msgspec.structs import astuple

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


def _at(cls: type, *names: str) -> tuple[int, ...]:
    """Positions of fields in ``astuple`` of a record type."""
    return tuple(cls.__struct_fields__.index(n) for n in names)


_K_NUMBERS = ("open", "high", "low", "close", "volume", "quote_volume", "taker_buy_volume",
              "taker_buy_quote_volume")  # fmt: skip
_D_EVENT, _D_TRANSACT, _D_FIRST, _D_LAST, _D_PREV, _D_RECEIVE = _at(
    DepthUpdate, "event_time", "transact_time", "first_update_id", "last_update_id",
    "prev_update_id", "receive_time",
)  # fmt: skip
#: The ``side`` of a depth row by its parity in :meth:`Types._depth`.
_SIDES = pa.array(["b", "a"], _STR)
#: The one row of nulls of a depth event without levels.
_NO_LEVEL = ((None, None),)


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

    def numbers(self, values: Sequence) -> pa.Array:
        """Exact strings to the number type, in one vectorised cast that refuses any value
        it cannot hold exactly (``safe``: no rounding); raises :class:`Unrepresentable`."""
        try:
            return pa.array(values, _STR).cast(self.number)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise Unrepresentable(str(exc)) from None

    def number_columns(self, *columns: Sequence) -> list[pa.Array]:
        """:meth:`numbers` of several equally long columns with one conversion."""
        n = len(columns[0])
        joined: list = []
        for c in columns:
            joined += c
        values = self.numbers(joined)
        return [values.slice(i * n, n) for i in range(len(columns))]

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

    # Each builder converts every price and quantity of a batch with one cast (a cast per
    # call costs microseconds: live flushes are small) and keeps per-value Python work to
    # one comprehension per column (depth: flat lists, no per-row loop).

    def _trades(self, rs: Sequence[Trade], spot: bool) -> list:
        price, qty = self.number_columns([r.price for r in rs], [r.quantity for r in rs])
        tt = pa.array([r.transact_time for r in rs], _I64)
        cols = [
            pa.array([r.trade_id for r in rs], _I64),
            price,
            qty,
            pa.array([r.first_trade_id for r in rs], _I64),
            pa.array([r.last_trade_id for r in rs], _I64),
            tt,
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
        o, h, lo, cl, v, qv, tbv, tbqv = self.number_columns(
            *([getattr(r, name) for r in rs] for name in _K_NUMBERS)
        )
        ot = pa.array([r.open_time for r in rs], _I64)
        return [
            ot,
            o,
            h,
            lo,
            cl,
            v,
            pa.array([r.close_time for r in rs], _I64),
            qv,
            pa.array([r.count for r in rs], _I64),
            tbv,
            tbqv,
            pa.array([r.event_time for r in rs], _I64),
            pa.array([r.receive_time for r in rs], _I64),
            timestamps(ot),
        ]

    def _depth(self, rs: Sequence[DepthUpdate]) -> list:
        # The levels of every event, bids then asks, as one flat list; ``parts`` holds
        # each event's bids and asks in turn, so the parent index of a row in the list
        # array built from their lengths is 2 * event (a bid) or 2 * event + 1 (an ask).
        # An event without levels gets one row of nulls (the CSV's empty side/price/qty).
        parts = [x for r in rs for x in (r.bids, r.asks if r.asks or r.bids else _NO_LEVEL)]
        flat = list(chain.from_iterable(parts))
        offsets = pa.array([0, *accumulate(map(len, parts))], pa.int32())
        parent = pc.list_parent_indices(pa.ListArray.from_arrays(offsets, pa.nulls(len(flat))))
        event = pc.shift_right(parent, 1)
        side = _SIDES.take(pc.bit_wise_and(parent, 1))
        prices, qtys = self.number_columns([p for p, _ in flat], [q for _, q in flat])
        if prices.null_count:
            side = pc.if_else(pc.is_null(prices), pa.scalar(None, _STR), side)
        c = list(zip(*map(astuple, rs), strict=True))
        et = pa.array(c[_D_EVENT], _I64).take(event)
        return [
            et,
            pa.array(c[_D_TRANSACT], _I64).take(event),
            pa.array(c[_D_FIRST], _I64).take(event),
            pa.array(c[_D_LAST], _I64).take(event),
            pa.array(c[_D_PREV], _I64).take(event),
            side,
            prices,
            qtys,
            pa.array(c[_D_RECEIVE], _I64).take(event),
            timestamps(et),
        ]

    def _books(self, rs: Sequence[BookSnapshot], levels: int | None) -> list:
        # Every price and quantity of the batch in one list and one cast; each list column
        # is a slice of it under offsets from the side lengths.
        bids = [r.bids for r in rs]
        asks = [r.asks for r in rs]
        if levels is not None:
            bids = [x[:levels] for x in bids]
            asks = [x[:levels] for x in asks]
        flat = list(chain.from_iterable(bids))
        nb = len(flat)
        flat += chain.from_iterable(asks)
        na = len(flat) - nb
        values = self.numbers([p for p, _ in flat] + [q for _, q in flat])
        total = nb + na
        bp = values.slice(0, nb)
        ap = values.slice(nb, na)
        bq = values.slice(total, nb)
        aq = values.slice(total + nb, na)
        list_type = pa.list_(self.number)
        boff = pa.array([0, *accumulate(map(len, bids))], pa.int32())
        aoff = pa.array([0, *accumulate(map(len, asks))], pa.int32())
        et = [r.event_time or r.receive_time for r in rs]
        return [
            pa.array([r.last_update_id for r in rs], _I64),
            pa.array([r.event_time for r in rs], _I64),
            pa.array([r.receive_time for r in rs], _I64),
            pa.ListArray.from_arrays(boff, bp, type=list_type),
            pa.ListArray.from_arrays(boff, bq, type=list_type),
            pa.ListArray.from_arrays(aoff, ap, type=list_type),
            pa.ListArray.from_arrays(aoff, aq, type=list_type),
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
