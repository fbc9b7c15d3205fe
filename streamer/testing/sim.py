"""A local Binance (spot + USD-M) market-data server for tests, demos and benchmarks.

One asyncio server on one port answers REST (``/api/v3/*``, ``/fapi/v1/*``) and WebSocket
streams (spot ``/ws``, ``/stream``; USD-M ``/public/...``, ``/market/...``, or any of those
under ``/fstream`` where the unrouted ``/fstream/ws`` and ``/fstream/stream`` get the
``/public`` stream kinds only, like Binance since 2026-04-23)::

    async with SimServer(SimConfig(seed=1, spot_symbols=["BTCUSDT"])) as sim:
        sim.rest_url, sim.ws_url      # http://127.0.0.1:<port>, ws://127.0.0.1:<port>
        sim.faults.drop_depth("BTCUSDT", 1)
        sim.truth.trades("spot", "BTCUSDT")

    sim = SimServer(cfg).start_in_thread()   # sync tests / other processes
    ...
    sim.stop()

Sources of data: the synthetic market (:mod:`streamer.testing.market`, default), a replay
of a recorded capture (``SimConfig(replay=...)``, :mod:`streamer.testing.replay`), or the
high-rate benchmark generator (``SimConfig(high_rate=...)``,
:mod:`streamer.testing.highrate`). See ``docs/simulator.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from streamer.core.metrics import Counters
from streamer.core.records import Kline, Trade

from . import _wire as wire
from .faults import FaultPlan, Faults
from .market import BarAccumulator, SymbolMarket, SymbolSpec, TickResult, bar_open, make_spec
from .rest import ApiError, RestApi, request_weight
from .streams import StreamSpec, parse_stream

__all__ = ["SimConfig", "SimServer", "Truth"]

log = logging.getLogger("streamer.testing.sim")

_json = msgspec.json.Encoder()
_ID_STR = re.compile(r"^[A-Za-z0-9_\-]{1,36}$")
_JSON_POS = re.compile(r"byte (\d+)")
_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
_MARKET_DEFAULTS = {
    # (ping interval s, pong timeout s, incoming messages per second)
    "spot": (20.0, 60.0, 5),
    "usdm": (180.0, 600.0, 10),
}


class SimConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything that shapes a simulator run. Defaults follow Binance's documented limits.

    Market: ``seed`` fixes the content of every stream; ``start_time_ms`` switches to a
    virtual clock (tick ``i`` happens at ``start_time_ms + i * tick_ms``) so times are
    deterministic too; ``history_s`` pre-generates that much market before serving, so REST
    history (aggTrades, klines) exists from the start. ``*_non_trading`` symbols are listed
    in exchangeInfo with the given status and never trade.
    """

    seed: int = 1
    host: str = "127.0.0.1"
    port: int = 0
    spot_symbols: list[str] = msgspec.field(default_factory=lambda: ["BTCUSDT", "ETHUSDT"])
    usdm_symbols: list[str] = msgspec.field(default_factory=lambda: ["BTCUSDT", "ETHUSDT"])
    spot_non_trading: dict[str, str] = msgspec.field(default_factory=lambda: {"LUNAUSDT": "BREAK"})
    usdm_non_trading: dict[str, str] = msgspec.field(
        default_factory=lambda: {"DEADUSDT": "SETTLING"}
    )
    tick_ms: int = 100
    trade_probability: float = 0.5
    book_levels: int = 200
    start_time_ms: int | None = None
    history_s: float = 0.0
    # REST limits
    weight_limit_spot: int = 6000
    weight_limit_usdm: int = 2400
    weight_window_s: float = 60.0
    ban_after_429s: int = 3
    ban_s: float = 120.0
    # WebSocket limits (None = the market's Binance default)
    ping_interval_s: float | None = None
    pong_timeout_s: float | None = None
    incoming_limit: int | None = None
    max_connection_age_s: float = 86_400.0
    max_streams: int = 1024
    max_frame_bytes: int = 1 << 16
    write_buffer_limit: int = 64 << 20
    kline_push_ms: int | None = None
    shutdown_grace_s: float = 1.0
    faults: FaultPlan = msgspec.field(default_factory=FaultPlan)
    # Other sources
    replay: str | None = None
    replay_speed: float = 1.0
    data_dir: str | None = None
    high_rate: int = 0
    high_rate_symbols: int = 100

    def __post_init__(self) -> None:
        checks = [
            (self.tick_ms >= 1, "tick_ms must be >= 1"),
            (0.0 <= self.trade_probability <= 1.0, "trade_probability must be in [0, 1]"),
            (self.book_levels >= 1, "book_levels must be >= 1"),
            (self.history_s >= 0, "history_s must be >= 0"),
            (self.weight_window_s > 0, "weight_window_s must be > 0"),
            (self.max_streams >= 1, "max_streams must be >= 1"),
            (self.max_connection_age_s > 0, "max_connection_age_s must be > 0"),
            (self.replay_speed >= 0, "replay_speed must be >= 0 (0 = as fast as possible)"),
            (self.high_rate >= 0, "high_rate must be >= 0"),
            (1 <= self.high_rate_symbols <= 10_000, "high_rate_symbols must be in 1..10000"),
            (not (self.replay and self.high_rate), "replay and high_rate are exclusive"),
        ]
        for value in (self.ping_interval_s, self.pong_timeout_s):
            checks.append((value is None or value > 0, "ping/pong times must be > 0"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SimConfig: {message}")


class _Conn:
    """One WebSocket client connection."""

    __slots__ = (
        "close_abrupt",
        "close_after",
        "closing",
        "combined",
        "created",
        "incoming",
        "market",
        "micro",
        "next_ping",
        "path",
        "ping_deadline",
        "ping_payload",
        "route",
        "sent",
        "streams",
        "transport",
    )

    def __init__(self, transport: asyncio.Transport, market: str, route: str, path: str) -> None:
        self.transport = transport
        self.market = market
        self.route = route  # "all" (spot), "public" or "market"
        self.path = path
        self.combined = False
        self.micro = False  # spot ``timeUnit=MICROSECOND``
        self.streams: dict[str, StreamSpec | None] = {}
        self.created = time.monotonic()
        self.incoming: deque[float] = deque()
        self.next_ping = 0.0
        self.ping_payload: bytes | None = None
        self.ping_deadline = 0.0
        self.sent = 0
        self.close_after = 0
        self.close_abrupt = False
        self.closing = False


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


class Truth:
    """What the simulator generated, for exact comparison in tests (thread-safe)."""

    def __init__(self, server: SimServer) -> None:
        self._server = server

    def _market(self, market: str, symbol: str) -> SymbolMarket:
        try:
            return self._server.markets[(market, symbol.upper())]
        except KeyError:
            raise KeyError(f"no synthetic market for {market} {symbol}") from None

    def trades(self, market: str, symbol: str) -> list[Trade]:
        """Every aggTrade generated so far (streamed or dropped), in id order."""
        mk = self._market(market, symbol)
        with mk.lock:
            return list(mk.trades)

    def closed_klines(self, market: str, symbol: str, interval: str) -> list[Kline]:
        """Every kline of ``interval`` that has closed, oldest first (``closed=True``)."""
        mk = self._market(market, symbol)
        with mk.lock:
            return mk.closed_klines(interval)

    def book_at(
        self, market: str, symbol: str, update_id: int
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The full book (bids best first, asks best first) after update id ``update_id``."""
        mk = self._market(market, symbol)
        with mk.lock:
            return mk.book_at(update_id)

    def last_update_id(self, market: str, symbol: str) -> int:
        """The newest update id of ``symbol``'s book."""
        mk = self._market(market, symbol)
        with mk.lock:
            return mk.last_update_id

    def spec(self, market: str, symbol: str) -> SymbolSpec:
        """The symbol's static description (precisions, tick, step)."""
        return self._market(market, symbol).spec

    def counters(self) -> dict[tuple[str, str, str], int]:
        """A snapshot of every simulator counter (messages sent, faults injected, ...)."""
        return self._server._counter_snapshot()

    def messages_sent(self, kind: str = "") -> int:
        """Data messages sent to clients, all or of one stream kind (``"depth"``...)."""
        snap = self.counters()
        return sum(
            v
            for (n, _, k), v in snap.items()
            if n == "ws_messages_sent" and (not kind or k == kind)
        )


class SimServer:
    """The simulator. Use as an async context manager or via :meth:`start_in_thread`."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.counters = Counters()
        self._counter_lock = threading.Lock()
        self.faults = Faults(self.config.faults, self._call_in_loop)
        self.faults.on_close = self._close_matching
        self.faults.on_shutdown = self._shutdown_all
        self.faults.on_close_after = self._close_after
        self.truth = Truth(self)
        self.markets: dict[tuple[str, str], SymbolMarket] = {}
        self.specs: dict[tuple[str, str], SymbolSpec] = {}
        self._conns: set[_Conn] = set()
        self._subs: dict[tuple[str, str], set[_Conn]] = {}
        self._active: dict[tuple[str, str], dict[str, StreamSpec]] = {}
        self._depth: dict[tuple[str, str], _DepthWindow] = {}
        self._klines: dict[tuple[str, str], _KlineState] = {}
        self._held: dict[tuple[str, str], list[bytes]] = {}
        self._book_tops: dict[tuple[str, str], tuple[int, int, int, int]] = {}
        self._weights: dict[str, list[float]] = {}
        self._subs_version = 0
        self._ticks = 0
        self._stalled = False
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._handlers: set[asyncio.Task] = set()
        self._transports: set[asyncio.BaseTransport] = set()
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None
        self.port = 0
        self.replay: Any = None
        self.high_rate: Any = None
        self._build_markets()
        self.rest = RestApi(
            self.markets,
            self.specs,
            {"spot": self.config.weight_limit_spot, "usdm": self.config.weight_limit_usdm},
            self.now_ms,
        )

    # -- URLs -------------------------------------------------------------------------------

    @property
    def rest_url(self) -> str:
        """Base URL for REST (both ``/api/v3`` and ``/fapi/v1``)."""
        return f"http://{self.config.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """Base URL for WebSocket streams (spot ``/ws``, ``/stream``; USD-M ``/public``...)."""
        return f"ws://{self.config.host}:{self.port}"

    @property
    def usdm_ws_url(self) -> str:
        """USD-M base URL behaving like ``wss://fstream.binance.com`` (routed and unrouted)."""
        return f"ws://{self.config.host}:{self.port}/fstream"

    # -- lifecycle --------------------------------------------------------------------------

    def _build_markets(self) -> None:
        cfg = self.config
        for market, symbols, others in (
            ("spot", cfg.spot_symbols, cfg.spot_non_trading),
            ("usdm", cfg.usdm_symbols, cfg.usdm_non_trading),
        ):
            for symbol in symbols:
                spec = make_spec(market, symbol.upper(), cfg.seed)
                self.specs[(market, spec.symbol)] = spec
                if not (cfg.replay or cfg.high_rate):
                    self.markets[(market, spec.symbol)] = SymbolMarket(
                        spec, cfg.seed, cfg.book_levels
                    )
            for symbol, status in others.items():
                spec = make_spec(market, symbol.upper(), cfg.seed, status)
                self.specs[(market, spec.symbol)] = spec

    def now_ms(self) -> int:
        """The simulator clock in ms (wall clock, or virtual when ``start_time_ms`` is set)."""
        start = self.config.start_time_ms
        if start is None:
            return time.time_ns() // 1_000_000
        return start + self._ticks * self.config.tick_ms

    async def start(self) -> None:
        """Bind the port and start generating."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if cfg.replay:
            from .replay import ReplaySource

            self.replay = ReplaySource.load(cfg.replay, cfg.data_dir, cfg.replay_speed)
        if cfg.high_rate:
            from .highrate import HighRateSource

            self.high_rate = HighRateSource(self, cfg.high_rate, cfg.high_rate_symbols)
        elif not cfg.replay:
            self._pregenerate()
        self._server = await asyncio.start_server(
            self._handle, cfg.host, cfg.port, limit=1 << 20, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.high_rate is not None:
            self._tasks.append(asyncio.create_task(self.high_rate.run()))
        elif not cfg.replay:
            self._tasks.append(asyncio.create_task(self._engine()))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        self._tasks.append(asyncio.create_task(self._planned_faults()))

    async def aclose(self) -> None:
        """Stop serving and close every connection (REST keep-alive ones too).

        Connection handlers end on their own once their socket is aborted; only those
        stuck elsewhere (an injected delay) are cancelled, and :meth:`_handle` ends those
        quietly, so shutting down logs nothing.
        """
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        for conn in list(self._conns):
            conn.closing = True
        for transport in list(self._transports):
            transport.abort()
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=1.0)
            for task in pending:
                task.cancel()
        await asyncio.gather(*self._tasks, *handlers, return_exceptions=True)
        self._tasks.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        """Run until cancelled or :meth:`stop` (used by ``streamer sim``)."""
        await self.start()
        try:
            assert self._stop_event is not None
            await self._stop_event.wait()
        finally:
            await self.aclose()

    def start_in_thread(self, timeout: float = 10.0) -> SimServer:
        """Run the server on its own event loop in a daemon thread; returns ``self`` once
        the port is bound (raises what start-up raised)."""
        ready = threading.Event()
        error: list[BaseException] = []

        def _run() -> None:
            async def _main() -> None:
                try:
                    await self.start()
                except BaseException as exc:
                    error.append(exc)
                    ready.set()
                    return
                ready.set()
                assert self._stop_event is not None
                try:
                    await self._stop_event.wait()
                finally:
                    await self.aclose()

            asyncio.run(_main())

        self._thread = threading.Thread(target=_run, name="binance-sim", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("simulator did not start")
        if error:
            raise error[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop a server started with :meth:`start_in_thread` (or :meth:`serve_forever`)."""
        if self._loop is not None and self._stop_event is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop_event.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("simulator is not running")
        loop.call_soon_threadsafe(fn)

    def _counter_snapshot(self) -> dict[tuple[str, str, str], int]:
        loop = self._loop
        if loop is None or self._thread is None or threading.current_thread() is self._thread:
            return self.counters.snapshot()
        done = threading.Event()
        out: list[dict] = []

        def _take() -> None:
            out.append(self.counters.snapshot())
            done.set()

        loop.call_soon_threadsafe(_take)
        done.wait(5)
        return out[0] if out else {}

    # -- synthetic engine -------------------------------------------------------------------

    def _pregenerate(self) -> None:
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
                self._ticks += 1

    async def _engine(self) -> None:
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
                self._tick()
            except Exception:
                self.counters.incr("sim_internal_errors")
                log.exception("simulator tick failed")

    def _tick(self) -> None:
        cfg = self.config
        now = self.now_ms()
        self._stalled = self.faults.stalled()
        index = self._ticks
        self._ticks += 1
        for key, mk in self.markets.items():
            with mk.lock:
                res = mk.tick(now, cfg.trade_probability)
            active = self._active.get(key)
            if active:
                self._emit(key, mk, res, active, index)

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
                    self._publish(market, name, "aggTrade", symbol, _json.encode(body))
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
                    self._publish(market, name, "partial", symbol, _json.encode(body))
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
                    self._publish(market, name, "bookTicker", symbol, _json.encode(body))
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
        self._publish(market, name, "depth", symbol, _json.encode(body))

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
        self._publish(market, name, "kline", k.symbol, _json.encode(body))

    # -- fan-out ----------------------------------------------------------------------------

    def _publish(self, market: str, name: str, kind: str, symbol: str, payload: bytes) -> None:
        """Send one event of stream ``name`` to every subscriber (raw or combined, ms or µs)."""
        subs = self._subs.get((market, name))
        if not subs or self._stalled:
            return
        head = b'{"stream":"' + name.encode() + b'","data":'
        variants = _framed(head, payload)
        if any(conn.micro for conn in subs):
            variants += _framed(head, _to_micro(payload))
        fault = self.faults.take_message_fault()
        if fault:
            self.counters.incr(f"fault_{fault}", symbol, kind)
            if fault == "malformed":
                junk = head + b'{"e":'
                bad = wire.text_header(len(junk)) + junk
                for conn in list(subs):
                    self._send(conn, bad, "malformed", symbol)
            elif fault == "reorder":
                # Hold this message back; it goes out right after the next one.
                self._held[(market, name)] = list(variants)
                return
        frames = [variants]
        if fault == "duplicate":
            frames.append(variants)
        held = self._held.pop((market, name), None)
        if held is not None:
            frames.append(tuple(held))
        for conn in list(subs):
            index = (2 if conn.micro else 0) + (1 if conn.combined else 0)
            for variant in frames:
                if index < len(variant):
                    self._send(conn, variant[index], kind, symbol)

    def _send(self, conn: _Conn, data: bytes, kind: str, symbol: str) -> None:
        if conn.closing:
            return
        conn.transport.write(data)
        conn.sent += 1
        self.counters.incr("ws_messages_sent", symbol, kind)
        if conn.close_after and conn.sent >= conn.close_after:
            self.counters.incr("fault_close_after_messages")
            self._close(conn, conn.close_abrupt, 1000, "closed by simulator fault")
        elif conn.transport.get_write_buffer_size() > self.config.write_buffer_limit:
            self.counters.incr("ws_slow_client_disconnects")
            self._close(conn, True)

    # -- connections ------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._transports.add(writer.transport)
        try:
            while True:
                try:
                    req = await asyncio.wait_for(wire.read_request(reader), 120)
                except wire.ProtocolError as exc:
                    self.counters.incr("http_bad_requests")
                    body = ApiError(-1, str(exc), exc.code).body()
                    writer.write(wire.http_response(exc.code, body, keep_alive=False))
                    break
                except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                    break
                if req is None:
                    break
                if req.is_websocket:
                    await self._websocket(req, reader, writer)
                    break
                if not await self._rest(req, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only aclose() (or the loop shutting down) cancels a handler, and then nobody
            # waits for its result. Ending normally matters: asyncio's own done-callback
            # for start_server handlers calls task.exception(), which on a cancelled task
            # raises and is logged as "Exception in callback ... CancelledError" (3.11,
            # 3.12; 3.13 checks task.cancelled() first).
            pass
        except Exception:
            self.counters.incr("sim_internal_errors")
            log.exception("simulator connection handler failed")
        finally:
            if task is not None:
                self._handlers.discard(task)
            self._transports.discard(writer.transport)
            if not writer.transport.is_closing():
                writer.close()

    def _route(self, path: str) -> tuple[str, str, str] | None:
        """``(market, route, rest)`` for a WebSocket path, ``None`` if unknown."""
        market, route = "spot", "all"
        if path.startswith("/fstream"):
            market, route, path = "usdm", "public", path[len("/fstream") :]
        for prefix in ("/public", "/market"):
            if path.startswith(prefix + "/"):
                market, route, path = "usdm", prefix[1:], path[len(prefix) :]
                break
        if path == "/stream" or path == "/ws" or path.startswith("/ws/"):
            return market, route, path
        return None

    async def _websocket(
        self, req: wire.Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        cfg = self.config
        routed = self._route(req.path)
        if routed is None:
            self.counters.incr("ws_bad_paths")
            writer.write(
                wire.http_response(404, b'{"code":-1,"msg":"Not found."}', None, keep_alive=False)
            )
            return
        market, route, rest = routed
        if rest == "/stream":
            names = [n for k, v in req.query if k == "streams" for n in v.split("/") if n]
            combined = True
        else:
            names = [n for n in rest[len("/ws/") :].split("/") if n] if rest != "/ws" else []
            combined = False
        error = self._validate_streams(market, names, 0)
        unit = [v for k, v in req.query if k == "timeUnit"]
        if unit and (market != "spot" or unit[-1].upper() not in ("MICROSECOND", "MILLISECOND")):
            error = f"Invalid request: invalid timeUnit {unit[-1]!r}"
        if error:
            self.counters.incr("ws_bad_handshakes")
            writer.write(
                wire.http_response(400, _json.encode({"code": 2, "msg": error}), keep_alive=False)
            )
            return
        try:
            writer.write(wire.handshake_response(req))
        except wire.ProtocolError as exc:
            self.counters.incr("ws_bad_handshakes")
            body = _json.encode({"code": -1, "msg": str(exc)})
            writer.write(wire.http_response(exc.code, body, keep_alive=False))
            return
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        conn = _Conn(transport, market, route, req.target)
        conn.combined = combined
        conn.micro = bool(unit) and unit[-1].upper() == "MICROSECOND"
        ping_interval = cfg.ping_interval_s or _MARKET_DEFAULTS[market][0]
        conn.next_ping = conn.created + ping_interval
        if self.config.faults.close_after_messages:
            conn.close_after = self.config.faults.close_after_messages
            conn.close_abrupt = self.config.faults.abrupt
        self._conns.add(conn)
        self.counters.incr("ws_connections")
        self.counters.set("ws_open_connections", len(self._conns))
        self._subscribe(conn, names)
        replay_task = None
        if self.replay is not None:
            replay_task = asyncio.create_task(self.replay.play(self, conn))
        try:
            await self._read_loop(conn, reader)
        finally:
            if replay_task is not None:
                replay_task.cancel()
            self._drop_conn(conn)

    def _validate_streams(self, market: str, names: list[str], existing: int) -> str:
        if existing + len(names) > self.config.max_streams:
            return f"Invalid request: too many streams (max {self.config.max_streams})"
        for name in names:
            if self.replay is not None:
                if not re.match(r"^[a-z0-9_.\-!]+@[A-Za-z0-9_@]+$", name):
                    return f"Invalid request: invalid stream name {name!r}"
            elif parse_stream(name, market) is None:
                return f"Invalid request: invalid stream name {name!r}"
        return ""

    def _subscribe(self, conn: _Conn, names: list[str]) -> None:
        self._subs_version += 1
        for name in names:
            if name in conn.streams:
                continue
            spec = None if self.replay is not None else parse_stream(name, conn.market)
            conn.streams[name] = spec
            if spec is not None and conn.route != "all" and spec.route != conn.route:
                # Binance accepts it but never delivers: wrong route for this stream kind.
                self.counters.incr("ws_unrouted_streams", spec.symbol, spec.kind)
                continue
            if spec is not None and (conn.market, spec.symbol) not in self.markets:
                self.counters.incr("ws_unknown_symbol_streams", spec.symbol)
                if self.high_rate is None:
                    continue
            subs = self._subs.setdefault((conn.market, name), set())
            subs.add(conn)
            if spec is not None:
                self._active.setdefault((conn.market, spec.symbol), {})[name] = spec
                self._init_stream_state(conn.market, name, spec)

    def _init_stream_state(self, market: str, name: str, spec: StreamSpec) -> None:
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

    def _unsubscribe(self, conn: _Conn, names: list[str]) -> None:
        self._subs_version += 1
        for name in names:
            spec = conn.streams.pop(name, None)
            subs = self._subs.get((conn.market, name))
            if subs is None or conn not in subs:
                continue
            subs.discard(conn)
            if not subs:
                del self._subs[(conn.market, name)]
                self._depth.pop((conn.market, name), None)
                self._klines.pop((conn.market, name), None)
                self._book_tops.pop((conn.market, name), None)
                self._held.pop((conn.market, name), None)
                if spec is not None:
                    active = self._active.get((conn.market, spec.symbol), {})
                    active.pop(name, None)
                    if not active:
                        self._active.pop((conn.market, spec.symbol), None)

    def _drop_conn(self, conn: _Conn) -> None:
        conn.closing = True
        self._unsubscribe(conn, list(conn.streams))
        self._conns.discard(conn)
        self.counters.set("ws_open_connections", len(self._conns))

    async def _read_loop(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        cfg = self.config
        limit = cfg.incoming_limit or _MARKET_DEFAULTS[conn.market][2]
        fragments: list[bytes] = []
        while not conn.closing:
            try:
                fin, opcode, payload = await wire.read_frame(reader, cfg.max_frame_bytes)
            except wire.ProtocolError as exc:
                self.counters.incr("ws_protocol_errors")
                self._close(conn, False, exc.code, str(exc))
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            now = time.monotonic()
            if opcode != wire.OP_CLOSE:  # pings, pongs and messages count; a goodbye does not
                conn.incoming.append(now)
            while conn.incoming and conn.incoming[0] <= now - 1.0:
                conn.incoming.popleft()
            if len(conn.incoming) > limit:
                self.counters.incr("ws_rate_limit_disconnects")
                self._close(conn, False, 1008, "Too many messages")
                return
            if opcode == wire.OP_PING:
                conn.transport.write(wire.frame(payload, wire.OP_PONG))
            elif opcode == wire.OP_PONG:
                if conn.ping_payload is not None and payload == conn.ping_payload:
                    conn.ping_payload = None
                else:
                    self.counters.incr("ws_unsolicited_pongs")
            elif opcode == wire.OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
                if not conn.closing:
                    conn.closing = True
                    conn.transport.write(wire.close_frame(code if code != 1005 else 1000))
                conn.transport.close()
                return
            else:
                if opcode != wire.OP_CONT:
                    fragments = []
                fragments.append(payload)
                if sum(map(len, fragments)) > cfg.max_frame_bytes:
                    self.counters.incr("ws_protocol_errors")
                    self._close(conn, False, 1009, "message too big")
                    return
                if fin:
                    message, fragments = b"".join(fragments), []
                    self._control(conn, message)

    # -- control messages -------------------------------------------------------------------

    def _reply(self, conn: _Conn, body: dict) -> None:
        if not conn.closing:
            conn.transport.write(wire.frame(_json.encode(body)))

    def _error(self, conn: _Conn, code: int, msg: str, req_id: Any = None) -> None:
        self.counters.incr("ws_control_errors", "", str(code))
        self._reply(conn, {"code": code, "msg": msg, "id": req_id})

    def _valid_id(self, market: str, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if market == "usdm":
            return isinstance(value, int) and 0 <= value < 1 << 64
        if value is None:
            return True
        if isinstance(value, int):
            return -(1 << 63) <= value < 1 << 63
        return isinstance(value, str) and bool(_ID_STR.match(value))

    def _control(self, conn: _Conn, message: bytes) -> None:
        self.counters.incr("ws_control_messages")
        try:
            req = msgspec.json.decode(message)
        except msgspec.DecodeError as exc:
            m = _JSON_POS.search(str(exc))
            col = int(m.group(1)) + 1 if m else 1
            self._error(conn, 3, f"Invalid JSON: expected value at line 1 column {col}")
            return
        if not isinstance(req, dict):
            self._error(conn, 2, "Invalid request: expected a JSON object")
            return
        req_id = req.get("id")
        if "method" not in req:
            self._error(conn, 2, "Invalid request: missing field `method`", req_id)
            return
        method = req["method"]
        if method not in _METHODS:
            self._error(
                conn,
                2,
                f"Invalid request: unknown variant `{method}`, expected one of "
                + ", ".join(f"`{m}`" for m in _METHODS),
                req_id,
            )
            return
        if "id" not in req or not self._valid_id(conn.market, req_id):
            self._error(conn, 2, "Invalid request: request ID must be an unsigned integer")
            return
        params = req.get("params", [])
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                self._error(conn, 2, "Invalid request: params must be stream names", req_id)
                return
            if method == "SUBSCRIBE":
                new = [p for p in dict.fromkeys(params) if p not in conn.streams]
                error = self._validate_streams(conn.market, new, len(conn.streams))
                if error:
                    self._error(conn, 2, error, req_id)
                    return
                self._subscribe(conn, new)
            else:
                self._unsubscribe(conn, params)
            self._reply(conn, {"result": None, "id": req_id})
        elif method == "LIST_SUBSCRIPTIONS":
            if params:
                self._error(conn, 2, "Invalid request: too many parameters", req_id)
                return
            self._reply(conn, {"result": list(conn.streams), "id": req_id})
        else:
            want = 2 if method == "SET_PROPERTY" else 1
            if not isinstance(params, list) or len(params) > want:
                self._error(conn, 2, "Invalid request: too many parameters", req_id)
                return
            if not params or not isinstance(params[0], str):
                self._error(conn, 2, "Invalid request: property name must be a string", req_id)
                return
            if params[0] != "combined":
                self._error(conn, 0, "Unknown property", req_id)
                return
            if method == "GET_PROPERTY":
                self._reply(conn, {"result": conn.combined, "id": req_id})
                return
            if len(params) < 2 or not isinstance(params[1], bool):
                self._error(conn, 1, "Invalid value type: expected Boolean", req_id)
                return
            conn.combined = params[1]
            self._reply(conn, {"result": None, "id": req_id})

    # -- closing, pings, age ----------------------------------------------------------------

    def _close(self, conn: _Conn, abrupt: bool, code: int = 1000, reason: str = "") -> None:
        if conn.closing:
            return
        conn.closing = True
        if abrupt:
            conn.transport.abort()
            return
        conn.transport.write(wire.close_frame(code, reason))
        loop = self._loop
        if loop is not None:
            # The client answers with its own close frame; do not wait for it forever.
            loop.call_later(1.0, conn.transport.close)

    def _close_matching(self, abrupt: bool, match: str) -> None:
        for conn in list(self._conns):
            if match in conn.path:
                self.counters.incr("fault_connections_closed")
                self._close(conn, abrupt, 1000, "closed by simulator fault")

    def _close_after(self, count: int, abrupt: bool) -> None:
        for conn in list(self._conns):
            conn.close_after = conn.sent + count
            conn.close_abrupt = abrupt

    def _shutdown_all(self, grace_s: float) -> None:
        now = self.now_ms()
        payload = _json.encode({"e": "serverShutdown", "E": now})
        wrapped = b'{"stream":"!serverShutdown","data":' + payload + b"}"
        conns = [c for c in self._conns if not c.closing]
        for conn in conns:
            conn.transport.write(wire.frame(wrapped if conn.combined else payload))
        self.counters.incr("server_shutdowns")
        assert self._loop is not None

        def _later() -> None:
            for conn in conns:
                self._close(conn, False, 1001, "server shutdown")

        self._loop.call_later(grace_s, _later)

    async def _housekeeping(self) -> None:
        cfg = self.config
        periods = [cfg.max_connection_age_s]
        for market in ("spot", "usdm"):
            periods.append(cfg.ping_interval_s or _MARKET_DEFAULTS[market][0])
            periods.append(cfg.pong_timeout_s or _MARKET_DEFAULTS[market][1])
        period = min(1.0, max(0.01, min(periods) / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            stalled = self.faults.stalled()
            for conn in list(self._conns):
                if conn.closing:
                    continue
                if now - conn.created >= cfg.max_connection_age_s:
                    self.counters.incr("ws_max_age_closes")
                    self._close(conn, False, 1000, "max connection age")
                    continue
                if conn.ping_payload is not None and now > conn.ping_deadline:
                    self.counters.incr("ws_pong_timeouts")
                    self._close(conn, False, 1008, "pong timeout")
                    continue
                if stalled or now < conn.next_ping:
                    continue
                conn.next_ping = now + (cfg.ping_interval_s or _MARKET_DEFAULTS[conn.market][0])
                if conn.ping_payload is None:
                    conn.ping_payload = str(self.now_ms()).encode()
                    conn.ping_deadline = now + (
                        cfg.pong_timeout_s or _MARKET_DEFAULTS[conn.market][1]
                    )
                    conn.transport.write(wire.frame(conn.ping_payload, wire.OP_PING))
                    self.counters.incr("ws_pings_sent")

    async def _planned_faults(self) -> None:
        plan = self.config.faults
        start = time.monotonic()
        stall_done = False
        next_close = start + plan.close_every_s if plan.close_every_s else math.inf
        next_shutdown = start + plan.shutdown_every_s if plan.shutdown_every_s else math.inf
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if now >= next_close:
                next_close += plan.close_every_s
                self._close_matching(plan.abrupt, "")
            if now >= next_shutdown:
                next_shutdown += plan.shutdown_every_s
                self._shutdown_all(self.config.shutdown_grace_s)
            if plan.stall_after_s and not stall_done and now - start >= plan.stall_after_s:
                stall_done = True
                self.counters.incr("fault_stalls")
                self.faults.stall(plan.stall_for_s)

    # -- REST -------------------------------------------------------------------------------

    def _weight_state(self, market: str) -> list[float]:
        window = self.config.weight_window_s
        idx = math.floor(time.monotonic() / window)
        state = self._weights.get(market)
        if state is None or state[0] != idx:
            banned = state[3] if state else 0.0
            state = self._weights[market] = [idx, 0, 0, banned]
        return state

    async def _rest(self, req: wire.Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one REST request; returns whether to keep the connection open."""
        keep = req.keep_alive
        path = req.path
        self.counters.incr("rest_requests", "", path)
        if path.startswith("/api/v3/"):
            market, endpoint = "spot", path[len("/api/v3/") :]
        elif path.startswith("/fapi/v1/"):
            market, endpoint = "usdm", path[len("/fapi/v1/") :]
        else:
            market, endpoint = "", ""
        if self.replay is not None:
            found = self.replay.rest_answer(path, req.query)
            if found is not None:
                writer.write(
                    wire.http_response(200, found, [("X-MBX-USED-WEIGHT-1M", "1")], keep_alive=keep)
                )
                return keep
        if not market:
            self.counters.incr("rest_not_found")
            body = _json.encode({"code": -1, "msg": f"Path {path} not found."})
            writer.write(wire.http_response(404, body, keep_alive=keep))
            return keep
        if req.method != "GET":
            body = _json.encode({"code": -1, "msg": "Method not allowed."})
            writer.write(wire.http_response(405, body, keep_alive=keep))
            return keep
        state = self._weight_state(market)
        fault = self.faults.take_rest_fault(path)
        if fault is not None:
            self.counters.incr("fault_rest", "", str(fault.status))
            if fault.status == 0:
                await asyncio.sleep(fault.delay_s)
                writer.transport.abort()
                return False
            headers = [("X-MBX-USED-WEIGHT-1M", str(int(state[1])))]
            if fault.retry_after is not None:
                headers.append(("Retry-After", str(fault.retry_after)))
            writer.write(
                wire.http_response(
                    fault.status, _fault_body(fault.status), headers, keep_alive=keep
                )
            )
            return keep
        now = time.monotonic()
        limit = self.config.weight_limit_spot if market == "spot" else self.config.weight_limit_usdm
        if state[3] > now:
            self.counters.incr("rest_418", "", market)
            retry = max(1, math.ceil(state[3] - now))
            body = _json.encode(
                {
                    "code": -1003,
                    "msg": f"Way too much request weight used; IP banned until "
                    f"{int(self.now_ms() + retry * 1000)}. Please use WebSocket Streams "
                    "for live updates to avoid bans.",
                }
            )
            headers = [("X-MBX-USED-WEIGHT-1M", str(int(state[1]))), ("Retry-After", str(retry))]
            writer.write(wire.http_response(418, body, headers, keep_alive=keep))
            return keep
        params = dict(req.query)
        weight = request_weight(market, endpoint, params)
        if state[1] + weight > limit:
            state[2] += 1
            window = self.config.weight_window_s
            if state[2] > self.config.ban_after_429s:
                state[3] = now + self.config.ban_s
                self.counters.incr("rest_bans", "", market)
                return await self._rest(req, writer)
            self.counters.incr("rest_429", "", market)
            retry = max(1, math.ceil((state[0] + 1) * window - now))
            body = _json.encode(
                {
                    "code": -1003,
                    "msg": f"Too much request weight used; current limit is {limit} request "
                    "weight per 1 MINUTE. Please use WebSocket Streams for live updates to "
                    "avoid polling the API.",
                }
            )
            headers = [("X-MBX-USED-WEIGHT-1M", str(int(state[1]))), ("Retry-After", str(retry))]
            writer.write(wire.http_response(429, body, headers, keep_alive=keep))
            return keep
        state[1] += weight
        headers = [("X-MBX-USED-WEIGHT-1M", str(int(state[1])))]
        try:
            micro = req.headers.get("x-mbx-time-unit", "").upper() == "MICROSECOND"
            body = self.rest.handle(market, endpoint, req.query, micro)
            status = 200
        except ApiError as exc:
            self.counters.incr("rest_errors", "", str(exc.code))
            body, status = exc.body(), exc.status
        if status == 200 and endpoint == "depth":
            delay = self.faults.take_snapshot_delay()
            if delay:
                self.counters.incr("fault_slow_snapshots")
                await asyncio.sleep(delay)
        writer.write(wire.http_response(status, body, headers, keep_alive=keep))
        return keep


def _fault_body(status: int) -> bytes:
    if status == 429:
        return _json.encode({"code": -1003, "msg": "Too many requests queued."})
    if status == 418:
        return _json.encode({"code": -1003, "msg": "Way too much request weight used; IP banned."})
    if status == 403:
        return _json.encode({"code": -1, "msg": "WAF limit violated."})
    if status >= 500:
        return _json.encode(
            {
                "code": -1001,
                "msg": "Internal error; unable to process your request. Please try again.",
            }
        )
    return _json.encode({"code": -1, "msg": "Simulated error."})


def _framed(head: bytes, payload: bytes) -> tuple[bytes, bytes]:
    """(raw frame, combined frame) for one event payload."""
    wrapped = head + payload + b"}"
    return wire.text_header(len(payload)) + payload, wire.text_header(len(wrapped)) + wrapped


def _to_micro(payload: bytes) -> bytes:
    """The same event with its times in µs (spot ``timeUnit=MICROSECOND``)."""
    body = msgspec.json.decode(payload)
    if isinstance(body, dict):
        for key in ("E", "T"):
            if isinstance(body.get(key), int):
                body[key] *= 1000
        k = body.get("k")
        if isinstance(k, dict):
            for key in ("t", "T"):
                k[key] *= 1000
    return _json.encode(body)
