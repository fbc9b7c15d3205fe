"""The Binance adapter and the aggtrade/kline/depth stream types against the simulator.

Everything runs in-process on loopback: the simulator (``streamer.testing.sim``), the
adapter, and a small harness standing in for the runtime (it routes records by channel,
forwards reconnects, and collects what the stream types emit). Each test injects faults
and compares the output with ``sim.truth``: every aggTrade id and every closed kline
exactly once, no duplicates, no gaps.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import msgspec
import pytest

pytest.importorskip("streamer.testing.sim", reason="the simulator has not landed yet")

from streamer.core.api import ExchangeContext, StreamContext, StreamKey
from streamer.core.counters import Counters
from streamer.core.records import DepthUpdate, Kline, Marker, Record, Trade
from streamer.plugins.exchanges.binance import BinanceAdapter, BinanceOptions
from streamer.plugins.exchanges.binance.decode import FrameDecoder
from streamer.plugins.streams.aggtrade import AggTradeOptions, AggTradeStream
from streamer.plugins.streams.depth import DepthOptions, DepthStream
from streamer.plugins.streams.kline import KlineOptions, KlineStream
from streamer.testing.sim import SimConfig, SimServer

pytestmark = pytest.mark.anyio
LOG = logging.getLogger("test.binance.sim")
_CHANNEL = {Trade: "trade", Kline: "kline", DepthUpdate: "depth"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(params=["protocol", "connection"])
def ws_impl(request) -> str:
    """The connection fault tests run on both receive paths (``connection`` for one release)."""
    return request.param


class Harness:
    """Adapter + stream types wired like a collector worker, collecting the output."""

    def __init__(self, sim: SimServer, market: str, symbols: list[str], *, intervals=("1s",),
                 depth: bool = False, resume: dict | None = None, **options) -> None:  # fmt: skip
        self.sim = sim
        self.market = market
        self.symbols = symbols
        self.counters = Counters()
        self.out: list[Record] = []
        self.reconnects: list[tuple[tuple[str, ...], str]] = []
        raw = {
            "market": market,
            "rest_url": sim.rest_url,
            "ws_url": sim.ws_url if market == "spot" else sim.usdm_ws_url,
            **options,
        }
        self.adapter = BinanceAdapter(
            msgspec.convert(raw, BinanceOptions),
            ExchangeContext(pipeline="t", counters=self.counters, logger=LOG),
        )
        self.streams = [self._stream(AggTradeStream, AggTradeOptions(), resume)]
        if intervals:
            self.streams.append(
                self._stream(KlineStream, KlineOptions(intervals=list(intervals)), resume)
            )
        if depth:
            self.streams.append(self._stream(DepthStream, DepthOptions(), resume))

    def _stream(self, cls, options, resume):
        ctx = StreamContext(
            pipeline="t", exchange=self.adapter, symbols=self.symbols, emit=self.out.append,
            counters=self.counters, logger=LOG, resume=dict(resume or {}),
        )  # fmt: skip
        return cls(options, ctx)

    # Inbox
    def on_record(self, record: Record) -> None:
        channel = _CHANNEL[type(record)]
        for stream in self.streams:
            if channel in stream.channels:
                stream.on_record(record)

    def on_reconnect(self, symbols, reason: str) -> None:
        self.reconnects.append((tuple(symbols), reason))
        for stream in self.streams:
            stream.on_reconnect(symbols, reason)

    async def run(self, scenario: Callable[[Harness], Awaitable[None]]) -> None:
        subs = sorted({s for stream in self.streams for s in stream.subscriptions()})
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.adapter.stream, subs, self)
                for stream in self.streams:
                    tg.start_soon(stream.run)
                with anyio.fail_after(25):
                    await scenario(self)
                tg.cancel_scope.cancel()
        finally:
            await self.adapter.aclose()

    async def wait_for(self, condition, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                await anyio.sleep(0.02)

    # Results
    def trades(self, symbol: str) -> list[Trade]:
        return [r for r in self.out if isinstance(r, Trade) and r.symbol == symbol]

    def closed(self, symbol: str) -> list[Kline]:
        return [r for r in self.out if isinstance(r, Kline) and r.symbol == symbol]

    def markers(self, kind: str | None = None) -> list[Marker]:
        return [r for r in self.out if isinstance(r, Marker) and kind in (None, r.kind)]

    def truth_ids(self, symbol: str) -> list[int]:
        return [t.trade_id for t in self.sim.truth.trades(self.market, symbol)]

    async def caught_up(self, symbol: str) -> None:
        """Wait until the output holds every trade the simulator generated up to now."""
        target = self.truth_ids(symbol)[-1]
        await self.wait_for(
            lambda: (t := self.trades(symbol)) and t[-1].trade_id >= target, timeout=15
        )

    def assert_exact(self, symbol: str, interval: str | None = "1s") -> None:
        trades = self.trades(symbol)
        assert trades, f"no trades for {symbol}"
        got = [t.trade_id for t in trades]
        assert len(got) == len(set(got)), f"{symbol}: duplicate aggTrade ids"
        truth = {t.trade_id: t for t in self.sim.truth.trades(self.market, symbol)}
        expected = [i for i in sorted(truth) if got[0] <= i <= got[-1]]
        assert got == expected, f"{symbol}: aggTrade ids differ from the simulator's truth"
        for t in trades:
            ref = truth[t.trade_id]
            assert (t.price, t.quantity, t.transact_time, t.is_buyer_maker) == (
                ref.price, ref.quantity, ref.transact_time, ref.is_buyer_maker
            )  # fmt: skip
        if interval is None:
            return
        klines = self.closed(symbol)
        assert klines, f"no closed klines for {symbol}"
        opens = [k.open_time for k in klines]
        assert len(opens) == len(set(opens)), f"{symbol}: duplicate klines"
        ref_k = {k.open_time: k for k in self.sim.truth.closed_klines(self.market, symbol,
                                                                       interval)}  # fmt: skip
        assert opens == [t for t in sorted(ref_k) if opens[0] <= t <= opens[-1]]
        for k in klines:
            r = ref_k[k.open_time]
            assert (k.open, k.high, k.low, k.close, k.volume, k.count) == (
                r.open, r.high, r.low, r.close, r.volume, r.count
            )  # fmt: skip


def sim_config(**kw) -> SimConfig:
    base = {"seed": 7, "spot_symbols": ["BTCUSDT", "ETHUSDT", "BNBUSDT"],
            "usdm_symbols": ["BTCUSDT", "ETHUSDT"], "tick_ms": 20, "history_s": 5.0}  # fmt: skip
    base.update(kw)
    return SimConfig(**base)


async def test_spot_faults_leave_no_gap_and_no_duplicate(ws_impl):
    async with SimServer(sim_config()) as sim:
        h = Harness(sim, "spot", ["BTCUSDT", "ETHUSDT", "BNBUSDT"], depth=True,
                    no_data_timeout="1s", reconnect_backoff_max="1s", ws_impl=ws_impl)  # fmt: skip

        async def scenario(h: Harness) -> None:
            await h.wait_for(lambda: len(h.trades("BTCUSDT")) > 20)
            sim.faults.drop_aggtrades("BTCUSDT", 5)
            sim.faults.drop_aggtrades("ETHUSDT", 3)
            await anyio.sleep(0.5)
            sim.faults.close_connections()  # clean close
            await anyio.sleep(1.0)
            sim.faults.close_connections(abrupt=True)  # TCP reset
            await anyio.sleep(1.0)
            sim.faults.rest_error(429, count=1, retry_after=1, path="aggTrades")
            sim.faults.drop_aggtrades("BNBUSDT", 4)
            sim.faults.malformed_frames(3)
            await anyio.sleep(1.5)
            sim.faults.duplicate(20)
            await anyio.sleep(1.5)
            for symbol in h.symbols:
                await h.caught_up(symbol)

        await h.run(scenario)
        for symbol in h.symbols:
            h.assert_exact(symbol)
        assert h.markers("unfillable") == []
        assert h.markers("filled"), "dropped aggTrades were filled from REST"
        assert h.counters.get("ws_reconnects") >= 2
        assert h.counters.total("malformed_frames") >= 1
        assert h.counters.get("rest_429") == 1
        assert len(h.reconnects) >= 2
        depth = [r for r in h.out if isinstance(r, DepthUpdate)]
        assert depth and all(r.market == "spot" for r in depth)


async def test_usdm_routes_and_server_shutdown_replacement(ws_impl):
    async with SimServer(sim_config()) as sim:
        h = Harness(sim, "usdm", ["BTCUSDT", "ETHUSDT"], intervals=("1m",), depth=True,
                    ws_impl=ws_impl)  # fmt: skip
        groups = h.adapter.stream_groups(
            sorted({s for st in h.streams for s in st.subscriptions()})
        )
        assert sorted(g.url.split("/fstream")[1].split("?")[0] for g in groups) == [
            "/market/stream", "/public/stream"
        ]  # fmt: skip

        async def scenario(h: Harness) -> None:
            await h.wait_for(lambda: len(h.trades("BTCUSDT")) > 10)
            sim.faults.server_shutdown(grace_s=1.0)
            await anyio.sleep(2.0)
            sim.faults.drop_aggtrades("ETHUSDT", 4)
            await anyio.sleep(1.0)
            for symbol in h.symbols:
                await h.caught_up(symbol)

        await h.run(scenario)
        for symbol in h.symbols:
            h.assert_exact(symbol, interval=None)
        assert h.counters.get("ws_server_shutdowns") >= 2  # both routes
        assert h.counters.get("ws_rotations") >= 2, "replaced make-before-break"
        depth = [r for r in h.out if isinstance(r, DepthUpdate)]
        assert depth and all(r.prev_update_id is not None for r in depth)
        assert h.markers("unfillable") == []


async def test_forced_rotation_is_make_before_break(ws_impl):
    async with SimServer(sim_config()) as sim:
        h = Harness(sim, "spot", ["BTCUSDT", "ETHUSDT"], depth=True, ws_impl=ws_impl)

        async def scenario(h: Harness) -> None:
            await h.wait_for(lambda: len(h.trades("BTCUSDT")) > 10)
            assert h.adapter.connections is not None
            before = h.counters.get("ws_connects")
            h.adapter.connections.request_rotation()
            await h.wait_for(lambda: h.counters.get("ws_rotations") >= 1)
            assert h.counters.get("ws_connects") == before + 1
            await anyio.sleep(1.0)
            for symbol in h.symbols:
                await h.caught_up(symbol)

        await h.run(scenario)
        for symbol in h.symbols:
            h.assert_exact(symbol)
        assert h.reconnects == [], "a rotation loses nothing, so no reconnect is reported"
        assert h.counters.get("ws_reconnects") == 0
        assert h.markers("unfillable") == [] and h.markers("gap") == []
        # Both connections delivered during the overlap; the stream types dropped the copies.
        assert h.counters.get("depth_duplicates", "BTCUSDT", "depth") > 0


async def test_stall_trips_the_watchdog_and_recovers(ws_impl):
    async with SimServer(sim_config()) as sim:
        h = Harness(sim, "spot", ["BTCUSDT"], no_data_timeout="1s",
                    reconnect_backoff_max="500ms", ws_impl=ws_impl)  # fmt: skip

        async def scenario(h: Harness) -> None:
            await h.wait_for(lambda: len(h.trades("BTCUSDT")) > 10)
            sim.faults.stall(2.5)
            await h.wait_for(lambda: h.counters.get("ws_stalls") >= 1)
            await anyio.sleep(2.5)
            await h.caught_up("BTCUSDT")

        await h.run(scenario)
        h.assert_exact("BTCUSDT")
        assert h.counters.get("ws_stalls") >= 1
        assert any("stall" in reason for _, reason in h.reconnects)


async def test_restart_resumes_from_holdings_without_gap_or_duplicate():
    async with SimServer(sim_config(spot_symbols=["BTCUSDT"])) as sim:
        first = Harness(sim, "spot", ["BTCUSDT"], intervals=("1s",))

        async def run_a_bit(h: Harness) -> None:
            await h.wait_for(lambda: len(h.trades("BTCUSDT")) > 20 and len(h.closed("BTCUSDT")) > 1)

        await first.run(run_a_bit)
        last_id = first.trades("BTCUSDT")[-1].trade_id
        last_open = first.closed("BTCUSDT")[-1].open_time
        await anyio.sleep(2.0)  # "down" while the market moves on
        resume = {
            StreamKey("binance", "spot", "BTCUSDT", "aggtrade"): last_id,
            StreamKey("binance", "spot", "BTCUSDT", "kline_1s"): last_open,
        }
        second = Harness(sim, "spot", ["BTCUSDT"], resume=resume)

        async def catch_up(h: Harness) -> None:
            await anyio.sleep(1.0)
            await h.caught_up("BTCUSDT")

        await second.run(catch_up)
        assert second.trades("BTCUSDT")[0].trade_id == last_id + 1
        assert second.closed("BTCUSDT")[0].open_time == last_open + 1000
        combined = Harness(sim, "spot", ["BTCUSDT"])
        combined.out = first.out + second.out
        combined.assert_exact("BTCUSDT")
        assert [m.reason for m in second.markers("filled")][:1] == ["restart"]


async def test_unknown_symbol_and_unsupported_interval_are_startup_errors():
    async with SimServer(sim_config()) as sim:
        h = Harness(sim, "usdm", ["BTCUSDT"], intervals=())
        with pytest.raises(ValueError, match="NOPEUSDT"):
            await h.adapter.resolve_symbols(["BTCUSDT", "NOPEUSDT"])
        assert await h.adapter.resolve_symbols(["BTCUSDT", "DEADUSDT"]) == ["BTCUSDT"]
        with pytest.raises(ValueError, match="1s"):
            h._stream(KlineStream, KlineOptions(intervals=["1s"]), None)
        await h.adapter.aclose()


DATA = Path(__file__).resolve().parent / "data"


def _ws_payload(frame: bytes) -> bytes:
    """The payload of one unmasked server WebSocket frame (the replay stores them framed)."""
    size = frame[1] & 0x7F
    return frame[{126: 4, 127: 10}.get(size, 2) :]


@pytest.mark.parametrize(
    ("capture", "market"),
    [("BINANCE_FUTURES", "usdm"), ("BINANCE_US", "spot"), ("BINANCE", "spot")],
)
async def test_replayed_capture_yields_every_recorded_aggtrade_and_closed_kline(capture, market):
    cfg = SimConfig(replay=capture, replay_speed=0, data_dir=str(DATA))
    async with SimServer(cfg) as sim:
        decoder = FrameDecoder(market)
        expected_trades, expected_klines, symbols = [], [], set()
        for frame in sim.replay.frames:
            if "@aggTrade" in frame.stream or "@kline_1m" in frame.stream:
                record = decoder.decode(_ws_payload(frame.combined_frame), 0)
                symbols.add(record.symbol)
                if isinstance(record, Trade):
                    expected_trades.append(record)
                elif record.closed:
                    expected_klines.append(record)
        h = Harness(sim, market, sorted(symbols), intervals=("1m",), no_data_timeout="60s")

        def done() -> bool:
            got = sum(isinstance(r, Trade) for r in h.out)
            return got >= len(expected_trades) and sum(isinstance(r, Kline) for r in h.out) >= len(
                expected_klines
            )

        async def scenario(h: Harness) -> None:
            await h.wait_for(done)
            await anyio.sleep(0.2)

        await h.run(scenario)

    def key(r):
        return msgspec.structs.replace(r, receive_time=0)

    trades = [key(r) for r in h.out if isinstance(r, Trade)]
    klines = [key(r) for r in h.out if isinstance(r, Kline)]
    by_symbol = sorted(expected_trades, key=lambda t: (t.symbol, t.trade_id))
    assert sorted(trades, key=lambda t: (t.symbol, t.trade_id)) == [key(t) for t in by_symbol]
    assert sorted(klines, key=lambda k: k.symbol) == sorted(
        (key(k) for k in expected_klines), key=lambda k: k.symbol
    )
    assert h.markers() == [], "a recorded capture has no gap"
    if capture == "BINANCE_FUTURES":
        assert len(klines) == 4 and len([t for t in trades if t.symbol == "SUSHIUSDT"]) == 40
