"""Deterministic synthetic market: evolving order books, aggTrades and klines per symbol.

Everything a symbol does is drawn from one ``random.Random`` seeded from the simulator seed
and the ``(market, symbol)`` pair, so the *content* of the stream (prices, quantities, ids,
the order of changes) is identical for the same seed and number of ticks. Times come from the
clock passed to :meth:`SymbolMarket.tick` (wall clock or a virtual clock).

Prices and quantities are integers in units of ``10**-decimals`` and are formatted to the
exact strings Binance would send (spot: 8 decimals; USD-M: the contract's precision, a zero
quantity being ``"0"``). Klines are built from the same aggTrades that are streamed, by one
accumulator, so REST history, streamed klines and the truth always agree.

Update ids follow each market's rule: spot events are contiguous (``U == prev_u + 1``);
USD-M ids jump between events and continuity is carried by ``pu``.
"""

from __future__ import annotations

import bisect
import calendar
import random
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from streamer import Kline, Trade

__all__ = [
    "INTERVAL_MS",
    "SPOT_INTERVALS",
    "USDM_INTERVALS",
    "BarAccumulator",
    "SymbolMarket",
    "SymbolSpec",
    "TickResult",
    "bar_close",
    "bar_open",
    "make_spec",
]

#: Fixed-length kline intervals in ms (``1M`` is a calendar month and handled apart).
INTERVAL_MS: dict[str, int] = {
    "1s": 1_000,
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
    "6h": 21_600_000,
    "8h": 28_800_000,
    "12h": 43_200_000,
    "1d": 86_400_000,
    "3d": 259_200_000,
    "1w": 604_800_000,
}
SPOT_INTERVALS: tuple[str, ...] = (*INTERVAL_MS, "1M")
USDM_INTERVALS: tuple[str, ...] = tuple(i for i in SPOT_INTERVALS if i != "1s")

_WEEK_OFFSET_MS = 4 * 86_400_000  # 1970-01-01 was a Thursday; Binance weeks start on Monday
_QUOTES = ("USDT", "FDUSD", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY", "USD")


def bar_open(interval: str, t: int) -> int:
    """Open time (ms) of the ``interval`` bar containing time ``t`` (ms)."""
    if interval == "1M":
        d = datetime.fromtimestamp(t / 1000, UTC)
        return calendar.timegm((d.year, d.month, 1, 0, 0, 0)) * 1000
    ms = INTERVAL_MS[interval]
    if interval == "1w":
        return t - (t - _WEEK_OFFSET_MS) % ms
    return t - t % ms


def bar_close(interval: str, open_time: int) -> int:
    """Close time (ms) of the bar opening at ``open_time``: the next open minus 1 ms."""
    if interval == "1M":
        d = datetime.fromtimestamp(open_time / 1000, UTC)
        year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
        return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000 - 1
    return open_time + INTERVAL_MS[interval] - 1


@dataclass(frozen=True)
class SymbolSpec:
    """Static description of one simulated instrument."""

    market: str  # "spot" or "usdm"
    symbol: str
    status: str
    base_asset: str
    quote_asset: str
    price_decimals: int
    qty_decimals: int
    tick: int  # price step in units of 10**-price_decimals
    step: int  # quantity step in units of 10**-qty_decimals
    base_price: int  # starting mid price, in price units

    def fmt_price(self, p: int) -> str:
        """Exact price string."""
        return _fmt(p, self.price_decimals)

    def fmt_qty(self, q: int) -> str:
        """Exact quantity string; USD-M sends a removed level as ``"0"``."""
        if q == 0 and self.market == "usdm":
            return "0"
        return _fmt(q, self.qty_decimals)

    def fmt_quote(self, v: int) -> str:
        """Quote volume (price*qty units) as a string: 8 decimals on spot, exact on USD-M."""
        decimals = self.price_decimals + self.qty_decimals
        if self.market == "spot" and decimals > 8:
            return _fmt(v // 10 ** (decimals - 8), 8)
        return _fmt(v, decimals)


def _fmt(value: int, decimals: int) -> str:
    if decimals == 0:
        return str(value)
    scale = 10**decimals
    return f"{value // scale}.{value % scale:0{decimals}d}"


def _split_symbol(symbol: str) -> tuple[str, str]:
    for quote in _QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)], quote
    return symbol[:-3] or symbol, symbol[-3:]


def _stable_seed(seed: int, *parts: str) -> int:
    return seed * 1_000_003 + zlib.crc32("/".join(parts).encode())


def make_spec(market: str, symbol: str, seed: int, status: str = "TRADING") -> SymbolSpec:
    """A plausible, deterministic spec for ``symbol`` (well-known names get realistic prices)."""
    rng = random.Random(_stable_seed(seed, "spec", market, symbol))
    known = {"BTC": 60_000.0, "ETH": 3_000.0, "BNB": 550.0, "SOL": 150.0, "XRP": 0.6}
    base, quote = _split_symbol(symbol)
    price = known.get(base, 10 ** rng.uniform(-1, 3))
    # About five significant digits of price precision, like most Binance pairs.
    magnitude = len(str(int(price))) if price >= 1 else 0
    tick_exp = max(0, 5 - magnitude)  # number of decimals of the tick
    if market == "spot":
        pd, qd = 8, 8
        tick = 10 ** (pd - tick_exp)
        step = 10 ** (qd - min(8, max(0, magnitude)))
    else:
        pd = max(1, tick_exp)
        qd = min(3, max(0, magnitude - 1))
        tick, step = 1, 1
    base_price = (int(price * 10**pd) // tick) * tick
    return SymbolSpec(market, symbol, status, base, quote, pd, qd, tick, step, base_price)


@dataclass
class TickResult:
    """What one tick changed for one symbol."""

    time: int
    first_update_id: int  # U
    last_update_id: int  # u
    prev_update_id: int  # pu: the u before this tick
    # (is_bid, price, qty) in the order they happened; qty 0 removes the level.
    changes: list[tuple[bool, int, int]]
    trades: list[Trade]


@dataclass
class BarAccumulator:
    """Builds one kline from aggTrades; the single source of every kline the sim serves."""

    spec: SymbolSpec
    interval: str
    open_time: int
    prev_close: int
    open: int = 0
    high: int = 0
    low: int = 0
    close: int = 0
    volume: int = 0
    quote: int = 0
    taker_volume: int = 0
    taker_quote: int = 0
    count: int = 0
    first_id: int = -1
    last_id: int = -1
    _prices: dict[str, int] = field(default_factory=dict, repr=False)

    def add(self, trade: Trade, price: int, qty: int) -> None:
        """Fold one aggTrade (with its price/qty in integer units) into the bar."""
        if self.count == 0:
            self.open = self.high = self.low = price
            self.first_id = trade.first_trade_id
        else:
            self.high = max(self.high, price)
            self.low = min(self.low, price)
        self.close = price
        self.volume += qty
        self.quote += price * qty
        if not trade.is_buyer_maker:  # the taker bought
            self.taker_volume += qty
            self.taker_quote += price * qty
        self.count += trade.last_trade_id - trade.first_trade_id + 1
        self.last_id = trade.last_trade_id

    @property
    def close_time(self) -> int:
        """Close time of the bar (ms)."""
        return bar_close(self.interval, self.open_time)

    def prices(self) -> tuple[int, int, int, int]:
        """(open, high, low, close); an empty bar repeats the previous close."""
        if self.count == 0:
            p = self.prev_close
            return p, p, p, p
        return self.open, self.high, self.low, self.close

    def record(self, closed: bool, event_time: int) -> Kline:
        """The bar as a :class:`Kline` record."""
        s = self.spec
        o, h, lo, c = self.prices()
        return Kline(
            exchange="binance",
            market=s.market,
            symbol=s.symbol,
            interval=self.interval,
            open_time=self.open_time,
            close_time=self.close_time,
            open=s.fmt_price(o),
            high=s.fmt_price(h),
            low=s.fmt_price(lo),
            close=s.fmt_price(c),
            volume=_fmt(self.volume, s.qty_decimals),
            quote_volume=s.fmt_quote(self.quote),
            count=self.count,
            taker_buy_volume=_fmt(self.taker_volume, s.qty_decimals),
            taker_buy_quote_volume=s.fmt_quote(self.taker_quote),
            closed=closed,
            event_time=event_time,
            receive_time=0,
        )


class SymbolMarket:
    """One symbol's evolving market. Not thread-safe by itself: callers hold :attr:`lock`.

    ``tick(now_ms)`` advances the market by one step and returns what changed. The full
    history is kept (tick change lists plus periodic book checkpoints) so the book at any
    past event boundary can be rebuilt exactly (:meth:`book_at`).
    """

    _CHECKPOINT_EVERY = 256

    def __init__(
        self, spec: SymbolSpec, seed: int, book_levels: int = 200, history_ticks: int = 200_000
    ) -> None:
        self.spec = spec
        self._max_history = max(2 * self._CHECKPOINT_EVERY, history_ticks)
        self._since_checkpoint = 0
        self.lock = threading.RLock()
        self._rng = random.Random(_stable_seed(seed, "market", spec.market, spec.symbol))
        self._levels = max(10, book_levels)
        rng = self._rng
        if spec.market == "spot":
            self.last_update_id = rng.randint(10**8, 10**9)
        else:
            self.last_update_id = rng.randint(10**11, 10**12)
        self.next_agg_id = rng.randint(10**6, 10**8)
        self.next_trade_id = self.next_agg_id * 3 + rng.randint(0, 1000)
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        mid, tick = spec.base_price, spec.tick
        for k in range(1, self._levels + 1):
            if rng.random() < 0.85:
                self.bids[mid - k * tick] = self._rand_qty()
            if rng.random() < 0.85:
                self.asks[mid + k * tick] = self._rand_qty()
        self.bids.setdefault(mid - tick, self._rand_qty())
        self.asks.setdefault(mid + tick, self._rand_qty())
        self.best_bid = max(self.bids)
        self.best_ask = min(self.asks)
        self.last_price = mid
        self.initial_update_id = self.last_update_id
        self.first_time: int | None = None
        self.last_time: int | None = None
        self.trades: list[Trade] = []
        self.trade_times: list[int] = []
        self._trade_units: list[tuple[int, int]] = []  # (price, qty) per trade
        # History: per tick (U, u, changes); checkpoints: u -> (index, bids, asks).
        self._history_u: list[int] = []
        self._history: list[list[tuple[bool, int, int]]] = []
        self._checkpoints: list[tuple[int, int, dict[int, int], dict[int, int]]] = [
            (self.last_update_id, 0, dict(self.bids), dict(self.asks))
        ]

    # -- generation -------------------------------------------------------------------------

    def _rand_qty(self) -> int:
        rng = self._rng
        return self.spec.step * max(1, int(rng.expovariate(1 / 40)) + 1)

    def _set(self, is_bid: bool, price: int, qty: int, changes: list) -> None:
        side = self.bids if is_bid else self.asks
        if qty:
            side[price] = qty
        else:
            side.pop(price, None)
        changes.append((is_bid, price, qty))
        if is_bid:
            if qty and price > self.best_bid:
                self.best_bid = price
            elif not qty and price == self.best_bid:
                self.best_bid = max(side) if side else price - self.spec.tick
        else:
            if qty and price < self.best_ask:
                self.best_ask = price
            elif not qty and price == self.best_ask:
                self.best_ask = min(side) if side else price + self.spec.tick

    def _trade(self, now: int, changes: list, out: list[Trade]) -> None:
        rng, spec = self._rng, self.spec
        taker_sells = rng.random() < 0.5  # buyer is maker
        side = self.bids if taker_sells else self.asks
        price = self.best_bid if taker_sells else self.best_ask
        level = side.get(price)
        if not level or len(side) < 3:
            return
        qty = level if rng.random() < 0.3 else max(spec.step, (level * rng.randint(1, 9) // 10))
        qty = (qty // spec.step) * spec.step
        if qty <= 0:
            return
        n = rng.randint(1, 3)
        first = self.next_trade_id
        self.next_trade_id += n
        trade = Trade(
            exchange="binance",
            market=spec.market,
            symbol=spec.symbol,
            trade_id=self.next_agg_id,
            price=spec.fmt_price(price),
            quantity=_fmt(qty, spec.qty_decimals),
            first_trade_id=first,
            last_trade_id=first + n - 1,
            transact_time=now,
            is_buyer_maker=taker_sells,
            is_best_match=True if spec.market == "spot" else None,
            event_time=now,
            receive_time=0,
        )
        self.next_agg_id += 1
        self._set(taker_sells, price, level - qty, changes)
        self.last_price = price
        out.append(trade)
        self.trades.append(trade)
        self.trade_times.append(now)
        self._trade_units.append((price, qty))

    def _touch_level(self, changes: list) -> None:
        rng, tick = self._rng, self.spec.tick
        is_bid = rng.random() < 0.5
        k = 1 + min(self._levels - 1, int(rng.expovariate(1 / 8)))
        # Anchor on the opposite best so a new level can never cross the book.
        price = self.best_ask - k * tick if is_bid else self.best_bid + k * tick
        side = self.bids if is_bid else self.asks
        if price in side and rng.random() < 0.35 and len(side) > 5:
            self._set(is_bid, price, 0, changes)
        else:
            self._set(is_bid, price, self._rand_qty(), changes)
        if len(side) > self._levels * 1.2:
            worst = min(side) if is_bid else max(side)
            self._set(is_bid, worst, 0, changes)

    def tick(self, now: int, trade_probability: float = 0.5) -> TickResult:
        """Advance one step at time ``now`` (ms): a few level changes and maybe trades."""
        rng = self._rng
        changes: list[tuple[bool, int, int]] = []
        trades: list[Trade] = []
        if self.first_time is None:
            self.first_time = now
        self.last_time = now
        if rng.random() < trade_probability:
            for _ in range(rng.randint(1, 3)):
                self._trade(now, changes, trades)
        for _ in range(rng.randint(1, 4)):
            self._touch_level(changes)
        prev = self.last_update_id
        if self.spec.market == "spot":
            first = prev + 1
            last = prev + len(changes)
        else:
            first = prev + rng.randint(1, 40)
            last = first + rng.randint(len(changes) - 1, 6 * len(changes))
        self.last_update_id = last
        self._history_u.append(last)
        self._history.append(changes)
        self._since_checkpoint += 1
        if self._since_checkpoint >= self._CHECKPOINT_EVERY:
            self._since_checkpoint = 0
            self._checkpoints.append((last, len(self._history), dict(self.bids), dict(self.asks)))
        if len(self._history) > self._max_history:
            self._trim()
        return TickResult(now, first, last, prev, changes, trades)

    def _trim(self) -> None:
        """Forget the older half of the book history (bounded memory on long runs)."""
        keep_from = len(self._history) // 2
        cp = max((c for c in self._checkpoints if c[1] <= keep_from), key=lambda c: c[1])
        cut = cp[1]
        del self._history[:cut]
        del self._history_u[:cut]
        self._checkpoints = [(u, i - cut, b, a) for u, i, b, a in self._checkpoints if i >= cut]
        self.initial_update_id = cp[0]

    # -- truth ------------------------------------------------------------------------------

    def snapshot(self, limit: int) -> tuple[int, list[tuple[str, str]], list[tuple[str, str]]]:
        """``(lastUpdateId, bids, asks)`` of the current book, ``limit`` levels per side."""
        return (self.last_update_id, *self._format_book(self.bids, self.asks, limit))

    def _format_book(
        self, bids: dict[int, int], asks: dict[int, int], limit: int | None
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        s = self.spec
        top_b = sorted(bids, reverse=True)[:limit]
        top_a = sorted(asks)[:limit]
        return (
            [(s.fmt_price(p), s.fmt_qty(bids[p])) for p in top_b],
            [(s.fmt_price(p), s.fmt_qty(asks[p])) for p in top_a],
        )

    def book_at(self, update_id: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The full book right after the event whose last update id is ``update_id``.

        ``update_id`` must be the initial id or a tick boundary (the ``u`` of a 0 ms event,
        a REST ``lastUpdateId``); anything else raises ``ValueError``.
        """
        if update_id == self.initial_update_id:
            index = 0
        else:
            pos = bisect.bisect_left(self._history_u, update_id)
            if pos == len(self._history_u) or self._history_u[pos] != update_id:
                raise ValueError(
                    f"{self.spec.symbol}: {update_id} is not an event boundary "
                    f"(or is older than the {len(self._history)} ticks kept)"
                )
            index = pos + 1
        cp = max(
            (c for c in self._checkpoints if c[1] <= index),
            key=lambda c: c[1],
        )
        bids, asks = dict(cp[2]), dict(cp[3])
        for changes in self._history[cp[1] : index]:
            for is_bid, price, qty in changes:
                side = bids if is_bid else asks
                if qty:
                    side[price] = qty
                else:
                    side.pop(price, None)
        return self._format_book(bids, asks, None)

    def trades_between(self, start: int, end: int) -> Iterator[tuple[Trade, int, int]]:
        """Trades with ``start <= T <= end`` as ``(trade, price_units, qty_units)``."""
        lo = bisect.bisect_left(self.trade_times, start)
        hi = bisect.bisect_right(self.trade_times, end)
        for i in range(lo, hi):
            yield self.trades[i], *self._trade_units[i]

    def trade_units_tail(self, n: int) -> list[tuple[int, int]]:
        """``(price, qty)`` units of the last ``n`` trades."""
        return self._trade_units[-n:] if n else []

    def price_before(self, t: int) -> int:
        """Last trade price strictly before ``t`` (the starting mid when none)."""
        i = bisect.bisect_left(self.trade_times, t)
        return self._trade_units[i - 1][0] if i else self.spec.base_price

    def bar(self, interval: str, open_time: int) -> BarAccumulator:
        """The bar opening at ``open_time`` built from every trade so far."""
        acc = BarAccumulator(self.spec, interval, open_time, self.price_before(open_time))
        for trade, price, qty in self.trades_between(open_time, bar_close(interval, open_time)):
            acc.add(trade, price, qty)
        return acc

    def bar_opens(self, interval: str, start: int, end: int) -> Iterator[int]:
        """Open times of bars that overlap the simulated period and ``[start, end]``."""
        if self.first_time is None or self.last_time is None:
            return
        t = bar_open(interval, max(start, self.first_time))
        stop = min(end, self.last_time)
        while t <= stop:
            yield t
            t = bar_close(interval, t) + 1

    def closed_klines(self, interval: str) -> list[Kline]:
        """Every bar that closed before the last tick, oldest first."""
        if self.first_time is None or self.last_time is None:
            return []
        out = []
        for t in self.bar_opens(interval, self.first_time, self.last_time):
            if bar_close(interval, t) < self.last_time:
                acc = self.bar(interval, t)
                out.append(acc.record(True, acc.close_time))
        return out
