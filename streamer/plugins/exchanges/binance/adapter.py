"""The Binance exchange adapter: spot and USD-M futures market data.

WebSocket data comes from :mod:`.connections` (combined streams, rotation, reconnects),
REST from :mod:`.rest` (one weight budget for every call). Records are normalised by
:mod:`.decode`.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import ClassVar, Literal

import anyio
import httpx
import msgspec

from streamer import (
    BookSnapshot,
    Duration,
    ExchangeAdapter,
    ExchangeContext,
    Inbox,
    Kline,
    SequenceRule,
    Subscription,
    SymbolInfo,
    Trade,
    check_duration,
    parse_duration,
)

from .connections import (
    ConnectionManager,
    ConnectionRateLimiter,
    ConnectionSettings,
    StreamGroup,
    build_groups,
)
from .decode import decode_agg_trades, decode_depth_snapshot, decode_exchange_info, decode_klines
from .rest import URGENT, RestClient, WeightBudget

#: Every kline interval Binance serves; ``1s`` exists on spot only.
KLINE_INTERVALS: tuple[str, ...] = (
    "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d",
    "1w", "1M",
)  # fmt: skip
DEPTH_SPEEDS = {"spot": ("100ms", "1000ms"), "usdm": ("0ms", "100ms", "250ms", "500ms")}
#: The speed Binance uses for a bare ``@depth`` stream (no suffix).
_DEFAULT_SPEED = {"spot": "1000ms", "usdm": "250ms"}
_DEFAULTS = {
    "spot": ("https://api.binance.com", "wss://stream.binance.com:9443", 6000),
    "usdm": ("https://fapi.binance.com", "wss://fstream.binance.com", 2400),
}
_FUTURES_DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000)
_AGG_PAGE = 1000
_TIME_OF_DAY = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")
#: Symbols whose lowercase form is a valid stream name: ASCII letters and digits.
_SPOT_SYMBOL = re.compile(r"[A-Z0-9]{1,30}", re.ASCII)
_FUTURES_SYMBOL = re.compile(r"[A-Z0-9]{1,30}(?:_[0-9]{1,8})?", re.ASCII)


def valid_intervals(market: str) -> tuple[str, ...]:
    """The kline intervals ``market`` serves."""
    return KLINE_INTERVALS if market == "spot" else KLINE_INTERVALS[1:]


class BinanceOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of the ``binance`` exchange (the ``options:`` of a pipeline)."""

    #: ``spot`` or ``usdm`` (USD-M futures).
    market: Literal["spot", "usdm"] = "spot"
    #: REST base URL; production for the market when empty.
    rest_url: str = ""
    #: WebSocket base URL (without ``/stream``; USD-M routes are appended); production when empty.
    ws_url: str = ""
    #: Diff-depth speed when a stream type does not ask for one: spot 100ms|1000ms,
    #: usdm 0ms|100ms|250ms|500ms. Empty: 100ms.
    depth_speed: str = ""
    #: Streams per WebSocket connection (Binance's hard maximum is 1024).
    max_streams_per_connection: int = 200
    #: New connections allowed per rolling 5 minutes (Binance: 300 per IP; divide it
    #: between worker processes sharing one IP).
    max_new_connections_per_5m: int = 300
    #: Replace each connection after this age (Binance disconnects at 24 h); "0" disables.
    rotate_after: Duration = "23h"
    #: Also replace every connection daily at this UTC time ("HH:MM"); empty disables.
    rotate_at: str = ""
    #: How long a replaced connection stays open after its successor delivered data.
    rotation_overlap: Duration = "2s"
    #: Reconnect a connection that delivered nothing for this long.
    no_data_timeout: Duration = "60s"
    #: Longest pause between reconnect attempts.
    reconnect_backoff_max: Duration = "30s"
    #: WebSocket receive path: ``protocol`` (websockets' sans-I/O protocol on a plain
    #: asyncio protocol) or ``connection`` (the websockets connection object, the previous
    #: path; kept for one release).
    ws_impl: Literal["protocol", "connection"] = "protocol"
    #: REST request weight per minute; 0 = from exchangeInfo (6000 spot / 2400 futures).
    rest_weight_limit: int = 0
    #: Fraction of the weight limit the adapter plans to use (the rest is headroom).
    rest_weight_safety: float = 0.8
    #: Share of that planned weight kept for trade and kline gap fills: book snapshots
    #: never use it, and fills are always served before waiting snapshots.
    rest_fill_reserve: float = 0.2
    #: REST timeout per request.
    rest_timeout: Duration = "10s"
    #: For ``symbols: [all]``: keep only these quote assets (empty: every quote asset).
    quote_assets: list[str] = msgspec.field(default_factory=list)
    #: For ``symbols: [all]``: statuses to collect.
    statuses: list[str] = msgspec.field(default_factory=lambda: ["TRADING"])
    #: Never backfill trades or klines older than this.
    backfill_max_age: Duration = "24h"

    def __post_init__(self) -> None:
        # Validation errors become msgspec.ValidationError, which the config loader turns
        # into "pipelines[0].options: ..." messages.
        for name in ("rotate_after", "rotation_overlap", "backfill_max_age"):
            check_duration(name, getattr(self, name))
        for name in ("no_data_timeout", "reconnect_backoff_max", "rest_timeout"):
            check_duration(name, getattr(self, name), positive=True)
        if self.rest_weight_limit < 0:
            raise msgspec.ValidationError("rest_weight_limit: must be >= 0 (0 = from exchangeInfo)")
        if not 1 <= self.max_streams_per_connection <= 1024:
            raise msgspec.ValidationError(
                "max_streams_per_connection must be between 1 and 1024 (Binance's limit)"
            )
        if not 1 <= self.max_new_connections_per_5m <= 300:
            raise msgspec.ValidationError("max_new_connections_per_5m must be between 1 and 300")
        if self.depth_speed and self.depth_speed not in DEPTH_SPEEDS[self.market]:
            raise msgspec.ValidationError(
                f"depth_speed {self.depth_speed!r} is not served on {self.market}; "
                f"use one of {', '.join(DEPTH_SPEEDS[self.market])}"
            )
        if self.rotate_at and _rotate_at_second(self.rotate_at) is None:
            raise msgspec.ValidationError(f"rotate_at {self.rotate_at!r}: use 'HH:MM' (UTC)")
        if not 0.05 <= self.rest_weight_safety <= 1.0:
            raise msgspec.ValidationError("rest_weight_safety must be between 0.05 and 1")
        if not 0.0 <= self.rest_fill_reserve <= 0.9:
            raise msgspec.ValidationError("rest_fill_reserve must be between 0 and 0.9")


def _rotate_at_second(text: str) -> int | None:
    match = _TIME_OF_DAY.match(text.strip())
    if not match:
        return None
    h, m, s = int(match[1]), int(match[2]), int(match[3] or 0)
    if h > 23 or m > 59 or s > 59:
        return None
    return h * 3600 + m * 60 + s


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class BinanceAdapter(ExchangeAdapter):
    """Binance spot or USD-M futures market data (see ``docs/binance.md``)."""

    Options: ClassVar[type[msgspec.Struct]] = BinanceOptions
    exchange = "binance"

    def __init__(self, options: msgspec.Struct, context: ExchangeContext) -> None:
        super().__init__(options, context)
        assert isinstance(options, BinanceOptions)
        self.opts = options
        self.market = options.market
        rest_default, ws_default, weight = _DEFAULTS[self.market]
        self.rest_url = (options.rest_url or rest_default).rstrip("/")
        self.ws_url = (options.ws_url or ws_default).rstrip("/")
        self._prefix = "/api/v3" if self.market == "spot" else "/fapi/v1"
        self._max_age_ms = int(parse_duration(options.backfill_max_age) * 1000)
        self.budget = WeightBudget(
            options.rest_weight_limit or weight,
            safety=options.rest_weight_safety,
            reserve=options.rest_fill_reserve,
        )
        client = context.http_client
        if client is not None and not isinstance(client, httpx.AsyncClient):
            raise TypeError("ExchangeContext.http_client must be an httpx.AsyncClient")
        self.rest = RestClient(
            self.rest_url,
            self.budget,
            counters=context.counters,
            logger=context.logger,
            client=client,
            timeout=parse_duration(options.rest_timeout),
        )
        self.connection_limiter = ConnectionRateLimiter(options.max_new_connections_per_5m)
        #: The running connection manager (None until :meth:`stream` starts).
        self.connections: ConnectionManager | None = None
        self._symbols_cache: list[SymbolInfo] | None = None

    @property
    def kline_intervals(self) -> tuple[str, ...]:
        """Kline intervals this market serves (the ``kline`` stream type checks its config)."""
        return valid_intervals(self.market)

    # ------------------------------------------------------------------ symbols

    async def list_symbols(self) -> list[SymbolInfo]:
        """Every instrument of the market from exchangeInfo (also adopts its weight limit)."""
        weight = 20 if self.market == "spot" else 1
        # Few attempts: this runs at start-up and in `streamer symbols`, where a wrong URL
        # should fail fast rather than back off for minutes.
        body = await self.rest.get(f"{self._prefix}/exchangeInfo", {}, weight, max_attempts=3)
        info = decode_exchange_info(body)
        limit = info.request_weight_per_minute()
        if limit and not self.opts.rest_weight_limit:
            self.budget.set_limit(limit)
        symbols = [
            SymbolInfo(s.symbol, s.status or s.contractStatus or "", s.baseAsset, s.quoteAsset)
            for s in info.symbols
        ]
        self._symbols_cache = symbols
        return symbols

    async def resolve_symbols(self, requested: Sequence[str]) -> list[str]:
        """Like the base class, plus ``quote_assets``/``statuses`` filters for ``[all]``.

        Symbols are matched case-insensitively (Binance symbols are uppercase).
        """
        if [s.lower() for s in requested] == ["all"]:
            quotes = {q.upper() for q in self.opts.quote_assets}
            statuses = set(self.opts.statuses)
            chosen = sorted(
                info.symbol
                for info in await self.list_symbols()
                if info.status in statuses and (not quotes or info.quote_asset in quotes)
            )
            # One symbol whose stream name the server refuses gets the whole connection
            # (up to 1024 streams) rejected: leave such symbols out, loudly.
            bad = [s for s in chosen if not self.streamable(s)]
            if bad:
                more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                self.context.logger.warning(
                    "skipping %d listed symbol(s) that are not valid stream names: %s%s",
                    len(bad), ", ".join(repr(s) for s in bad[:5]), more,
                )  # fmt: skip
                chosen = [s for s in chosen if self.streamable(s)]
            return chosen
        chosen = await super().resolve_symbols([s.upper() for s in requested])
        bad = [s for s in chosen if not self.streamable(s)]
        if bad:
            raise ValueError(
                f"symbol(s) that cannot be streamed from Binance {self.market} (not a valid "
                f"stream name): {', '.join(repr(s) for s in bad[:5])}"
                + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            )
        return chosen

    def streamable(self, symbol: str) -> bool:
        """True when ``symbol``'s lowercase form is a valid stream name on this market.

        Spot: ``[A-Z0-9]+``; USD-M also has dated delivery contracts (``BTCUSDT_260327``).
        """
        pattern = _SPOT_SYMBOL if self.market == "spot" else _FUTURES_SYMBOL
        return pattern.fullmatch(symbol) is not None

    # ------------------------------------------------------------------ streaming

    def stream_name(self, sub: Subscription) -> str:
        """The Binance stream name of one subscription (lowercase symbol)."""
        symbol = sub.symbol.lower()
        if sub.channel == "trade":
            return f"{symbol}@aggTrade"
        if sub.channel == "kline":
            if sub.param not in valid_intervals(self.market):
                raise ValueError(
                    f"kline interval {sub.param!r} is not served on Binance {self.market}; "
                    f"use one of {', '.join(valid_intervals(self.market))}"
                )
            return f"{symbol}@kline_{sub.param}"
        if sub.channel == "depth":
            speed = sub.param or self.opts.depth_speed or "100ms"
            if speed not in DEPTH_SPEEDS[self.market]:
                raise ValueError(
                    f"depth speed {speed!r} is not served on Binance {self.market}; "
                    f"use one of {', '.join(DEPTH_SPEEDS[self.market])}"
                )
            if speed == _DEFAULT_SPEED[self.market]:
                return f"{symbol}@depth"
            return f"{symbol}@depth@{speed}"
        raise ValueError(f"unknown channel {sub.channel!r}")

    def check_subscriptions(self, subscriptions: Sequence[Subscription]) -> None:
        """Refuse a depth speed or kline interval this market does not serve (one line)."""
        for sub in subscriptions:
            self.stream_name(sub)

    def stream_groups(self, subscriptions: Sequence[Subscription]) -> list[StreamGroup]:
        """The connections :meth:`stream` opens for ``subscriptions``.

        Spot: ``<ws_url>/stream?streams=...``. USD-M: aggTrade and kline on the ``/market``
        route and depth on ``/public`` (unrouted URLs no longer carry aggTrade).
        """
        names = [(sub.channel, self.stream_name(sub)) for sub in subscriptions]
        size = self.opts.max_streams_per_connection
        if self.market == "spot":
            return build_groups(self.ws_url, [n for _, n in names], size)
        market = [n for channel, n in names if channel != "depth"]
        public = [n for channel, n in names if channel == "depth"]
        groups = []
        if market:
            groups += build_groups(f"{self.ws_url}/market", market, size)
        if public:
            groups += build_groups(f"{self.ws_url}/public", public, size)
        return groups

    async def stream(self, subscriptions: Sequence[Subscription], inbox: Inbox) -> None:
        """Receive ``subscriptions`` forever; see :mod:`.connections` for the guarantees."""
        groups = self.stream_groups(subscriptions)
        if not groups:
            await anyio.sleep_forever()
        opts = self.opts
        settings = ConnectionSettings(
            market=self.market,
            max_streams=opts.max_streams_per_connection,
            no_data_timeout=parse_duration(opts.no_data_timeout),
            backoff_max=parse_duration(opts.reconnect_backoff_max),
            rotate_after=parse_duration(opts.rotate_after),
            rotate_at_second=_rotate_at_second(opts.rotate_at) if opts.rotate_at else None,
            overlap=parse_duration(opts.rotation_overlap),
            ws_impl=opts.ws_impl,
        )
        self.connections = ConnectionManager(
            groups,
            settings,
            on_record=inbox.on_record,
            on_reconnect=inbox.on_reconnect,
            counters=self.context.counters,
            logger=self.context.logger,
            limiter=self.connection_limiter,
        )
        # The runtime's backpressure: stop reading the sockets while the sinks catch up.
        detach = self.context.flow.attach(
            self.connections.pause_reading, self.connections.resume_reading
        )
        try:
            await self.connections.run()
        finally:
            detach()

    # ------------------------------------------------------------------ REST

    @property
    def sequence_rule(self) -> SequenceRule:
        """Spot: ``U == prev_u + 1``, snapshots up to 5000; USD-M: ``pu == prev_u``, <= 1000."""
        if self.market == "spot":
            return SequenceRule(style="spot", max_snapshot_limit=5000)
        return SequenceRule(
            style="futures", max_snapshot_limit=1000, snapshot_limits=_FUTURES_DEPTH_LIMITS
        )

    def snapshot_limit(self, limit: int) -> int:
        """The ``limit`` actually requested for a snapshot of ``limit`` levels."""
        if self.market == "spot":
            return min(max(limit, 1), 5000)
        for allowed in _FUTURES_DEPTH_LIMITS:
            if allowed >= limit:
                return allowed
        return 1000

    def snapshot_weight(self, limit: int) -> int:
        """REST weight of a depth snapshot of ``limit`` (after :meth:`snapshot_limit`)."""
        if self.market == "spot":
            return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250
        return 2 if limit <= 50 else 5 if limit <= 100 else 10 if limit <= 500 else 20

    async def fetch_book_snapshot(self, symbol: str, limit: int) -> BookSnapshot:
        """A REST depth snapshot, queued behind the shared weight budget."""
        limit = self.snapshot_limit(limit)
        body = await self.rest.get(
            f"{self._prefix}/depth", {"symbol": symbol, "limit": limit},
            self.snapshot_weight(limit),
        )  # fmt: skip
        self.context.counters.incr("rest_snapshots", symbol)
        return decode_depth_snapshot(body, symbol, self.market, _now_ms())

    async def _agg_page(self, params: dict[str, object]) -> list[Trade]:
        weight = 4 if self.market == "spot" else 20
        # Written trades wait on gap fills: they go before book snapshots.
        body = await self.rest.get(f"{self._prefix}/aggTrades", params, weight, priority=URGENT)
        return decode_agg_trades(body, params["symbol"], self.market, _now_ms())  # type: ignore[arg-type]

    async def backfill_trades(
        self, symbol: str, from_id: int, to_id: int | None = None
    ) -> AsyncIterator[list[Trade]]:
        """Pages of ``aggTrades?fromId=&limit=1000`` in id order (never with a time range).

        Trades older than ``backfill_max_age`` are skipped: the first page then starts
        above ``from_id`` and the caller sees (and reports) the unfillable part.
        """
        next_id = from_id
        first = True
        while to_id is None or next_id <= to_id:
            page = await self._agg_page({"symbol": symbol, "fromId": next_id, "limit": _AGG_PAGE})
            if first and page and page[0].transact_time < _now_ms() - self._max_age_ms:
                first = False
                newest_allowed = await self._agg_page(
                    {"symbol": symbol, "startTime": _now_ms() - self._max_age_ms, "limit": 1}
                )
                if not newest_allowed:
                    return
                if newest_allowed[0].trade_id > next_id:
                    next_id = newest_allowed[0].trade_id
                    continue
            first = False
            if to_id is not None:
                page = [t for t in page if t.trade_id <= to_id]
            if page:
                self.context.counters.incr("backfilled_trades", symbol, n=len(page))
                yield page
                next_id = page[-1].trade_id + 1
            if len(page) < _AGG_PAGE:
                return

    async def backfill_klines(
        self, symbol: str, interval: str, start_time: int, end_time: int
    ) -> AsyncIterator[list[Kline]]:
        """Closed klines with ``start_time <= open_time <= end_time``, oldest first.

        Pages of at most 1000 (spot) / 1500 (USD-M); bars still open are left out and the
        start is clamped to ``backfill_max_age``.
        """
        if interval not in valid_intervals(self.market):
            raise ValueError(f"kline interval {interval!r} is not served on {self.market}")
        page_size = 1000 if self.market == "spot" else 1500
        weight = 2 if self.market == "spot" else 10
        start = max(start_time, _now_ms() - self._max_age_ms)
        while start <= end_time:
            params = {
                "symbol": symbol, "interval": interval, "startTime": start,
                "endTime": end_time, "limit": page_size,
            }  # fmt: skip
            # A bar is complete on the server only if it closed before the request was
            # sent; one closing while the response travels may still take trades.
            asked = _now_ms()
            body = await self.rest.get(f"{self._prefix}/klines", params, weight, priority=URGENT)
            rows = decode_klines(body, symbol, interval, self.market, _now_ms())
            closed = [k for k in rows if k.close_time < asked and start <= k.open_time <= end_time]
            if closed:
                self.context.counters.incr("backfilled_klines", symbol, n=len(closed))
                yield closed
            if len(rows) < page_size or not rows:
                return
            start = rows[-1].open_time + 1

    async def aclose(self) -> None:
        """Close the REST client (if the adapter created it)."""
        await self.rest.aclose()
