"""aggtrade / depth / kline stream types against a scripted in-memory exchange."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence

import anyio
import msgspec
import pytest

from streamer import next_open_time
from streamer.core.api import (
    ExchangeAdapter,
    ExchangeContext,
    Inbox,
    SequenceRule,
    StreamContext,
    StreamKey,
    Subscription,
    SymbolInfo,
)
from streamer.core.counters import Counters
from streamer.core.records import DepthUpdate, Kline, Marker, Record, Trade
from streamer.plugins.streams.aggtrade import AggTradeOptions, AggTradeStream
from streamer.plugins.streams.depth import DepthOptions, DepthStream
from streamer.plugins.streams.kline import KlineOptions, KlineStream

pytestmark = pytest.mark.anyio
LOG = logging.getLogger("test.streams")
MIN = 60_000


@pytest.fixture
def anyio_backend():
    return "asyncio"


def trade(symbol: str, i: int) -> Trade:
    return Trade("binance", "spot", symbol, i, f"{i}.10", "0.5", i, i, 1000 + i, False, True,
                 1000 + i, 0)  # fmt: skip


def kline(symbol: str, open_time: int, closed: bool = True, close: str = "1.0") -> Kline:
    return Kline("binance", "spot", symbol, "1m", open_time, open_time + MIN - 1, "1.0", "2.0",
                 "0.5", close, "10", "15", 3, "5", "7", closed, open_time + MIN, 0)  # fmt: skip


class FakeExchange(ExchangeAdapter):
    """Serves trades and klines from ``truth``; ``missing`` ids are absent from REST too."""

    exchange = "binance"

    def __init__(self, market: str = "spot") -> None:
        super().__init__(msgspec.Struct(), ExchangeContext(
            pipeline="t", counters=Counters(), logger=LOG))  # fmt: skip
        self.market = market
        self.trades: dict[str, dict[int, Trade]] = {}
        self.klines: dict[str, dict[int, Kline]] = {}
        self.trade_calls: list[tuple[str, int, int | None]] = []
        self.kline_calls: list[tuple[str, str, int, int]] = []
        self.gate: anyio.Event | None = None  # when set, backfills wait for it
        self.fail_next = 0
        self.page = 3
        self.kline_intervals = ("1m", "1h", "1M") if market == "spot" else ("1m",)

    async def list_symbols(self) -> list[SymbolInfo]:
        return []

    async def stream(self, subscriptions: Sequence[Subscription], inbox: Inbox) -> None:
        await anyio.sleep_forever()

    @property
    def sequence_rule(self) -> SequenceRule:
        style = "spot" if self.market == "spot" else "futures"
        return SequenceRule(style=style, max_snapshot_limit=1000)

    async def backfill_trades(
        self, symbol: str, from_id: int, to_id: int | None = None
    ) -> AsyncIterator[list[Trade]]:
        self.trade_calls.append((symbol, from_id, to_id))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("REST down")
        ids = sorted(i for i in self.trades.get(symbol, {}) if i >= from_id)
        if to_id is not None:
            ids = [i for i in ids if i <= to_id]
        for n in range(0, len(ids), self.page):
            await anyio.lowlevel.checkpoint()
            yield [self.trades[symbol][i] for i in ids[n : n + self.page]]

    async def backfill_klines(
        self, symbol: str, interval: str, start_time: int, end_time: int
    ) -> AsyncIterator[list[Kline]]:
        self.kline_calls.append((symbol, interval, start_time, end_time))
        if self.gate is not None:
            await self.gate.wait()
        rows = [k for t, k in sorted(self.klines.get(symbol, {}).items())
                if start_time <= t <= end_time]  # fmt: skip
        if rows:
            yield rows


def make(stream_cls, options, exchange, symbols=("AAA",), resume=None):
    out: list[Record] = []
    counters = Counters()
    ctx = StreamContext(
        pipeline="t", exchange=exchange, symbols=list(symbols), emit=out.append,
        counters=counters, logger=LOG, resume=resume or {},
    )  # fmt: skip
    return stream_cls(options, ctx), out, counters


async def wait_for(condition, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


def ids(out: list[Record], symbol: str = "AAA") -> list[int]:
    return [r.trade_id for r in out if isinstance(r, Trade) and r.symbol == symbol]


def markers(out: list[Record], kind: str | None = None) -> list[Marker]:
    return [r for r in out if isinstance(r, Marker) and (kind is None or r.kind == kind)]


FAST = AggTradeOptions(gap_grace="0ms")

# --------------------------------------------------------------------------- aggtrade


async def test_aggtrade_in_order_with_duplicates_emits_each_once():
    ex = FakeExchange()
    stream, out, _ = make(AggTradeStream, FAST, ex)
    assert stream.subscriptions() == [Subscription("AAA", "trade")]
    for i in [5, 6, 6, 7, 5, 8, 8]:
        stream.on_record(trade("AAA", i))
    assert ids(out) == [5, 6, 7, 8]
    assert ex.trade_calls == [] and markers(out) == []


async def test_aggtrade_fills_dropped_ids_while_live_keeps_flowing():
    ex = FakeExchange()
    ex.trades["AAA"] = {i: trade("AAA", i) for i in range(1, 40)}
    ex.gate = anyio.Event()
    stream, out, counters = make(AggTradeStream, FAST, ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [1, 2, 3, 9, 10]:  # 4..8 dropped
            stream.on_record(trade("AAA", i))
        await wait_for(lambda: ex.trade_calls)
        # One page from the first hole (it would also cover holes opening meanwhile).
        assert ex.trade_calls == [("AAA", 4, 1003)]
        for i in range(11, 20):  # live data arrives during the fill and is held
            stream.on_record(trade("AAA", i))
        assert ids(out) == [1, 2, 3] and stream.held("AAA") == 11
        ex.gate.set()
        await wait_for(lambda: stream.held("AAA") == 0)
        stream.on_record(trade("AAA", 20))
        tg.cancel_scope.cancel()
    assert ids(out) == list(range(1, 21))
    (filled,) = markers(out, "filled")
    assert (filled.first_key, filled.last_key, filled.stream) == (4, 8, "aggtrade")
    assert counters.get("trades_backfilled", "AAA", "aggtrade") == 5
    assert counters.get("gaps_filled", "AAA", "aggtrade") == 1


async def test_aggtrade_unfillable_gap_is_marked_and_skipped():
    ex = FakeExchange()
    ex.trades["AAA"] = {i: trade("AAA", i) for i in range(1, 30) if not 10 <= i <= 12}
    stream, out, counters = make(AggTradeStream, FAST, ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [8, 9, 14, 15]:
            stream.on_record(trade("AAA", i))
        await wait_for(lambda: stream.held("AAA") == 0)
        tg.cancel_scope.cancel()
    assert ids(out) == [8, 9, 13, 14, 15]
    (filled,) = markers(out, "filled")
    (lost,) = markers(out, "unfillable")
    assert (filled.first_key, filled.last_key) == (13, 13)
    assert (lost.first_key, lost.last_key) == (10, 12)
    assert counters.get("gaps_unfillable", "AAA", "aggtrade") == 1


async def test_aggtrade_reconnect_catches_up_a_quiet_symbol():
    ex = FakeExchange()
    ex.trades["AAA"] = {i: trade("AAA", i) for i in range(1, 12)}
    stream, out, _ = make(AggTradeStream, FAST, ex, symbols=("AAA", "BBB"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [1, 2, 3]:
            stream.on_record(trade("AAA", i))
        stream.on_reconnect(["AAA", "BBB"], "disconnect")  # BBB has no position yet
        await wait_for(lambda: ids(out) == list(range(1, 12)))
        tg.cancel_scope.cancel()
    assert ex.trade_calls[0] == ("AAA", 4, None)
    assert all(call[0] == "AAA" for call in ex.trade_calls)
    (filled,) = markers(out)
    assert (filled.kind, filled.first_key, filled.last_key, filled.reason) == (
        "filled",
        4,
        11,
        "disconnect",
    )


async def test_aggtrade_reconnect_without_loss_costs_no_rest_call():
    ex = FakeExchange()
    stream, out, _ = make(AggTradeStream, AggTradeOptions(gap_grace="200ms"), ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [1, 2, 3]:
            stream.on_record(trade("AAA", i))
        stream.on_reconnect(["AAA"], "disconnect")
        stream.on_record(trade("AAA", 3))  # overlap from the new connection
        stream.on_record(trade("AAA", 4))  # live resumed exactly where it stopped
        await anyio.sleep(0.4)
        tg.cancel_scope.cancel()
    assert ids(out) == [1, 2, 3, 4]
    assert ex.trade_calls == [] and markers(out) == []


async def test_aggtrade_reconnect_with_loss_fetches_only_the_gap():
    ex = FakeExchange()
    ex.trades["AAA"] = {i: trade("AAA", i) for i in range(1, 20)}
    stream, out, _ = make(AggTradeStream, AggTradeOptions(gap_grace="100ms"), ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [1, 2, 3]:
            stream.on_record(trade("AAA", i))
        stream.on_reconnect(["AAA"], "disconnect")
        for i in [8, 9]:
            stream.on_record(trade("AAA", i))
        await wait_for(lambda: ids(out) == list(range(1, 10)))
        tg.cancel_scope.cancel()
    assert ex.trade_calls == [("AAA", 4, 1003)]  # a page from the gap: 4..7 used
    assert [(m.first_key, m.last_key, m.reason) for m in markers(out)] == [(4, 7, "disconnect")]


async def test_aggtrade_resumes_from_sink_holdings_without_duplicates():
    ex = FakeExchange()
    ex.trades["AAA"] = {i: trade("AAA", i) for i in range(90, 160)}
    ex.gate = anyio.Event()
    resume = {StreamKey("binance", "spot", "AAA", "aggtrade"): 100}
    stream, out, _ = make(AggTradeStream, FAST, ex, resume=resume)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in range(140, 150):  # live starts before the catch-up finishes
            stream.on_record(trade("AAA", i))
        await wait_for(lambda: ex.trade_calls)
        ex.gate.set()
        await wait_for(lambda: stream.held("AAA") == 0 and stream.last_id("AAA") >= 149)
        for i in range(150, 160):  # live continues; what the catch-up already wrote is dropped
            stream.on_record(trade("AAA", i))
        tg.cancel_scope.cancel()
    # Live trades were already held above the resume point: the fill starts at the gap
    # and uses only what is missing below them.
    assert ex.trade_calls[0] == ("AAA", 101, 1100)
    assert ids(out) == list(range(101, 160))
    assert markers(out, "filled")[0].reason == "restart"


async def test_aggtrade_overlap_closes_gap_without_rest_during_grace():
    ex = FakeExchange()
    stream, out, _ = make(AggTradeStream, AggTradeOptions(gap_grace="5s"), ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        # Old connection at 100, new one (rotation) already at 103; both then interleave.
        for i in [100, 103, 101, 104, 102, 103, 104, 105]:
            stream.on_record(trade("AAA", i))
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert ids(out) == [100, 101, 102, 103, 104, 105]
    assert ex.trade_calls == [] and markers(out) == []


async def test_aggtrade_rest_failure_is_retried():
    ex = FakeExchange()
    ex.trades["AAA"] = {i: trade("AAA", i) for i in range(1, 10)}
    ex.fail_next = 1
    stream, out, counters = make(AggTradeStream, FAST, ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [1, 5]:
            stream.on_record(trade("AAA", i))
        await wait_for(lambda: ids(out) == [1, 2, 3, 4, 5], timeout=10)
        tg.cancel_scope.cancel()
    assert counters.get("backfill_errors", "AAA", "aggtrade") == 1
    assert len(ex.trade_calls) == 2


async def test_aggtrade_failed_catch_up_is_retried():
    ex = FakeExchange()
    ex.trades["AAA"] = {i: trade("AAA", i) for i in range(1, 8)}
    ex.fail_next = 1
    stream, out, counters = make(AggTradeStream, FAST, ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        stream.on_record(trade("AAA", 1))
        stream.on_reconnect(["AAA"], "disconnect")  # quiet symbol: open-ended catch-up
        await wait_for(lambda: ids(out) == list(range(1, 8)), timeout=10)
        tg.cancel_scope.cancel()
    assert counters.get("backfill_errors", "AAA", "aggtrade") == 1
    assert ex.trade_calls == [("AAA", 2, None), ("AAA", 2, None)]


async def test_aggtrade_hold_limit_gives_up_the_gap():
    ex = FakeExchange()
    ex.gate = anyio.Event()  # REST never answers
    stream, out, _ = make(AggTradeStream, AggTradeOptions(gap_grace="0ms", max_held=3), ex)
    for i in [1, 5, 6, 7, 8]:
        stream.on_record(trade("AAA", i))
    assert ids(out) == [1, 5, 6, 7, 8]
    (lost,) = markers(out, "unfillable")
    assert (lost.first_key, lost.last_key, lost.reason) == (2, 4, "hold limit reached")


async def test_aggtrade_backfill_disabled_reports_gaps():
    ex = FakeExchange()
    stream, out, _ = make(AggTradeStream, AggTradeOptions(backfill=False, gap_grace="0ms"), ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [1, 4]:
            stream.on_record(trade("AAA", i))
        await wait_for(lambda: ids(out) == [1, 4])
        tg.cancel_scope.cancel()
    assert ex.trade_calls == []
    assert [(m.kind, m.first_key, m.last_key) for m in markers(out)] == [("unfillable", 2, 3)]


@pytest.mark.parametrize(
    ("cls", "raw", "message"),
    [
        (AggTradeOptions, {"gap_grace": "soon"}, "invalid duration"),
        (AggTradeOptions, {"max_held": 0}, "max_held"),
        (AggTradeOptions, {"nope": 1}, "unknown field"),
        (KlineOptions, {"intervals": ["2m"]}, "invalid kline interval '2m'"),
        (KlineOptions, {"intervals": []}, "at least one interval"),
        (KlineOptions, {"intervals": ["1m", "1m"]}, "listed twice"),
        (DepthOptions, {"sped": "100ms"}, "unknown field"),
    ],
)
def test_bad_options_are_rejected(cls, raw, message):
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(raw, cls)


# --------------------------------------------------------------------------- kline


async def test_kline_closed_once_and_updates_only_when_asked():
    ex = FakeExchange()
    stream, out, _ = make(KlineStream, KlineOptions(intervals=["1m", "1h"]), ex)
    assert stream.subscriptions() == [Subscription("AAA", "kline", "1m"),
                                      Subscription("AAA", "kline", "1h")]  # fmt: skip
    t0 = 1_700_000_040_000 - 1_700_000_040_000 % MIN
    for k in [kline("AAA", t0, False), kline("AAA", t0), kline("AAA", t0),
              kline("AAA", t0 + MIN, False), kline("AAA", t0 + MIN)]:  # fmt: skip
        stream.on_record(k)
    assert [(k.open_time, k.closed) for k in out] == [(t0, True), (t0 + MIN, True)]
    every, out2, _ = make(KlineStream, KlineOptions(all_updates=True), ex)
    for k in [kline("AAA", t0, False), kline("AAA", t0), kline("AAA", t0)]:
        every.on_record(k)
    assert [k.closed for k in out2] == [False, True]


async def test_kline_gap_is_filled_in_order():
    ex = FakeExchange()
    t0 = 1_700_000_040_000 - 1_700_000_040_000 % MIN
    ex.klines["AAA"] = {t0 + i * MIN: kline("AAA", t0 + i * MIN, close="rest") for i in range(6)}
    ex.gate = anyio.Event()
    stream, out, counters = make(KlineStream, KlineOptions(gap_grace="0ms"), ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        stream.on_record(kline("AAA", t0))
        stream.on_record(kline("AAA", t0 + 4 * MIN))  # 1..3 missed
        await wait_for(lambda: ex.kline_calls)
        stream.on_record(kline("AAA", t0 + 5 * MIN))
        ex.gate.set()
        await wait_for(lambda: len([r for r in out if isinstance(r, Kline)]) == 6)
        tg.cancel_scope.cancel()
    assert ex.kline_calls == [("AAA", "1m", t0 + MIN, t0 + 4 * MIN - 1)]
    klines = [r for r in out if isinstance(r, Kline)]
    assert [k.open_time for k in klines] == [t0 + i * MIN for i in range(6)]
    assert [k.close for k in klines] == ["1.0", "rest", "rest", "rest", "1.0", "1.0"]
    (filled,) = markers(out)
    assert (filled.stream, filled.first_key, filled.last_key) == (
        "kline_1m",
        t0 + MIN,
        t0 + 3 * MIN,
    )
    assert counters.get("klines_backfilled", "AAA", "kline_1m") == 3


async def test_kline_resume_and_reconnect_fill_up_to_now():
    ex = FakeExchange()
    now = time.time_ns() // 1_000_000
    last_closed = now - now % MIN - MIN
    ex.klines["AAA"] = {last_closed - i * MIN: kline("AAA", last_closed - i * MIN)
                        for i in range(10)}  # fmt: skip
    resume = {StreamKey("binance", "spot", "AAA", "kline_1m"): last_closed - 5 * MIN}
    stream, out, _ = make(KlineStream, KlineOptions(), ex, resume=resume)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        await wait_for(lambda: len(out) >= 6)
        tg.cancel_scope.cancel()
    assert [k.open_time for k in out if isinstance(k, Kline)] == [
        last_closed - i * MIN for i in range(4, -1, -1)
    ]
    assert ex.kline_calls[0][2] == last_closed - 4 * MIN


def test_kline_interval_not_served_by_exchange_is_a_startup_error():
    with pytest.raises(ValueError, match="1s"):
        make(KlineStream, KlineOptions(intervals=["1s"]), FakeExchange("usdm"))


def test_next_open_time_handles_calendar_months():
    jan = 1_704_067_200_000  # 2024-01-01
    feb = next_open_time(jan, "1M")
    assert feb == jan + 31 * 86_400_000
    assert next_open_time(feb, "1M") == feb + 29 * 86_400_000  # leap year
    assert next_open_time(jan, "1w") == jan + 7 * 86_400_000
    assert next_open_time(jan, "1s") == jan + 1000


# --------------------------------------------------------------------------- depth


def depth(symbol: str, first: int, last: int, prev: int | None = None) -> DepthUpdate:
    return DepthUpdate("binance", "spot", symbol, 1, None, first, last, prev,
                       [("1.0", "2")], [], 0)  # fmt: skip


def test_depth_spot_duplicates_dropped_and_gaps_marked():
    stream, out, counters = make(DepthStream, DepthOptions(speed="100ms"), FakeExchange())
    assert stream.subscriptions() == [Subscription("AAA", "depth", "100ms")]
    for first, last in [(1, 5), (6, 9), (6, 9), (3, 7), (10, 12), (20, 25), (26, 30)]:
        stream.on_record(depth("AAA", first, last))
    updates = [(r.first_update_id, r.last_update_id) for r in out if isinstance(r, DepthUpdate)]
    assert updates == [(1, 5), (6, 9), (10, 12), (20, 25), (26, 30)]
    (gap,) = markers(out, "gap")
    assert (gap.first_key, gap.last_key, gap.stream, gap.reason) == (
        13,
        19,
        "depth",
        "sequence break",
    )
    assert counters.get("depth_duplicates", "AAA", "depth") == 2
    assert out.index(gap) == 3, "the marker precedes the update after the break"


def test_depth_futures_chain_uses_pu():
    stream, out, _ = make(DepthStream, DepthOptions(), FakeExchange("usdm"))
    # Futures ids are not contiguous; only pu == previous u matters.
    for first, last, prev in [(100, 110, 90), (130, 140, 110), (150, 160, 140), (180, 190, 170)]:
        stream.on_record(depth("AAA", first, last, prev))
    assert len([r for r in out if isinstance(r, DepthUpdate)]) == 4
    (gap,) = markers(out, "gap")
    assert gap.first_key == 161


def test_depth_resumes_from_holdings_and_marks_the_hole_between_runs():
    exchange = FakeExchange()
    key = StreamKey(exchange.exchange, exchange.market, "AAA", "depth")
    stream, out, _ = make(DepthStream, DepthOptions(), exchange, resume={key: 12})
    for first, last in [(5, 12), (30, 35), (36, 40)]:  # held already, then after the hole
        stream.on_record(depth("AAA", first, last))
    updates = [(r.first_update_id, r.last_update_id) for r in out if isinstance(r, DepthUpdate)]
    assert updates == [(30, 35), (36, 40)]
    (gap,) = markers(out, "gap")
    assert (gap.first_key, gap.last_key, gap.reason) == (13, 29, "restart")


def test_depth_resume_without_a_hole_writes_no_marker():
    exchange = FakeExchange()
    key = StreamKey(exchange.exchange, exchange.market, "AAA", "depth")
    stream, out, _ = make(DepthStream, DepthOptions(), exchange, resume={key: 12})
    stream.on_record(depth("AAA", 13, 20))
    assert markers(out) == []
