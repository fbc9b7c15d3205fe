"""Normalised market-data records shared by every plugin.

Every record is an array-like msgspec Struct tagged with a short name so that a
batch of mixed records round-trips through MessagePack without pickling. Prices and
quantities are the exact strings the exchange sent: never parse them into floats or
Decimals for output. Times are integers in the exchange's unit (Binance: milliseconds),
``receive_time`` is local wall-clock time in milliseconds since the epoch.

Records carry their ``exchange``, ``market`` and ``symbol`` so that a sink can route them
without extra context.

The record vocabulary is defined here, once, for every component: the output stream a
record belongs to (:func:`stream_name`, :func:`stream_key`; ``aggtrade``, ``depth``,
``kline_<interval>``, ``orderbook``), its increasing resume key within that stream
(:func:`record_key`) and the time that places it in a period (:func:`record_time`).
"""

from __future__ import annotations

from typing import Literal

import msgspec

#: One price level: ``(price, quantity)`` as the exact strings sent by the exchange.
Level = tuple[str, str]

_STRUCT = {"array_like": True, "omit_defaults": False, "tag_field": "k"}


class Trade(msgspec.Struct, tag="trade", **_STRUCT):
    """An aggregated trade (Binance ``aggTrade``), keyed by ``trade_id``.

    ``trade_id`` is consecutive per symbol on Binance, which is what gap detection uses.
    ``is_best_match`` is ``None`` where the exchange does not send it (USD-M futures).
    """

    exchange: str
    market: str
    symbol: str
    trade_id: int
    price: str
    quantity: str
    first_trade_id: int
    last_trade_id: int
    transact_time: int
    is_buyer_maker: bool
    is_best_match: bool | None
    event_time: int
    receive_time: int


class DepthUpdate(msgspec.Struct, tag="depth", **_STRUCT):
    """A diff-depth event: absolute quantities for changed levels (``"0"`` removes).

    ``first_update_id``/``last_update_id`` are Binance's ``U``/``u``; ``prev_update_id``
    is ``pu`` on futures and ``None`` on spot. ``transact_time`` is ``T`` (futures only).
    """

    exchange: str
    market: str
    symbol: str
    event_time: int
    transact_time: int | None
    first_update_id: int
    last_update_id: int
    prev_update_id: int | None
    bids: list[Level]
    asks: list[Level]
    receive_time: int


class Kline(msgspec.Struct, tag="kline", **_STRUCT):
    """A candlestick, keyed by ``(symbol, interval, open_time)``.

    ``closed`` is true only on the final update of the bar (Binance ``k.x``). Records from
    REST backfill are closed and carry ``event_time`` equal to ``close_time``.
    """

    exchange: str
    market: str
    symbol: str
    interval: str
    open_time: int
    close_time: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    quote_volume: str
    count: int
    taker_buy_volume: str
    taker_buy_quote_volume: str
    closed: bool
    event_time: int
    receive_time: int


class BookSnapshot(msgspec.Struct, tag="book", **_STRUCT):
    """An order book (or its top N levels) as of update id ``last_update_id``.

    ``bids`` are best (highest) first, ``asks`` best (lowest) first. Used both for REST
    snapshots fetched by an exchange adapter and for the ``orderbook`` stream's output.
    ``event_time`` is the exchange time of the last applied event (0 when unknown).
    """

    exchange: str
    market: str
    symbol: str
    last_update_id: int
    event_time: int
    receive_time: int
    bids: list[Level]
    asks: list[Level]


MarkerKind = Literal["gap", "filled", "unfillable", "resync", "overflow", "verify_mismatch"]


class Marker(msgspec.Struct, tag="marker", **_STRUCT):
    """A gap or resync marker: something a reader of the data must know about.

    ``stream`` names the stream type (``aggtrade``, ``kline_1m``, ``orderbook``...);
    ``first_key``/``last_key`` bound the affected range in that stream's key (aggTrade
    ids, kline open times, update ids), inclusive, 0 where unknown. ``reason`` is a short
    human-readable cause (``"reconnect"``, ``"sequence break"``, ``"disk full"``...).
    """

    exchange: str
    market: str
    symbol: str
    stream: str
    kind: MarkerKind
    first_key: int
    last_key: int
    time: int
    reason: str


Record = Trade | DepthUpdate | Kline | BookSnapshot | Marker
"""Any record that can travel from a collector worker to a sink."""


# --- the record vocabulary: stream names, resume keys, times -------------------------------

#: Output stream names of trades, depth updates and order books.
AGGTRADE_STREAM, DEPTH_STREAM, ORDERBOOK_STREAM = "aggtrade", "depth", "orderbook"
#: Klines of interval ``1m`` go to stream ``kline_1m``, and so on (see :func:`kline_stream`).
KLINE_STREAM_PREFIX = "kline_"


def kline_stream(interval: str) -> str:
    """The output stream name of klines of ``interval``: ``kline_1m``, ``kline_1h``..."""
    return KLINE_STREAM_PREFIX + interval


class StreamKey(msgspec.Struct, frozen=True, order=True):
    """Identifies one output stream of one symbol, e.g. ``(binance, spot, BTCUSDT, kline_1m)``.

    Sinks report their holdings by this key so the collector can resume after a restart.
    """

    exchange: str
    market: str
    symbol: str
    stream: str


def stream_name(record: Record) -> str:
    """The output stream name of ``record``: ``aggtrade`` (:class:`Trade`), ``depth``
    (:class:`DepthUpdate`), ``kline_<interval>`` (:class:`Kline`), ``orderbook``
    (:class:`BookSnapshot`), or the stream a :class:`Marker` is about."""
    kind = type(record)
    if kind is Trade:
        return AGGTRADE_STREAM
    if kind is DepthUpdate:
        return DEPTH_STREAM
    if kind is Kline:
        return KLINE_STREAM_PREFIX + record.interval  # type: ignore[union-attr]
    if kind is BookSnapshot:
        return ORDERBOOK_STREAM
    return record.stream  # type: ignore[union-attr]  # Marker


def stream_key(record: Record) -> StreamKey:
    """The :class:`StreamKey` ``record`` belongs to."""
    return StreamKey(record.exchange, record.market, record.symbol, stream_name(record))


def record_key(record: Record) -> int | None:
    """The increasing key of ``record`` within its stream, by which a sink reports what it
    holds and the collector resumes: ``trade_id`` of a trade, ``open_time`` of a kline,
    ``last_update_id`` of a depth update or book; ``None`` for a marker.

    Only closed klines count as held: an open bar is updated again until it closes.
    """
    kind = type(record)
    if kind is Trade:
        return record.trade_id  # type: ignore[union-attr]
    if kind is Kline:
        return record.open_time  # type: ignore[union-attr]
    if kind is DepthUpdate or kind is BookSnapshot:
        return record.last_update_id  # type: ignore[union-attr]
    return None


def record_time(record: Record) -> int:
    """The exchange time of ``record`` (ms on Binance) that places it in a day or hour:
    ``transact_time`` of a trade, ``open_time`` of a kline, ``event_time`` of a depth update,
    ``event_time`` (else ``receive_time``) of a book, ``time`` of a marker (0: unknown)."""
    kind = type(record)
    if kind is Trade:
        return record.transact_time  # type: ignore[union-attr]
    if kind is Kline:
        return record.open_time  # type: ignore[union-attr]
    if kind is DepthUpdate:
        return record.event_time  # type: ignore[union-attr]
    if kind is BookSnapshot:
        return record.event_time or record.receive_time  # type: ignore[union-attr]
    return record.time  # type: ignore[union-attr]  # Marker


RECORD_TYPES: tuple[type[msgspec.Struct], ...] = (Trade, DepthUpdate, Kline, BookSnapshot, Marker)

# --- ready bytes: what a sink's worker-side encoder makes of a batch ----------------------


class Chunk(msgspec.Struct, array_like=True, omit_defaults=False):
    """Ready bytes for one output unit of one stream, made in the worker by a sink's
    :class:`~streamer.core.api.SinkEncoder` and appended as they are by the sink's writer.

    ``stream`` indexes :attr:`EncodedBatch.streams`; ``unit`` is the sink's own name for the
    output unit (the CSV sink: the rotation period number, which with the stream names the
    file). Per record, in order: ``keys`` (its :func:`record_key`, strictly increasing),
    ``times`` (its :func:`record_time`) and ``offsets`` (where its rows end in ``data``), so
    a prefix already held can be cut at a record boundary (:meth:`tail`) and a suffix that
    does not fit kept back (:meth:`head`). ``rows`` is the number of rows in ``data``;
    ``row_ends`` the rows up to and including each record, or empty when every record is one
    row. ``event_time`` is the newest exchange event time among the records (0: none).
    ``data`` is whole rows only: a reader never sees half a record.
    """

    stream: int
    unit: int | str
    keys: list[int]
    times: list[int]
    offsets: list[int]
    rows: int
    row_ends: list[int]
    event_time: int
    data: bytes

    def rows_before(self, index: int) -> int:
        """Rows of the records before ``index``."""
        if index <= 0:
            return 0
        return self.row_ends[index - 1] if self.row_ends else index

    def tail(self, index: int) -> Chunk:
        """The records from ``index`` on (``0 < index < len(keys)``)."""
        cut = self.offsets[index - 1]
        before = self.rows_before(index)
        return Chunk(
            self.stream,
            self.unit,
            self.keys[index:],
            self.times[index:],
            [o - cut for o in self.offsets[index:]],
            self.rows - before,
            [r - before for r in self.row_ends[index:]],
            self.event_time,
            self.data[cut:],
        )

    def head(self, count: int) -> Chunk:
        """The first ``count`` records (``0 < count < len(keys)``)."""
        end = self.offsets[count - 1]
        return Chunk(
            self.stream,
            self.unit,
            self.keys[:count],
            self.times[:count],
            self.offsets[:count],
            self.rows_before(count),
            self.row_ends[:count],
            self.event_time,
            self.data[:end],
        )


class EncodedBatch(msgspec.Struct, array_like=True, omit_defaults=False):
    """What a :class:`~streamer.core.api.SinkEncoder` makes of one batch of records.

    ``streams`` is the batch's stream table (each :class:`Chunk` names its stream by index),
    ``chunks`` the ready bytes, ``records`` what the encoder leaves to the sink's
    :meth:`~streamer.core.api.Sink.write` (markers, order-book snapshots, unclosed klines,
    anything it prefers not to encode). The writer applies ``records`` before ``chunks``.
    """

    streams: list[StreamKey]
    chunks: list[Chunk]
    records: list[Record]


_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(list[Record])
_encoded_decoder = msgspec.msgpack.Decoder(EncodedBatch)

#: First byte of a frame holding an :class:`EncodedBatch` (0xC1 is never used by
#: MessagePack, so it can never start an :func:`encode_batch` payload).
ENCODED_TAG = 0xC1


def encode_batch(records: list[Record]) -> bytes:
    """Encode a batch of records as MessagePack bytes for crossing a process boundary."""
    return _encoder.encode(records)


def decode_batch(data: bytes) -> list[Record]:
    """Decode bytes made by :func:`encode_batch`; raises ``msgspec.DecodeError`` if corrupt."""
    return _batch_decoder.decode(data)


def encode_encoded(batch: EncodedBatch) -> bytearray:
    """Encode ``batch`` for crossing a process boundary: :data:`ENCODED_TAG` then
    MessagePack (one buffer, no copy of the chunks' bytes beyond the encoding itself)."""
    out = bytearray(1)
    out[0] = ENCODED_TAG
    _encoder.encode_into(batch, out, 1)
    return out


def is_encoded(payload: bytes | bytearray | memoryview) -> bool:
    """True when ``payload`` was made by :func:`encode_encoded` (else by :func:`encode_batch`)."""
    return len(payload) > 0 and payload[0] == ENCODED_TAG


def decode_encoded(payload: bytes | bytearray | memoryview) -> EncodedBatch:
    """Decode bytes made by :func:`encode_encoded`; raises ``msgspec.DecodeError`` if corrupt."""
    if not is_encoded(payload):
        raise msgspec.DecodeError("not an encoded batch")
    return _encoded_decoder.decode(memoryview(payload)[1:])
