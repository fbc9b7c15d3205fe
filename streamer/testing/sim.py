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

:class:`SimServer` wires the parts together and owns the port: WebSocket connections
(:mod:`.transport`), Binance's stream request protocol and fan-out (:mod:`.protocol`), the
data source (:mod:`.synthetic`, :mod:`.replay` or :mod:`.highrate`), REST (:mod:`.rest`) and
the faults (:mod:`.faults`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable

import msgspec

from streamer import Counters, Kline, Trade

from . import _wire as wire
from .faults import ConnectionFaults, Faults
from .highrate import HighRateSource
from .market import SymbolMarket, SymbolSpec, make_spec
from .protocol import StreamProtocol
from .replay import ReplaySource
from .rest import ApiError, RestApi, RestFront
from .simconfig import SimConfig
from .synthetic import SyntheticFeed
from .transport import MARKET_DEFAULTS, Connection, Transport, route

__all__ = ["SimConfig", "SimServer", "Truth"]

log = logging.getLogger("streamer.testing.sim")

_json = msgspec.json.Encoder()


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
        self.truth = Truth(self)
        self.markets: dict[tuple[str, str], SymbolMarket] = {}
        self.specs: dict[tuple[str, str], SymbolSpec] = {}
        self.transport = Transport(self.config, self.counters, self.faults.stalled, self.now_ms)
        self._conns = self.transport.conns
        self._connection_faults = ConnectionFaults(
            self.faults, self.transport, self.counters, self.now_ms
        )
        self.protocol = StreamProtocol(
            self.config, self.counters, self.faults, self.transport, self.markets
        )
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._handlers: set[asyncio.Task] = set()
        self._transports: set[asyncio.BaseTransport] = set()
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None
        self.port = 0
        self.replay: ReplaySource | None = None
        self.high_rate: HighRateSource | None = None
        self.feed: SyntheticFeed | None = None
        self._build_markets()
        self.rest = RestApi(
            self.markets,
            self.specs,
            {"spot": self.config.weight_limit_spot, "usdm": self.config.weight_limit_usdm},
            self.now_ms,
        )
        self._rest_front = RestFront(
            self.config, self.counters, self.faults, self.rest, self.now_ms
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
        ticks = self.feed.ticks if self.feed is not None else 0
        return start + ticks * self.config.tick_ms

    async def start(self) -> None:
        """Bind the port and start generating."""
        cfg = self.config
        self._loop = self.transport.loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if cfg.replay:
            self.replay = ReplaySource.load(cfg.replay, cfg.data_dir, cfg.replay_speed)
            self.protocol.parse_names = False
            self._rest_front.recorded = self.replay.rest_answer
        if cfg.high_rate:
            self.high_rate = HighRateSource(
                cfg.high_rate, cfg.high_rate_symbols, cfg.seed, self.specs, self.rest,
                self.protocol, self.transport, self.counters, self.faults,
            )  # fmt: skip
            self.protocol.serve_unknown = True
        elif not cfg.replay:
            self.feed = SyntheticFeed(
                cfg, self.counters, self.faults, self.protocol, self.markets, self.now_ms
            )
            self.feed.pregenerate()
        self._server = await asyncio.start_server(
            self._handle, cfg.host, cfg.port, limit=1 << 20, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.high_rate is not None:
            self._tasks.append(asyncio.create_task(self.high_rate.run()))
        elif self.feed is not None:
            self._tasks.append(asyncio.create_task(self.feed.run()))
        self._tasks.append(asyncio.create_task(self.transport.housekeeping()))
        self._tasks.append(
            asyncio.create_task(self._connection_faults.run_plan(cfg.shutdown_grace_s))
        )

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
                if not await self._rest_front.answer(req, writer):
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

    async def _websocket(
        self, req: wire.Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        cfg = self.config
        routed = route(req.path)
        if routed is None:
            self.counters.incr("ws_bad_paths")
            writer.write(
                wire.http_response(404, b'{"code":-1,"msg":"Not found."}', None, keep_alive=False)
            )
            return
        market, ws_route, rest = routed
        if rest == "/stream":
            names = [n for k, v in req.query if k == "streams" for n in v.split("/") if n]
            combined = True
        else:
            names = [n for n in rest[len("/ws/") :].split("/") if n] if rest != "/ws" else []
            combined = False
        error = self.protocol.validate(market, names, 0)
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
        conn = Connection(transport, market, ws_route, req.target)
        conn.combined = combined
        conn.micro = bool(unit) and unit[-1].upper() == "MICROSECOND"
        ping_interval = cfg.ping_interval_s or MARKET_DEFAULTS[market][0]
        conn.next_ping = conn.created + ping_interval
        if self.config.faults.close_after_messages:
            conn.close_after = self.config.faults.close_after_messages
            conn.close_abrupt = self.config.faults.abrupt
        self.transport.add(conn)
        self.protocol.subscribe(conn, names)
        replay_task = None
        if self.replay is not None:
            replay_task = asyncio.create_task(
                self.replay.play(conn, self.transport, self.faults, self.counters)
            )
        try:
            await self.transport.read_loop(conn, reader, self.protocol.control)
        finally:
            if replay_task is not None:
                replay_task.cancel()
            self.protocol.drop(conn)
