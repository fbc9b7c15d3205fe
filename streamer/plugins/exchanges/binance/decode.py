"""Typed msgspec decoders for Binance WebSocket frames and REST responses.

The hot path is :meth:`FrameDecoder.decode`: one combined-stream frame in, one normalised
record out. The envelope is decoded with ``data`` left as :class:`msgspec.Raw`, and the
payload decoder is chosen from the stream name (cached per stream), never from ``e``:
USD-M partial-depth snapshots carry ``e: "depthUpdate"`` exactly like diffs.

Prices and quantities stay the exact strings Binance sent. Times are normalised to ms:
a spot connection opened with ``timeUnit=MICROSECOND`` sends µs (>= 1e15), which is
divided down so one column never mixes units.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from streamer import BookSnapshot, DepthUpdate, Kline, Level, Record, Trade

EXCHANGE: Final = "binance"
_US_THRESHOLD: Final = 10**15  # a ms epoch stays below this until the year 33658


class FrameError(ValueError):
    """A frame that cannot be turned into a record or a known non-data event.

    ``kind`` is a short stable key for counters and rate-limited logs: ``"json"``
    (not JSON), ``"schema"`` (JSON of the wrong shape), ``"unknown_stream"`` (a stream
    name this decoder does not know), ``"unknown_event"`` (a raw event type it does not
    know).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


# --------------------------------------------------------------------------- WS payloads


class AggTradeEvent(msgspec.Struct):
    """``<symbol>@aggTrade``. Spot sends ``M``; USD-M omits it and may add ``nq``."""

    E: int
    s: str
    a: int
    p: str
    q: str
    f: int
    l: int  # noqa: E741 - Binance's field name
    T: int
    m: bool
    M: bool | None = None
    nq: str | None = None
    e: str = "aggTrade"


class DepthEvent(msgspec.Struct):
    """``depthUpdate``: spot diff, or USD-M diff/partial (with ``T`` and ``pu``)."""

    E: int
    s: str
    U: int
    u: int
    b: list[Level]
    a: list[Level]
    T: int | None = None
    pu: int | None = None
    e: str = "depthUpdate"


class SpotPartialDepth(msgspec.Struct):
    """Spot ``<symbol>@depth<N>``: a snapshot with no symbol, event type or time."""

    lastUpdateId: int
    bids: list[Level]
    asks: list[Level]


class KlineBody(msgspec.Struct):
    """The ``k`` object of a kline event."""

    t: int
    T: int
    s: str
    i: str
    f: int
    L: int
    o: str
    c: str
    h: str
    l: str  # noqa: E741 - Binance's field name
    v: str
    n: int
    x: bool
    q: str
    V: str
    Q: str
    B: str | None = None


class KlineEvent(msgspec.Struct):
    """``<symbol>@kline_<interval>``."""

    E: int
    s: str
    k: KlineBody
    e: str = "kline"


class BookTickerEvent(msgspec.Struct):
    """``<symbol>@bookTicker``: spot has no ``e``/``E``; USD-M adds ``e``, ``E`` and ``T``."""

    u: int
    s: str
    b: str
    B: str
    a: str
    A: str
    e: str | None = None
    E: int | None = None
    T: int | None = None


class TradeEvent(msgspec.Struct):
    """Spot ``<symbol>@trade`` (no ``b``/``a`` since 2024-06-18); not collected."""

    E: int
    s: str
    t: int
    p: str
    q: str
    T: int
    m: bool
    M: bool | None = None
    e: str = "trade"


class ServerShutdown(msgspec.Struct):
    """``serverShutdown``: the server will drop this connection; replace it now."""

    E: int = 0
    e: str = "serverShutdown"


class ControlResponse(msgspec.Struct):
    """Answer to a SUBSCRIBE/UNSUBSCRIBE/LIST/... request; ``result`` None is success."""

    id: Any
    result: Any


class ControlError(msgspec.Struct):
    """Error answer to a control request, ``{"code":..,"msg":..,"id":..}``."""

    code: int
    msg: str
    id: Any = None


NonDataEvent = ServerShutdown | ControlResponse | ControlError | BookTickerEvent | TradeEvent
"""What :meth:`FrameDecoder.decode` exposes in ``FrameDecoder.event`` when it returns None."""


_NO_DATA: Final = msgspec.Raw()


class _Frame(msgspec.Struct):
    # Every top-level shape Binance sends on a connection: a combined envelope, a control
    # answer, or a raw event (``e``). Unknown keys are skipped by msgspec.
    stream: str | None = None
    data: msgspec.Raw = _NO_DATA
    id: Any = None
    result: Any = msgspec.UNSET
    code: int | None = None
    msg: str | None = None
    e: str | None = None


# --------------------------------------------------------------------------- REST payloads


class RestAggTrade(msgspec.Struct):
    """One row of ``GET aggTrades`` (``M`` is spot only)."""

    a: int
    p: str
    q: str
    f: int
    l: int  # noqa: E741 - Binance's field name
    T: int
    m: bool
    M: bool | None = None


class RestDepth(msgspec.Struct):
    """``GET depth``; ``E``/``T`` are USD-M only."""

    lastUpdateId: int
    bids: list[Level]
    asks: list[Level]
    E: int | None = None
    T: int | None = None


#: ``GET klines`` row: open time, o, h, l, c, volume, close time, quote volume, trades,
#: taker buy base, taker buy quote, ignore (its type varies, so it is not checked).
RestKlineRow = tuple[int, str, str, str, str, str, int, str, int, str, str, Any]


class RateLimit(msgspec.Struct):
    """One ``exchangeInfo.rateLimits`` entry."""

    rateLimitType: str
    interval: str
    intervalNum: int
    limit: int


class SymbolEntry(msgspec.Struct):
    """The fields of an ``exchangeInfo.symbols`` entry the collector uses."""

    symbol: str
    status: str = ""
    baseAsset: str = ""
    quoteAsset: str = ""
    contractStatus: str | None = None  # COIN-M's name for status


class ExchangeInfo(msgspec.Struct):
    """``GET exchangeInfo`` reduced to rate limits and symbols."""

    symbols: list[SymbolEntry]
    rateLimits: list[RateLimit] = msgspec.field(default_factory=list)

    def request_weight_per_minute(self) -> int | None:
        """The REQUEST_WEIGHT limit per minute, when the exchange states one."""
        for limit in self.rateLimits:
            if limit.rateLimitType == "REQUEST_WEIGHT":
                seconds = {"SECOND": 1, "MINUTE": 60, "HOUR": 3600, "DAY": 86400}.get(
                    limit.interval, 60
                ) * max(limit.intervalNum, 1)
                return int(limit.limit * 60 / seconds)
        return None


class RestError(msgspec.Struct):
    """Binance's REST error body ``{"code":-1121,"msg":"Invalid symbol."}``."""

    code: int
    msg: str


_json = msgspec.json
_frame_decoder = _json.Decoder(_Frame)
_agg_decoder = _json.Decoder(AggTradeEvent)
_depth_decoder = _json.Decoder(DepthEvent)
_spot_partial_decoder = _json.Decoder(SpotPartialDepth)
_kline_decoder = _json.Decoder(KlineEvent)
_book_ticker_decoder = _json.Decoder(BookTickerEvent)
_trade_decoder = _json.Decoder(TradeEvent)
_shutdown_decoder = _json.Decoder(ServerShutdown)
_rest_aggs_decoder = _json.Decoder(list[RestAggTrade])
_rest_depth_decoder = _json.Decoder(RestDepth)
_rest_klines_decoder = _json.Decoder(list[RestKlineRow])
_exchange_info_decoder = _json.Decoder(ExchangeInfo)
_rest_error_decoder = _json.Decoder(RestError)


def _ms(value: int) -> int:
    return value // 1000 if value >= _US_THRESHOLD else value


# --------------------------------------------------------------------------- conversions


def trade_from_event(ev: AggTradeEvent, market: str, receive_time: int) -> Trade:
    """A :class:`Trade` record from a WebSocket aggTrade event."""
    event_time = ev.E
    transact_time = ev.T
    if event_time >= _US_THRESHOLD:
        event_time //= 1000
        transact_time //= 1000
    return Trade(
        EXCHANGE,
        market,
        ev.s,
        ev.a,
        ev.p,
        ev.q,
        ev.f,
        ev.l,
        transact_time,
        ev.m,
        ev.M,
        event_time,
        receive_time,
    )


def depth_from_event(ev: DepthEvent, market: str, receive_time: int) -> DepthUpdate:
    """A :class:`DepthUpdate` record from a diff-depth event."""
    return DepthUpdate(
        EXCHANGE,
        market,
        ev.s,
        _ms(ev.E),
        None if ev.T is None else _ms(ev.T),
        ev.U,
        ev.u,
        ev.pu,
        ev.b,
        ev.a,
        receive_time,
    )


def kline_from_event(ev: KlineEvent, market: str, receive_time: int) -> Kline:
    """A :class:`Kline` record from a WebSocket kline event (closed or not)."""
    k = ev.k
    open_time, close_time, event_time = k.t, k.T, ev.E
    if event_time >= _US_THRESHOLD:
        open_time //= 1000
        close_time //= 1000
        event_time //= 1000
    return Kline(
        EXCHANGE,
        market,
        ev.s,
        k.i,
        open_time,
        close_time,
        k.o,
        k.h,
        k.l,
        k.c,
        k.v,
        k.q,
        k.n,
        k.V,
        k.Q,
        k.x,
        event_time,
        receive_time,
    )


# --------------------------------------------------------------------------- frame decoder

_AGG, _DIFF, _PARTIAL, _KLINE, _BOOK_TICKER, _TRADE, _SHUTDOWN = range(7)
_MAX_CACHED_STREAMS = 65536


def _classify(stream: str) -> tuple[int, str]:
    """``(payload kind, SYMBOL)`` for a combined-stream name; FrameError when unknown."""
    if stream == "!serverShutdown":
        return _SHUTDOWN, ""
    symbol, sep, rest = stream.partition("@")
    if not sep or not symbol:
        raise FrameError("unknown_stream", f"unknown stream name {stream[:80]!r}")
    symbol = symbol.upper()
    if rest == "aggTrade":
        return _AGG, symbol
    if rest.startswith("depth"):
        tail = rest[5:]
        if tail == "" or tail.startswith("@"):
            return _DIFF, symbol
        if tail[0].isdigit():
            return _PARTIAL, symbol
    elif rest.startswith("kline_"):
        return _KLINE, symbol
    elif rest == "bookTicker":
        return _BOOK_TICKER, symbol
    elif rest == "trade":
        return _TRADE, symbol
    raise FrameError("unknown_stream", f"unknown stream name {stream[:80]!r}")


class FrameDecoder:
    """Turns one WebSocket text frame of a ``market`` ("spot"/"usdm") connection into a record.

    :meth:`decode` returns a :class:`Trade`, :class:`DepthUpdate` (diff streams),
    :class:`Kline` (every update; ``closed`` tells the final one) or :class:`BookSnapshot`
    (partial-depth streams), or ``None`` for a non-data event, which is then available as
    :attr:`event` (a :data:`NonDataEvent`: server shutdown, control answer, bookTicker,
    spot trade). Anything else raises :class:`FrameError` with a ``kind`` to count.

    Combined-stream envelopes are the normal input; raw (unwrapped) aggTrade, depthUpdate,
    kline and serverShutdown events are accepted too (diff depth assumed for raw depth).
    """

    __slots__ = ("_streams", "event", "market")

    def __init__(self, market: str) -> None:
        if market not in ("spot", "usdm"):
            raise ValueError(f"unknown Binance market {market!r}: use 'spot' or 'usdm'")
        self.market = market
        #: The non-data event behind the last ``None`` returned by :meth:`decode`.
        self.event: NonDataEvent | None = None
        self._streams: dict[str, tuple[int, str]] = {}

    def decode(self, raw: bytes | str, receive_time: int) -> Record | None:
        """Decode one frame; see the class docstring for what comes back."""
        try:
            frame = _frame_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise FrameError("schema", str(exc)) from None
        except msgspec.DecodeError as exc:
            raise FrameError("json", str(exc)) from None
        stream = frame.stream
        if stream is None or not frame.data:
            return self._decode_unwrapped(frame, raw, receive_time)
        entry = self._streams.get(stream)
        if entry is None:
            entry = _classify(stream)
            if len(self._streams) < _MAX_CACHED_STREAMS:
                self._streams[stream] = entry
        kind, symbol = entry
        try:
            if kind == _AGG:
                return trade_from_event(_agg_decoder.decode(frame.data), self.market, receive_time)
            if kind == _DIFF:
                return depth_from_event(
                    _depth_decoder.decode(frame.data), self.market, receive_time
                )
            if kind == _KLINE:
                return kline_from_event(
                    _kline_decoder.decode(frame.data), self.market, receive_time
                )
            if kind == _PARTIAL:
                return self._partial(frame.data, symbol, receive_time)
            if kind == _BOOK_TICKER:
                self.event = _book_ticker_decoder.decode(frame.data)
            elif kind == _TRADE:
                self.event = _trade_decoder.decode(frame.data)
            else:
                self.event = _shutdown_decoder.decode(frame.data)
            return None
        except msgspec.DecodeError as exc:
            raise FrameError("schema", f"{stream[:80]}: {exc}") from None

    def _partial(self, data: msgspec.Raw, symbol: str, receive_time: int) -> BookSnapshot:
        if self.market == "spot":
            snap = _spot_partial_decoder.decode(data)
            return BookSnapshot(
                EXCHANGE,
                self.market,
                symbol,
                snap.lastUpdateId,
                0,
                receive_time,
                snap.bids,
                snap.asks,
            )
        ev = _depth_decoder.decode(data)
        return BookSnapshot(EXCHANGE, self.market, ev.s, ev.u, _ms(ev.E), receive_time, ev.b, ev.a)

    def _decode_unwrapped(self, frame: _Frame, raw: bytes | str, receive_time: int):
        if frame.code is not None:
            self.event = ControlError(frame.code, frame.msg or "", frame.id)
            return None
        if frame.result is not msgspec.UNSET:
            self.event = ControlResponse(frame.id, frame.result)
            return None
        try:
            if frame.e == "serverShutdown":
                self.event = _shutdown_decoder.decode(raw)
                return None
            if frame.e == "aggTrade":
                return trade_from_event(_agg_decoder.decode(raw), self.market, receive_time)
            if frame.e == "depthUpdate":
                return depth_from_event(_depth_decoder.decode(raw), self.market, receive_time)
            if frame.e == "kline":
                return kline_from_event(_kline_decoder.decode(raw), self.market, receive_time)
        except msgspec.DecodeError as exc:
            raise FrameError("schema", f"raw {frame.e} event: {exc}") from None
        if frame.e is None:
            raise FrameError("schema", "frame is neither a stream envelope nor a control answer")
        raise FrameError("unknown_event", f"unknown event type {frame.e[:40]!r}")


# --------------------------------------------------------------------------- REST decoding


def decode_rest_error(body: bytes) -> RestError | None:
    """The ``{"code","msg"}`` of an error response, or None when the body is not one."""
    try:
        return _rest_error_decoder.decode(body)
    except msgspec.DecodeError:
        return None


def decode_depth_snapshot(body: bytes, symbol: str, market: str, receive_time: int) -> BookSnapshot:
    """A :class:`BookSnapshot` from a ``GET depth`` body (raises ``msgspec.DecodeError``)."""
    snap = _rest_depth_decoder.decode(body)
    event_time = _ms(snap.E) if snap.E is not None else 0
    return BookSnapshot(
        EXCHANGE, market, symbol, snap.lastUpdateId, event_time, receive_time, snap.bids, snap.asks
    )


def decode_agg_trades(body: bytes, symbol: str, market: str, receive_time: int) -> list[Trade]:
    """:class:`Trade` records from a ``GET aggTrades`` body; ``event_time`` is ``T``."""
    out = []
    for row in _rest_aggs_decoder.decode(body):
        t = _ms(row.T)
        out.append(
            Trade(
                EXCHANGE,
                market,
                symbol,
                row.a,
                row.p,
                row.q,
                row.f,
                row.l,
                t,
                row.m,
                row.M,
                t,
                receive_time,
            )
        )
    return out


def decode_klines(
    body: bytes, symbol: str, interval: str, market: str, receive_time: int
) -> list[Kline]:
    """:class:`Kline` records from a ``GET klines`` body, all marked ``closed``.

    The caller drops the still-open last bar (its ``close_time`` is in the future).
    """
    out = []
    for row in _rest_klines_decoder.decode(body):
        close_time = _ms(row[6])
        out.append(
            Kline(
                EXCHANGE,
                market,
                symbol,
                interval,
                _ms(row[0]),
                close_time,
                row[1],
                row[2],
                row[3],
                row[4],
                row[5],
                row[7],
                row[8],
                row[9],
                row[10],
                True,
                close_time,
                receive_time,
            )
        )
    return out


def decode_exchange_info(body: bytes) -> ExchangeInfo:
    """The symbols and rate limits of a ``GET exchangeInfo`` body."""
    return _exchange_info_decoder.decode(body)
