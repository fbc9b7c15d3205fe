"""Gap fills keep up with sustained faults: coalesced requests, bounded holds, fill priority.

Issue 11: trade output stalled behind its gap fills (one request per hole, a 1 s pause
after each, fills queued behind book snapshots), holds were unbounded in time and the
held trades were discarded at shutdown. These tests drive the stream types with an
in-memory exchange and the REST budget with a fake clock.
"""

from __future__ import annotations

import logging
import time

import anyio
import httpx
import msgspec
import pytest
from test_stream_types import FakeExchange, ids, make, markers, trade, wait_for

from streamer.core.api import ExchangeContext
from streamer.core.counters import Counters
from streamer.plugins.exchanges.binance import BinanceAdapter, BinanceOptions
from streamer.plugins.exchanges.binance.rest import NORMAL, URGENT, WeightBudget
from streamer.plugins.streams.aggtrade import AggTradeOptions, AggTradeStream, KeySequencer

pytestmark = pytest.mark.anyio
LOG = logging.getLogger("test.aggtrade.fills")


@pytest.fixture
def anyio_backend():
    return "asyncio"


def opts(**kw) -> AggTradeOptions:
    return AggTradeOptions(**{"gap_grace": "0ms", **kw})


# --------------------------------------------------------------------------- coalescing


async def test_one_request_fills_every_small_hole_within_a_page():
    ex = FakeExchange()
    ex.page = 1000
    ex.trades["AAA"] = {i: trade("AAA", i) for i in range(1, 201)}
    stream, out, counters = make(AggTradeStream, AggTradeOptions(gap_grace="50ms"), ex)
    dropped = {10, 20, 21, 55, 120, 199}
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in range(1, 201):
            if i not in dropped:
                stream.on_record(trade("AAA", i))
        await wait_for(lambda: ids(out) == list(range(1, 201)))
        tg.cancel_scope.cancel()
    # Six holes, one request (the old code asked once per hole, pausing 1 s between).
    assert ex.trade_calls == [("AAA", 10, 1009)]
    assert counters.get("trades_backfilled", "AAA", "aggtrade") == len(dropped)
    assert counters.get("gaps_unfillable", "AAA", "aggtrade") == 0
    (filled,) = markers(out, "filled")
    assert (filled.first_key, filled.last_key) == (10, 199)


async def test_holes_opening_while_a_fill_waits_are_covered_by_it():
    ex = FakeExchange()
    ex.page = 1000
    ex.trades["AAA"] = {i: trade("AAA", i) for i in range(1, 61)}
    ex.gate = anyio.Event()  # the request waits (as for the REST budget)
    stream, out, _ = make(AggTradeStream, opts(), ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [1, 2, 3, 5, 6]:  # hole at 4
            stream.on_record(trade("AAA", i))
        await wait_for(lambda: ex.trade_calls)
        for i in range(7, 61):  # holes at 20 and 40 open while the request waits
            if i not in (20, 40):
                stream.on_record(trade("AAA", i))
        ex.gate.set()
        await wait_for(lambda: ids(out) == list(range(1, 61)))
        tg.cancel_scope.cancel()
    assert len(ex.trade_calls) == 1


async def test_sustained_holes_on_many_symbols_keep_output_live():
    """Fill capacity exceeds demand: 20 symbols, a hole every 10 ids, 5 rounds."""
    symbols = [f"S{n:02d}" for n in range(20)]
    ex = FakeExchange()
    ex.page = 1000
    for s in symbols:
        ex.trades[s] = {i: trade(s, i) for i in range(1, 501)}
    stream, out, counters = make(AggTradeStream, opts(), ex, symbols=symbols)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for rnd in range(5):
            for i in range(rnd * 100 + 1, rnd * 100 + 101):
                for s in symbols:
                    if i % 10 != 7:
                        stream.on_record(trade(s, i))
            top = rnd * 100 + 100
            await wait_for(lambda top=top: all(stream.last_id(s) == top for s in symbols))
        tg.cancel_scope.cancel()
    for s in symbols:
        assert ids(out, s) == list(range(1, 501))
        assert counters.get("trades_held", s, "aggtrade") == 0
    # Never one request per hole: 50 holes per symbol, at most one request per round.
    assert len(ex.trade_calls) <= 5 * len(symbols)


def test_fill_range_spans_holes_within_one_page_only():
    out: list = []
    seq = KeySequencer(out.append, lambda t: t.trade_id, lambda k: k + 1)
    for i in [1, 3, 4, 6, 900, 1500, 1502]:
        seq.push(trade("AAA", i))
    # Holes 2, 5 and 7..899 lie within the page of 1000 ids from the first one.
    assert seq.fill_range(1000) == (2, 899)  # 901..1499 ends past the page anyway
    assert seq.fill_range(None) == (2, 2)
    assert seq.fill_range(3) == (2, 2)  # the hole at 5 starts beyond 2 + 3 - 1


# --------------------------------------------------------------------------- bounded holds


async def test_a_hold_is_bounded_in_time():
    ex = FakeExchange()
    ex.gate = anyio.Event()  # REST never answers
    stream, out, counters = make(AggTradeStream, opts(max_hold="300ms"), ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [1, 3, 4, 5]:
            stream.on_record(trade("AAA", i))
        assert ids(out) == [1]
        await wait_for(lambda: ids(out) == [1, 3, 4, 5])
        stream.on_record(trade("AAA", 6))  # live output flows again at once
        tg.cancel_scope.cancel()
    assert ids(out) == [1, 3, 4, 5, 6]
    (lost,) = markers(out, "unfillable")
    assert (lost.first_key, lost.last_key, lost.reason) == (2, 2, "hold timeout")
    assert counters.get("hold_timeouts", "AAA", "aggtrade") == 1
    assert counters.get("gaps_unfillable", "AAA", "aggtrade") == 1


async def test_holds_of_all_symbols_together_are_capped():
    ex = FakeExchange()
    ex.gate = anyio.Event()
    stream, out, counters = make(
        AggTradeStream, opts(max_held_total=5, shutdown_fill="0s"), ex, symbols=("AAA", "BBB")
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [1, 3, 4, 5, 6]:  # AAA holds 4
            stream.on_record(trade("AAA", i))
        for i in [1, 3, 4, 5]:  # BBB holds 3: 7 in all
            stream.on_record(trade("BBB", i))
        await wait_for(lambda: stream.held("AAA") == 0)
        assert stream.held("BBB") == 3  # the largest hold went; 3 are within the cap
        tg.cancel_scope.cancel()
    assert ids(out, "AAA") == [1, 3, 4, 5, 6]
    assert ids(out, "BBB") == [1, 3, 4, 5]  # written at the stop
    lost = [(m.symbol, m.first_key, m.last_key, m.reason) for m in markers(out, "unfillable")]
    assert lost == [("AAA", 2, 2, "hold limit reached"), ("BBB", 2, 2, "shutdown")]
    assert counters.get("hold_cap_releases", "AAA", "aggtrade") == 1


async def test_held_gauges_show_how_far_behind_output_is():
    ex = FakeExchange()
    ex.trades["AAA"] = {i: trade("AAA", i) for i in range(1, 10)}
    ex.gate = anyio.Event()
    stream, out, counters = make(AggTradeStream, opts(), ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [1, 4, 5]:
            stream.on_record(trade("AAA", i))
        await wait_for(lambda: counters.get("held_for_ms", "AAA", "aggtrade") >= 100)
        assert counters.get("trades_held", "AAA", "aggtrade") == 2
        ex.gate.set()
        await wait_for(lambda: counters.get("trades_held", "AAA", "aggtrade") == 0)
        await wait_for(lambda: counters.get("held_for_ms", "AAA", "aggtrade") == 0)
        tg.cancel_scope.cancel()
    assert ids(out) == [1, 2, 3, 4, 5]


def test_held_age_follows_the_oldest_held_record():
    now = [100.0]
    out: list = []
    seq = KeySequencer(out.append, lambda t: t.trade_id, lambda k: k + 1, clock=lambda: now[0])
    seq.push(trade("AAA", 1))
    assert seq.held_age() == 0.0
    seq.push(trade("AAA", 3))  # held at 100
    now[0] = 102.0
    seq.push(trade("AAA", 5))  # held at 102
    now[0] = 103.0
    assert seq.held_age() == pytest.approx(3.0)
    seq.push(trade("AAA", 2), live=False)  # 2 and 3 go out; 5 waits since 102
    assert seq.held_age() == pytest.approx(1.0)
    seq.push(trade("AAA", 4), live=False)
    assert seq.held_age() == 0.0 and ids(out) == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- shutdown


async def test_shutdown_fills_what_it_can_then_writes_what_is_held():
    ex = FakeExchange()
    ex.trades["AAA"] = {i: trade("AAA", i) for i in range(1, 8)}
    # A long grace: no fill happens before the stop.
    stream, out, _ = make(AggTradeStream, AggTradeOptions(gap_grace="60s"), ex)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [1, 2, 5, 6, 7]:
            stream.on_record(trade("AAA", i))
        await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert ids(out) == [1, 2, 3, 4, 5, 6, 7]
    assert [(m.kind, m.first_key, m.last_key) for m in markers(out)] == [("filled", 3, 4)]


async def test_shutdown_never_discards_held_trades_silently():
    ex = FakeExchange()
    ex.gate = anyio.Event()  # REST never answers
    stream, out, counters = make(
        AggTradeStream, AggTradeOptions(gap_grace="60s", shutdown_fill="200ms"), ex
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for i in [1, 4, 5, 7]:
            stream.on_record(trade("AAA", i))
        await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert ids(out) == [1, 4, 5, 7]
    lost = [(m.first_key, m.last_key, m.reason) for m in markers(out, "unfillable")]
    assert lost == [(2, 3, "shutdown"), (6, 6, "shutdown")]
    assert counters.get("held_released_at_stop", "AAA", "aggtrade") == 3
    assert counters.get("trades_held", "AAA", "aggtrade") == 0


# --------------------------------------------------------------------------- REST priority


class FakeTime:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


async def test_fills_go_before_queued_snapshots():
    # 6000/min: ceiling 4800, burst 960 (192 of it kept for fills), 80 weight/s.
    budget = WeightBudget(6000)
    order: list[str] = []

    async def take(name: str, weight: int, priority: int) -> None:
        await budget.acquire(weight, priority)
        order.append(name)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for n in range(2):
                tg.start_soon(take, f"book{n}", 400, NORMAL)
            await wait_for(lambda: order == ["book0"] and budget.waiting == 1)
            tg.start_soon(take, "fill", 4, URGENT)  # arrives while book1 waits for tokens
    assert order == ["book0", "fill", "book1"]


async def test_snapshots_leave_the_reserved_share_of_a_minute_to_fills():
    ft = FakeTime(1_700_000_060.0)  # 20 s into a minute window
    budget = WeightBudget(6000, reserve=0.2, clock=ft.clock, sleep=ft.sleep)  # ceiling 4800
    budget.used = 4500  # snapshots took most of this minute already
    await budget.acquire(4, URGENT)  # a fill may use the reserved share ...
    assert ft.sleeps == []
    await budget.acquire(50, NORMAL)  # ... a snapshot waits for room
    assert ft.sleeps and sum(ft.sleeps) > 0


async def test_snapshots_make_room_for_the_fill_rate_seen_lately():
    def budget_at_20s(urgent_used: int) -> tuple[WeightBudget, FakeTime]:
        ft = FakeTime(1_700_000_060.0)  # 20 s into a minute window
        budget = WeightBudget(6000, reserve=0.2, clock=ft.clock, sleep=ft.sleep)
        budget.urgent_used = urgent_used
        budget.used = 2400
        return budget, ft

    budget, ft = budget_at_20s(urgent_used=0)  # no fills lately: room for snapshots
    await budget.acquire(50, NORMAL)
    assert ft.sleeps == []
    budget, ft = budget_at_20s(urgent_used=2000)  # fills at a 6000/min pace
    # 40 s left at that pace (capped at all but one burst): no room for the snapshot yet.
    await budget.acquire(50, NORMAL)
    assert ft.sleeps and sum(ft.sleeps) > 0


async def test_adapter_sends_trade_and_kline_fills_before_snapshots():
    seen: list[tuple[int, int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/depth"):
            return httpx.Response(200, json={"lastUpdateId": 1, "bids": [], "asks": []})
        return httpx.Response(200, json=[])

    ctx = ExchangeContext(
        pipeline="t",
        counters=Counters(),
        logger=LOG,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    adapter = BinanceAdapter(msgspec.convert({}, BinanceOptions), ctx)
    acquire = adapter.budget.acquire

    async def recording(weight: int, priority: int = NORMAL) -> None:
        seen.append((weight, priority))
        await acquire(weight, priority)

    adapter.budget.acquire = recording  # type: ignore[method-assign]
    async for _ in adapter.backfill_trades("BTCUSDT", 1, 5):
        pass
    now = int(time.time() * 1000)
    async for _ in adapter.backfill_klines("BTCUSDT", "1m", now - 600_000, now):
        pass
    await adapter.fetch_book_snapshot("BTCUSDT", 1000)
    assert seen == [(4, URGENT), (2, URGENT), (50, NORMAL)]


def test_fill_reserve_option_is_checked():
    with pytest.raises(msgspec.ValidationError, match="rest_fill_reserve"):
        msgspec.convert({"rest_fill_reserve": 1.5}, BinanceOptions)
    for bad, field in [({"max_hold": "soon"}, "invalid duration"),
                       ({"max_hold": "0s"}, "max_hold"),
                       ({"fill_concurrency": 0}, "fill_concurrency"),
                       ({"max_held_total": 0}, "max_held_total")]:  # fmt: skip
        with pytest.raises(msgspec.ValidationError, match=field):
            msgspec.convert(bad, AggTradeOptions)


async def test_a_falling_server_count_lifts_a_stop_taken_on_its_previous_minute():
    # Our minute began, but the server's count came from the tail of its own minute
    # (clocks differ): the old budget then stopped every request, fills too, for a minute.
    ft = FakeTime(1_700_000_060.0)
    budget = WeightBudget(6000, clock=ft.clock, sleep=ft.sleep)  # ceiling 4800, burst 960
    budget.observe_used(4790)
    budget.observe_used(4780)  # responses overtaking each other: still the higher count
    assert budget.used == 4790
    budget.observe_used(40)  # the server's minute began
    await budget.acquire(4, URGENT)
    await budget.acquire(50, NORMAL)
    assert ft.sleeps == [] and budget.used == 94


async def test_minute_windows_follow_the_server_once_its_count_fell():
    ft = FakeTime(1_700_000_040.0 + 25)  # 25 s past a calendar minute
    budget = WeightBudget(6000, clock=ft.clock, sleep=ft.sleep)
    budget.observe_used(4000)
    ft.now += 6
    budget.observe_used(40)  # the server's minute began 31 s past the calendar minute
    await budget.acquire(4, URGENT)
    assert budget.used == 44
    ft.now += 30  # a new calendar minute, but the server's minute runs 30 s more
    await budget.acquire(4, URGENT)
    assert budget.used == 48
    ft.now += 31
    await budget.acquire(4, URGENT)
    assert budget.used == 4  # the server's next minute
