"""The ``orderbook`` stream with the real Binance adapter against the simulator (loopback).

A small harness stands in for the runtime: it forwards the adapter's depth updates and
reconnects to the stream and collects what the stream emits. Every book written is compared
with ``sim.truth.book_at`` at its update id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import anyio
import msgspec
import pytest

pytest.importorskip("streamer.testing.sim", reason="the simulator has not landed yet")
pytest.importorskip("streamer.plugins.exchanges.binance.adapter", reason="no Binance adapter")

from streamer.core.api import ExchangeContext, StreamContext
from streamer.core.counters import Counters
from streamer.core.records import BookSnapshot, DepthUpdate, Marker, Record
from streamer.plugins.exchanges.binance import BinanceAdapter, BinanceOptions
from streamer.plugins.streams.orderbook import STREAM, OrderBookOptions, OrderBookStream
from streamer.testing.sim import SimConfig, SimServer

pytestmark = pytest.mark.anyio
LOG = logging.getLogger("test.orderbook.sim")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def start_sim() -> Iterator[Callable[..., SimServer]]:
    started: list[SimServer] = []

    def start(**config) -> SimServer:
        sim = SimServer(SimConfig(**config)).start_in_thread()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


class SimHarness:
    """Binance adapter + orderbook stream wired like a collector worker."""

    def __init__(self, sim: SimServer, market: str, symbols: list[str], **options) -> None:
        self.sim = sim
        self.market = market
        self.symbols = symbols
        self.counters = Counters()
        self.out: list[Record] = []
        raw = {
            "market": market,
            "rest_url": sim.rest_url,
            "ws_url": sim.ws_url if market == "spot" else sim.usdm_ws_url,
        }
        self.adapter = BinanceAdapter(
            msgspec.convert(raw, BinanceOptions),
            ExchangeContext(pipeline="t", counters=self.counters, logger=LOG),
        )
        self.in_flight = 0
        self.peak_in_flight = 0
        fetch = self.adapter.fetch_book_snapshot

        async def counting_fetch(symbol: str, limit: int) -> BookSnapshot:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                return await fetch(symbol, limit)
            finally:
                self.in_flight -= 1

        self.adapter.fetch_book_snapshot = counting_fetch  # type: ignore[method-assign]
        context = StreamContext(
            pipeline="t",
            exchange=self.adapter,
            symbols=symbols,
            emit=self.out.append,
            counters=self.counters,
            logger=LOG,
        )
        self.stream = OrderBookStream(msgspec.convert(options, OrderBookOptions), context)

    # Inbox
    def on_record(self, record: Record) -> None:
        if type(record) is DepthUpdate:
            self.stream.on_record(record)

    def on_reconnect(self, symbols, reason: str) -> None:
        self.stream.on_reconnect(symbols, reason)

    def start(self, tg) -> None:
        tg.start_soon(self.adapter.stream, self.stream.subscriptions(), self)
        tg.start_soon(self.stream.run)

    def count(self, name: str, symbol: str) -> int:
        return self.counters.get(name, symbol, STREAM)

    def books(self, symbol: str | None = None) -> list[BookSnapshot]:
        return [r for r in self.out if type(r) is BookSnapshot and symbol in (None, r.symbol)]

    async def wait(self, condition, timeout: float, what: str) -> None:
        try:
            with anyio.fail_after(timeout):
                while not condition():
                    await anyio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None

    def all_live(self) -> bool:
        return all(self.stream.book(s).live for s in self.symbols)

    def check_against_truth(self, books: list[BookSnapshot], levels: int) -> None:
        for book in books:
            bids, asks = self.sim.truth.book_at(self.market, book.symbol, book.last_update_id)
            assert (book.bids, book.asks) == (bids[:levels], asks[:levels]), (
                f"{book.symbol} at {book.last_update_id}"
            )
            assert book.event_time > 0 and book.receive_time > 0


@pytest.mark.parametrize("market", ["spot", "usdm"])
async def test_injected_gap_resyncs_only_that_symbol_and_books_equal_truth(
    market: str, start_sim
) -> None:
    symbols = ["BTCUSDT", "ETHUSDT", "BNBUSDT"]
    sim = start_sim(seed=5, spot_symbols=symbols, usdm_symbols=symbols)
    h = SimHarness(sim, market, symbols, interval="update", levels=20, verify_interval="off")
    victim = "ETHUSDT"
    async with anyio.create_task_group() as tg:
        h.start(tg)
        await h.wait(h.all_live, 15, "every book to sync")
        sim.faults.drop_depth(victim, 1)
        await h.wait(lambda: h.count("resyncs", victim) == 1, 10, "the victim to resync")
        others = {s: len(h.books(s)) for s in symbols if s != victim}
        await h.wait(lambda: h.stream.book(victim).live, 10, "the victim to sync again")
        resynced_at = len(h.books(victim))
        await h.wait(lambda: len(h.books(victim)) >= resynced_at + 5, 10, "books after resync")
        tg.cancel_scope.cancel()
    for symbol in symbols:
        hit = symbol == victim
        assert h.count("resyncs", symbol) == int(hit), symbol
        assert h.count("sequence_gaps", symbol) == int(hit), symbol
        if not hit:
            assert len(h.books(symbol)) > others[symbol]  # kept going meanwhile
    markers = [r for r in h.out if type(r) is Marker]
    assert [(m.symbol, m.kind) for m in markers] == [(victim, "resync")]
    assert h.books(victim)
    h.check_against_truth(h.books(), 20)


@pytest.mark.parametrize("market", ["spot", "usdm"])
async def test_verification_against_simulator_snapshots_finds_no_mismatch(
    market: str, start_sim
) -> None:
    symbols = ["BTCUSDT", "ETHUSDT"]
    sim = start_sim(seed=9, spot_symbols=symbols, usdm_symbols=symbols)
    h = SimHarness(sim, market, symbols, interval="1s", verify_interval="1s")
    async with anyio.create_task_group() as tg:
        h.start(tg)
        await h.wait(
            lambda: all(h.count("verifications", s) >= 2 for s in symbols), 20, "verifications"
        )
        tg.cancel_scope.cancel()
    for symbol in symbols:
        assert h.count("verify_mismatches", symbol) == 0
        assert h.count("resyncs", symbol) == 0
    h.check_against_truth(h.books(), 20)


async def test_200_symbols_starting_at_once_stay_within_the_rest_budget(start_sim) -> None:
    symbols = [f"C{i:03d}USDT" for i in range(200)]
    sim = start_sim(seed=2, spot_symbols=symbols, usdm_symbols=[], book_levels=150)
    h = SimHarness(sim, "spot", symbols, interval="1s", snapshot_limit=100, verify_interval="off")
    async with anyio.create_task_group() as tg:
        h.start(tg)
        await h.wait(h.all_live, 25, "200 books to sync")
        h.stream.flush()
        tg.cancel_scope.cancel()
    sim_counters = sim.truth.counters()
    for name in ("rest_429", "rest_418", "rest_bans"):
        assert sum(v for (n, _, _), v in sim_counters.items() if n == name) == 0, name
    assert h.peak_in_flight <= 2
    assert h.counters.total("snapshots_fetched") == 200  # one each: no storm, no refetch loop
    assert h.counters.total("snapshot_errors") == 0
    assert h.counters.total("resyncs") == 0
    latest = {b.symbol: b for b in h.books()}
    assert len(latest) == 200
    h.check_against_truth(list(latest.values()), 20)


async def test_mass_reconnect_resyncs_only_broken_books_and_stays_within_budget(
    start_sim,
) -> None:
    symbols = [f"R{i:03d}USDT" for i in range(100)]
    sim = start_sim(seed=4, spot_symbols=symbols, usdm_symbols=[], book_levels=150)
    h = SimHarness(sim, "spot", symbols, interval="1s", snapshot_limit=100, verify_interval="off")
    async with anyio.create_task_group() as tg:
        h.start(tg)
        await h.wait(h.all_live, 20, "100 books to sync")
        for symbol in symbols:  # every book misses an event across the reconnect
            sim.faults.drop_depth(symbol, 1)
        sim.faults.close_connections(abrupt=True)
        await h.wait(lambda: h.counters.total("resyncs") >= 100, 15, "100 sequence gaps")
        await h.wait(
            lambda: h.all_live() and h.in_flight == 0, 25, "every book live after reconnect"
        )
        h.stream.flush()
        tg.cancel_scope.cancel()
    sim_counters = sim.truth.counters()
    for name in ("rest_429", "rest_418", "rest_bans"):
        assert sum(v for (n, _, _), v in sim_counters.items() if n == name) == 0, name
    assert h.peak_in_flight <= 2
    resyncs = h.counters.total("resyncs")
    assert resyncs == 100 and h.counters.total("reconnects") >= 100
    # Only books whose sequence actually broke were fetched again, once each.
    assert h.counters.total("snapshots_fetched") == 100 + resyncs
    markers = [r for r in h.out if type(r) is Marker]
    assert len(markers) == resyncs
    assert {m.reason for m in markers} <= {"sequence gap after reconnect"}
    latest = {b.symbol: b for b in h.books()}
    h.check_against_truth(list(latest.values()), 20)
