"""The simulator's default data source: the synthetic market, ticking and streamed.

:class:`SyntheticFeed` advances every :class:`~streamer.testing.market.SymbolMarket` once a
tick and turns what happened into the Binance events of the subscribed streams (aggTrade,
diff and partial depth, bookTicker, kline), which :class:`~streamer.testing.protocol.StreamProtocol`
publishes. The stream faults that drop events (depth, aggTrade) are applied here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from streamer import Counters

from .faults import Faults
from .market import BarAccumulator, SymbolMarket, TickResult, bar_open
from .protocol import StreamProtocol
from .simconfig import SimConfig
from .streams import StreamSpec

__all__ = ["SyntheticFeed"]

log = logging.getLogger("streamer.testing.sim")

_json = msgspec.json.Encoder()


class _DepthWindow:
    __slots__ = ("changes", "first", "last", "prev")

    def __init__(self, prev: int) -> None:
        self.prev = prev
        self.first = 0
        self.last = 0
        self.changes: dict[tuple[bool, int], int] = {}


class _KlineState:
    __slots__ = ("acc", "last_push")

    def __init__(self, acc: BarAccumulator, last_push: int) -> None:
        self.acc = acc
        self.last_push = last_push


class SyntheticFeed:
    """Ticks the synthetic markets and publishes their events.

    ``ticks`` counts the ticks so far (the virtual clock of ``SimConfig.start_time_ms``
    advances with it); ``now_ms()`` is the simulator clock.
    """

    def __init__(
        self,
        config: SimConfig,
        counters: Counters,
        faults: Faults,
        protocol: StreamProtocol,
        markets: dict[tuple[str, str], SymbolMarket],
        now_ms: Callable[[], int],
    ) -> None:
        self.config = config
        self.counters = counters
        self.faults = faults
        self.protocol = protocol
        self.markets = markets
        self.now_ms = now_ms
        self.ticks = 0
        self._depth: dict[tuple[str, str], _DepthWindow] = {}
        self._klines: dict[tuple[str, str], _KlineState] = {}
        self._book_tops: dict[tuple[str, str], tuple[int, int, int, int]] = {}
        protocol.on_added = self.stream_added
        protocol.on_removed = self.stream_removed

    # -- streams ----------------------------------------------------------------------------

    def stream_added(self, market: str, name: str, spec: StreamSpec) -> None:
        """A stream got its first subscriber: start its depth window or kline bar now."""
        mk = self.markets.get((market, spec.symbol))
        if mk is None:
            return
        if spec.kind == "depth" and (market, name) not in self._depth:
            self._depth[(market, name)] = _DepthWindow(mk.last_update_id)
        elif (
            spec.kind == "kline" and mk.last_time is not None and (market, name) not in self._klines
        ):
            # Before the first tick the state is created lazily, so no bar predates the market.
            self._klines[(market, name)] = self._new_kline_state(market, spec.symbol, spec)

    def stream_removed(self, market: str, name: str) -> None:
        """A stream lost its last subscriber: forget its state."""
        self._depth.pop((market, name), None)
        self._klines.pop((market, name), None)
        self._book_tops.pop((market, name), None)

    # -- ticking ----------------------------------------------------------------------------

    def pregenerate(self) -> None:
        """Tick ``history_s`` of market before serving, so REST history exists."""
        cfg = self.config
        n = int(cfg.history_s * 1000 // cfg.tick_ms)
        if not n:
            return
        base = self.now_ms() - (n * cfg.tick_ms if cfg.start_time_ms is None else 0)
        for i in range(n):
            now = base + i * cfg.tick_ms
            for mk in self.markets.values():
                with mk.lock:
                    mk.tick(now, cfg.trade_probability)
            if cfg.start_time_ms is not None:
                self.ticks += 1

    async def run(self) -> None:
        """Tick every ``tick_ms`` until cancelled (never bursting to catch up)."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        period = cfg.tick_ms / 1000
        next_at = loop.time()
        while True:
            next_at += period
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1:
                next_at = loop.time()  # far behind (debugger, stall): do not burst-catch-up
            try:
                self.tick()
            except Exception:
                self.counters.incr("sim_internal_errors")
                log.exception("simulator tick failed")

    def tick(self) -> None:
        """Advance every market once and publish the events of the subscribed streams."""
        cfg = self.config
        now = self.now_ms()
        self.protocol.stalled = self.faults.stalled()
        index = self.ticks
        self.ticks += 1
        for key, mk in self.markets.items():
            with mk.lock:
                res = mk.tick(now, cfg.trade_probability)
            active = self.protocol.active.get(key)
            if active:
                self._emit(key, mk, res, active, index)

    # -- events -----------------------------------------------------------------------------

    def _emit(
        self,
        key: tuple[str, str],
        mk: SymbolMarket,
        res: TickResult,
        active: dict[str, StreamSpec],
        index: int,
    ) -> None:
        market, symbol = key
        spot = market == "spot"
        now = res.time
        publish = self.protocol.publish
        for name, spec in list(active.items()):
            kind = spec.kind
            if kind == "aggTrade":
                for t in res.trades:
                    if self.faults.take_drop_aggtrade(symbol):
                        self.counters.incr("fault_aggtrade_dropped", symbol)
                        continue
                    body: dict[str, Any] = {
                        "e": "aggTrade",
                        "E": now,
                        "s": symbol,
                        "a": t.trade_id,
                        "p": t.price,
                        "q": t.quantity,
                    }
                    if not spot:
                        body["nq"] = t.quantity
                    body.update(
                        {
                            "f": t.first_trade_id,
                            "l": t.last_trade_id,
                            "T": t.transact_time,
                            "m": t.is_buyer_maker,
                        }
                    )
                    if spot:
                        body["M"] = True
                    publish(market, name, "aggTrade", symbol, _json.encode(body))
            elif kind == "depth":
                self._emit_depth(key, mk, res, name, spec, index)
            elif kind == "partial":
                step = max(1, spec.speed_ms // self.config.tick_ms)
                if (index + 1) % step == 0:
                    bids, asks = mk._format_book(mk.bids, mk.asks, spec.levels)
                    if spot:
                        body = {"lastUpdateId": res.last_update_id, "bids": bids, "asks": asks}
                    else:
                        body = {
                            "e": "depthUpdate",
                            "E": now,
                            "T": now,
                            "s": symbol,
                            "U": res.first_update_id,
                            "u": res.last_update_id,
                            "pu": res.prev_update_id,
                            "b": bids,
                            "a": asks,
                        }
                    publish(market, name, "partial", symbol, _json.encode(body))
            elif kind == "bookTicker":
                top = (mk.best_bid, mk.bids.get(mk.best_bid, 0), mk.best_ask, mk.asks[mk.best_ask])
                if self._book_tops.get((market, name)) != top:
                    self._book_tops[(market, name)] = top
                    s = mk.spec
                    body = {"u": res.last_update_id, "s": symbol}
                    if not spot:
                        body = {"e": "bookTicker", "u": res.last_update_id, "E": now, "T": now}
                        body["s"] = symbol
                    body.update(
                        {
                            "b": s.fmt_price(top[0]),
                            "B": s.fmt_qty(top[1]),
                            "a": s.fmt_price(top[2]),
                            "A": s.fmt_qty(top[3]),
                        }
                    )
                    publish(market, name, "bookTicker", symbol, _json.encode(body))
            elif kind == "kline":
                self._emit_kline(key, mk, res, name, spec)

    def _emit_depth(
        self,
        key: tuple[str, str],
        mk: SymbolMarket,
        res: TickResult,
        name: str,
        spec: StreamSpec,
        index: int,
    ) -> None:
        market, symbol = key
        win = self._depth.get((market, name))
        if win is None:
            win = self._depth[(market, name)] = _DepthWindow(res.prev_update_id)
        if not win.changes:
            win.first = res.first_update_id
        win.last = res.last_update_id
        for is_bid, price, qty in res.changes:
            win.changes[(is_bid, price)] = qty
        step = max(1, spec.speed_ms // self.config.tick_ms)
        if (index + 1) % step or not win.changes:
            return
        s = mk.spec
        bids = [[s.fmt_price(p), s.fmt_qty(q)] for (b, p), q in win.changes.items() if b]
        asks = [[s.fmt_price(p), s.fmt_qty(q)] for (b, p), q in win.changes.items() if not b]
        if market == "spot":
            body: dict[str, Any] = {
                "e": "depthUpdate",
                "E": res.time,
                "s": symbol,
                "U": win.first,
                "u": win.last,
                "b": bids,
                "a": asks,
            }
        else:
            body = {
                "e": "depthUpdate",
                "E": res.time,
                "T": res.time,
                "s": symbol,
                "U": win.first,
                "u": win.last,
                "pu": win.prev,
                "b": bids,
                "a": asks,
            }
        win.prev = win.last
        win.changes = {}
        if self.faults.take_drop_depth(symbol):
            self.counters.incr("fault_depth_dropped", symbol)
            return
        self.protocol.publish(market, name, "depth", symbol, _json.encode(body))

    def _kline_push_ms(self, market: str, interval: str) -> int:
        if self.config.kline_push_ms is not None:
            return self.config.kline_push_ms
        if market == "usdm":
            return 250
        return 1000 if interval == "1s" else 2000

    def _new_kline_state(self, market: str, symbol: str, spec: StreamSpec) -> _KlineState:
        mk = self.markets[(market, symbol)]
        t = mk.last_time if mk.last_time is not None else self.now_ms()
        with mk.lock:
            acc = mk.bar(spec.interval, bar_open(spec.interval, t))
        return _KlineState(acc, 0)

    def _emit_kline(
        self, key: tuple[str, str], mk: SymbolMarket, res: TickResult, name: str, spec: StreamSpec
    ) -> None:
        market, symbol = key
        state = self._klines.get((market, name))
        fresh = state is None
        if state is None:
            # Normally created at subscription; built now it already holds this tick's trades.
            state = self._klines[(market, name)] = self._new_kline_state(market, symbol, spec)
        now = res.time
        while now > state.acc.close_time:
            self._publish_kline(market, name, state.acc, True, now)
            state.acc = BarAccumulator(
                mk.spec, spec.interval, state.acc.close_time + 1, state.acc.prices()[3]
            )
        if res.trades and not fresh:
            units = mk.trade_units_tail(len(res.trades))
            for t, (price, qty) in zip(res.trades, units, strict=True):
                state.acc.add(t, price, qty)
        if now - state.last_push >= self._kline_push_ms(market, spec.interval):
            state.last_push = now
            self._publish_kline(market, name, state.acc, False, now)

    def _publish_kline(
        self, market: str, name: str, acc: BarAccumulator, closed: bool, now: int
    ) -> None:
        k = acc.record(closed, now)
        body = {
            "e": "kline",
            "E": now,
            "s": k.symbol,
            "k": {
                "t": k.open_time,
                "T": k.close_time,
                "s": k.symbol,
                "i": k.interval,
                "f": acc.first_id,
                "L": acc.last_id,
                "o": k.open,
                "c": k.close,
                "h": k.high,
                "l": k.low,
                "v": k.volume,
                "n": k.count,
                "x": closed,
                "q": k.quote_volume,
                "V": k.taker_buy_volume,
                "Q": k.taker_buy_quote_volume,
                "B": "0",
            },
        }
        self.protocol.publish(market, name, "kline", k.symbol, _json.encode(body))
