"""The ``orderbook`` stream type against a fake exchange that serves snapshots of a seeded
market: sync, per-symbol resync, pacing, retries, verification, output and options."""

from __future__ import annotations

import logging

import anyio
import pytest
from test_orderbook_fakes import FUTURES_RULE, SPOT_RULE, FakeExchange, TruthBook

from streamer.core.api import SequenceRule, StreamContext
from streamer.core.counters import Counters
from streamer.core.plugins import Registry, make_plugin_manager
from streamer.core.records import BookSnapshot, DepthUpdate, Marker, Trade
from streamer.plugins.streams import _book as B
from streamer.plugins.streams.orderbook import (
    STREAM,
    OrderBookOptions,
    OrderBookStream,
    effective_snapshot_limit,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Harness:
    """A stream instance wired to a fake exchange, collecting what it emits."""

    def __init__(self, n: int = 3, futures: bool = False, delay: float = 0.0, **options) -> None:
        market = "usdm" if futures else "spot"
        self.truths = {
            f"S{i}USDT": TruthBook(f"S{i}USDT", seed=100 + i, futures=futures, market=market)
            for i in range(n)
        }
        self.exchange = FakeExchange(
            self.truths, FUTURES_RULE if futures else SPOT_RULE, market, delay=delay
        )
        self.out: list = []
        self.delivered: dict[str, int] = {}
        self.counters = Counters()
        context = StreamContext(
            pipeline="test",
            exchange=self.exchange,
            symbols=list(self.truths),
            emit=self.out.append,
            counters=self.counters,
            logger=logging.getLogger("test.orderbook"),
        )
        options.setdefault("verify_interval", "off")
        self.stream = OrderBookStream(OrderBookOptions(**options), context)

    def step(self, symbol: str, deliver: bool = True) -> DepthUpdate:
        update = self.truths[symbol].step()
        if deliver:
            self.delivered[symbol] = self.delivered.get(symbol, 0) + 1
            self.stream.on_record(update)
        return update

    def step_all(self, times: int = 1) -> None:
        for _ in range(times):
            for symbol in self.truths:
                self.step(symbol)

    def count(self, name: str, symbol: str) -> int:
        return self.counters.get(name, symbol, STREAM)

    def books(self, symbol: str | None = None) -> list[BookSnapshot]:
        return [
            r
            for r in self.out
            if type(r) is BookSnapshot and (symbol is None or r.symbol == symbol)
        ]

    def markers(self) -> list[Marker]:
        return [r for r in self.out if type(r) is Marker]

    def check_books_equal_truth(self, levels: int) -> None:
        """Every emitted book equals the true top-N at its update id, with its times."""
        assert self.books()
        for book in self.books():
            truth = self.truths[book.symbol]
            assert (book.bids, book.asks) == truth.top(book.last_update_id, levels)
            assert book.event_time == book.last_update_id  # TruthBook's event time
            assert book.receive_time == book.last_update_id + 7
            assert book.exchange == "binance" and book.market == self.exchange.market
            if book.bids and book.asks:
                assert float(book.bids[0][0]) < float(book.asks[0][0])

    async def wait(self, condition, timeout: float = 5.0) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                await anyio.sleep(0.002)

    def all_live(self) -> bool:
        return all(self.stream.book(s).live for s in self.truths)

    async def sync_all(self) -> None:
        """Deliver updates until every book is live."""
        with anyio.fail_after(5):
            while not self.all_live():
                self.step_all()
                await anyio.sleep(0.005)


async def test_syncs_every_symbol_and_emits_books_equal_to_truth_on_every_update() -> None:
    h = Harness(n=3, interval="update", levels=10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        h.step_all(100)
        tg.cancel_scope.cancel()
    h.check_books_equal_truth(10)
    for symbol in h.truths:
        ids = [b.last_update_id for b in h.books(symbol)]
        assert ids == sorted(set(ids)) and len(ids) >= 100
        assert h.count("updates_applied", symbol) >= 100
        assert h.count("snapshots_fetched", symbol) == 1
        assert h.count("resyncs", symbol) == 0
        # Every delivered update is accounted for, including those drained at sync.
        accounted = h.count("updates_applied", symbol) + h.count("updates_dropped", symbol)
        assert accounted == h.delivered[symbol]
    assert h.markers() == []


@pytest.mark.parametrize("futures", [False, True])
async def test_gap_on_one_symbol_resyncs_only_that_symbol(futures: bool) -> None:
    h = Harness(n=4, futures=futures, interval="update", levels=20)
    victim = "S2USDT"
    assert all(h.count("book_syncing", s) == 1 for s in h.truths)  # status: not live yet
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        h.step_all(20)
        assert all(h.count("book_syncing", s) == 0 for s in h.truths)
        before = {s: len(h.books(s)) for s in h.truths}
        last_good = h.books(victim)[-1].last_update_id
        h.step(victim, deliver=False)  # the victim misses one event
        h.step_all(1)
        assert not h.stream.book(victim).live
        assert h.count("book_syncing", victim) == 1
        assert sum(h.count("book_syncing", s) for s in h.truths) == 1
        await h.wait(lambda: h.count("snapshots_fetched", victim) == 2)
        h.step_all(30)
        assert h.stream.book(victim).live
        assert h.count("book_syncing", victim) == 0
        tg.cancel_scope.cancel()
    h.check_books_equal_truth(20)
    for symbol in h.truths:
        hit = symbol == victim
        assert h.count("resyncs", symbol) == int(hit)
        assert h.count("sequence_gaps", symbol) == int(hit)
        if not hit:  # the others never stopped: one book per update, no interruption
            assert len(h.books(symbol)) == before[symbol] + 31
    [marker] = h.markers()
    assert (marker.symbol, marker.kind, marker.stream) == (victim, "resync", "orderbook")
    assert marker.reason == "sequence gap"
    assert (marker.first_key, marker.last_key) == (last_good + 1, 0)


async def test_reconnect_labels_the_following_gap() -> None:
    h = Harness(n=2, interval="update")
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        h.stream.on_reconnect(["S0USDT", "S1USDT"], "rotation")
        h.step_all(2)  # no data lost on S1: continues
        h.step("S0USDT", deliver=False)
        h.step("S0USDT")
        tg.cancel_scope.cancel()
    assert h.count("reconnects", "S0USDT") == 1
    assert h.stream.book("S1USDT").live and h.count("resyncs", "S1USDT") == 0
    [marker] = h.markers()
    assert marker.symbol == "S0USDT" and marker.reason == "sequence gap after reconnect"


async def test_interval_output_only_for_books_that_moved() -> None:
    h = Harness(n=3, interval="1h", levels=5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        assert h.books() == []  # nothing until the interval ticks
        assert h.stream.flush() == 3
        assert h.stream.flush() == 0
        h.step("S1USDT")
        assert h.stream.flush() == 1
        tg.cancel_scope.cancel()
    h.check_books_equal_truth(5)
    assert [b.symbol for b in h.books()][-1] == "S1USDT"


async def test_periodic_writer_runs_on_its_own() -> None:
    h = Harness(n=2, interval="50ms", levels=3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        await h.wait(lambda: len(h.books()) >= 2)
        tg.cancel_scope.cancel()
    h.check_books_equal_truth(3)


async def test_snapshot_requests_are_bounded_and_never_repeated() -> None:
    h = Harness(n=60, delay=0.002, snapshot_concurrency=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        tg.cancel_scope.cancel()
    assert h.exchange.peak_in_flight == 2
    assert sorted(s for s, _ in h.exchange.requests) == sorted(h.truths)  # one each
    assert {limit for _, limit in h.exchange.requests} == {1000}


async def test_failed_snapshot_is_counted_and_retried() -> None:
    h = Harness(n=2, interval="update")
    h.exchange.fail["S0USDT"] = 2
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        tg.cancel_scope.cancel()
    assert h.count("snapshot_errors", "S0USDT") == 2
    assert h.count("snapshot_errors", "S1USDT") == 0
    assert h.count("snapshots_fetched", "S0USDT") == 1


async def test_too_old_snapshot_is_refetched() -> None:
    h = Harness(n=1, interval="update")
    truth = h.truths["S0USDT"]
    old = truth.snapshot(1000)
    truth.step()  # the snapshot misses this one, never delivered
    h.exchange.canned["S0USDT"] = [old]
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        tg.cancel_scope.cancel()
    assert h.count("snapshot_refetches", "S0USDT") == 1
    assert h.count("snapshots_fetched", "S0USDT") == 2
    h.check_books_equal_truth(20)


async def test_bad_snapshot_is_counted_and_refetched() -> None:
    h = Harness(n=1, interval="update")
    h.exchange.canned["S0USDT"] = [
        BookSnapshot("binance", "spot", "S0USDT", 10**9, 0, 0, [("x", "1")], [])
    ]
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        tg.cancel_scope.cancel()
    assert h.count("bad_snapshots", "S0USDT") == 1
    h.check_books_equal_truth(20)


async def test_crossed_update_is_never_emitted_and_resyncs() -> None:
    h = Harness(n=2, interval="update", levels=5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        sync = h.stream.book("S0USDT")
        local = sync.local_id
        best_ask = sync.top(1)[1][0][0]
        emitted = len(h.books())
        bogus = DepthUpdate(
            "binance",
            "spot",
            "S0USDT",
            1,
            None,
            local + 1,
            local + 1,
            None,
            [(best_ask, "9")],
            [],
            1,
        )
        h.stream.on_record(bogus)
        assert len(h.books()) == emitted
        await h.sync_all()
        tg.cancel_scope.cancel()
    assert h.count("crossed_books", "S0USDT") == 1 and h.count("resyncs", "S0USDT") == 1
    assert [(m.reason, m.first_key) for m in h.markers()] == [("crossed book", local + 1)]
    h.check_books_equal_truth(5)


async def test_malformed_update_is_counted_and_resyncs() -> None:
    h = Harness(n=1, interval="update")
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        local = h.stream.book("S0USDT").local_id
        h.stream.on_record(
            DepthUpdate(
                "binance",
                "spot",
                "S0USDT",
                1,
                None,
                local + 1,
                local + 1,
                None,
                [("1e", "1")],
                [],
                1,
            )
        )
        await h.sync_all()
        tg.cancel_scope.cancel()
    assert h.count("malformed_updates", "S0USDT") == 1
    assert [m.reason for m in h.markers()] == ["malformed update"]


async def test_verification_passes_on_a_correct_book() -> None:
    h = Harness(n=2, verify_interval="1s")
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        await h.wait(lambda: all(h.count("verifications", s) >= 1 for s in h.truths), 5)
        tg.cancel_scope.cancel()
    for symbol in h.truths:
        assert h.count("verify_mismatches", symbol) == 0
        assert h.stream.book(symbol).live
    assert h.markers() == []


async def test_verification_mismatch_is_reported_and_resynced() -> None:
    h = Harness(n=2, verify_interval="1s", interval="update")
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        truth = h.truths["S1USDT"]
        good = truth.snapshot(1000)
        price, qty = good.bids[0]
        wrong = BookSnapshot(
            "binance", "spot", "S1USDT", good.last_update_id, 0, 0,
            [(price, qty + "1"), *good.bids[1:]], good.asks,
        )  # fmt: skip
        h.exchange.canned["S1USDT"] = [wrong]
        await h.wait(lambda: h.count("verify_mismatches", "S1USDT") == 1, 5)
        assert not h.stream.book("S1USDT").live
        await h.sync_all()
        tg.cancel_scope.cancel()
    assert [(m.symbol, m.kind) for m in h.markers()] == [
        ("S1USDT", "verify_mismatch"),
        ("S1USDT", "resync"),
    ]
    assert h.count("resyncs", "S1USDT") == 1 and h.count("resyncs", "S0USDT") == 0
    h.check_books_equal_truth(20)


async def test_buffer_overflow_while_waiting_for_a_snapshot() -> None:
    h = Harness(n=1, delay=0.2, buffer_limit=10, interval="update")
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        h.step_all(1)
        await anyio.sleep(0.01)  # the request is in flight now
        h.step_all(15)
        assert h.count("buffer_overflows", "S0USDT") >= 1
        await h.sync_all()
        tg.cancel_scope.cancel()
    h.check_books_equal_truth(20)


async def test_unknown_symbols_and_other_records_are_ignored() -> None:
    h = Harness(n=1)
    other = TruthBook("OTHER", seed=1).step()
    h.stream.on_record(other)
    h.stream.on_record(Trade("binance", "spot", "S0USDT", 1, "1", "1", 1, 1, 1, False, True, 1, 1))
    assert h.counters.get("unknown_symbol", "", STREAM) == 1
    assert h.stream.book("S0USDT").buffered == 0


def test_subscriptions_and_registration() -> None:
    h = Harness(n=2, speed="100ms")
    subs = h.stream.subscriptions()
    assert [(s.symbol, s.channel, s.param) for s in subs] == [
        ("S0USDT", "depth", "100ms"),
        ("S1USDT", "depth", "100ms"),
    ]
    pm, _ = make_plugin_manager([])
    assert Registry.from_manager(pm).streams["orderbook"] is OrderBookStream


def test_snapshot_limit_is_capped_and_rounded() -> None:
    assert effective_snapshot_limit(1000, FUTURES_RULE) == 1000
    assert effective_snapshot_limit(300, FUTURES_RULE) == 500
    assert effective_snapshot_limit(5000, FUTURES_RULE) == 1000
    assert effective_snapshot_limit(5000, SPOT_RULE) == 5000
    assert effective_snapshot_limit(9000, SPOT_RULE) == 5000
    assert effective_snapshot_limit(1234, SPOT_RULE) == 1234
    assert effective_snapshot_limit(50, SequenceRule("futures", 1000, (5, 10, 20, 50))) == 50
    with pytest.raises(ValueError, match="snapshot_limit"):
        effective_snapshot_limit(0, SPOT_RULE)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"levels": 0}, "levels must be >= 1"),
        ({"levels": 600, "snapshot_limit": 500}, "exceeds the snapshot depth"),
        ({"interval": "soon"}, "invalid duration"),
        ({"interval": "-1s"}, "invalid duration"),
        ({"verify_interval": "100ms"}, "at least 1s"),
        ({"snapshot_concurrency": 0}, "snapshot_concurrency"),
        ({"buffer_limit": 1}, "buffer_limit"),
        ({"queued_buffer_limit": 0}, "queued_buffer_limit"),
    ],
)
def test_bad_options_fail_at_start_with_a_clear_message(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Harness(n=1, **options)


def test_on_record_going_live_works_outside_an_event_loop() -> None:
    # The runtime may call on_record from a plain callback; scheduling the first
    # verification there must not need a running task.
    h = Harness(n=1, verify_interval="10m", interval="update")
    h.step("S0USDT")
    sync = h.stream.book("S0USDT")
    assert sync.on_snapshot(h.truths["S0USDT"].snapshot(1000)) == B.BRIDGING_WAIT
    h.step("S0USDT")
    assert sync.live
    assert "S0USDT" in h.stream._next_verify
    h.check_books_equal_truth(20)


def test_options_from_yaml_numbers_and_unknown_keys() -> None:
    import msgspec

    options = msgspec.convert({"interval": 0, "verify_interval": 600}, OrderBookOptions)
    h = Harness(n=1, interval=options.interval, verify_interval=options.verify_interval)
    assert h.stream._emit_every and h.stream._verify_every == 600.0
    with pytest.raises(msgspec.ValidationError, match="levls"):
        msgspec.convert({"levls": 5}, OrderBookOptions)


def test_exchange_without_order_books_is_rejected_at_start() -> None:
    class NoBooks(FakeExchange):
        @property
        def sequence_rule(self) -> SequenceRule:
            raise NotImplementedError("no depth")

    context = StreamContext(
        pipeline="t",
        exchange=NoBooks({}),
        symbols=["X"],
        emit=lambda r: None,
        counters=Counters(),
        logger=logging.getLogger("t"),
    )
    with pytest.raises(ValueError, match="does not serve order books"):
        OrderBookStream(OrderBookOptions(), context)


async def test_verifications_run_one_at_a_time() -> None:
    h = Harness(n=6, verify_interval="1s", delay=0.02, snapshot_concurrency=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        assert h.exchange.peak_in_flight == 2  # syncs use every worker
        h.exchange.peak_in_flight = 0
        await h.wait(lambda: all(h.count("verifications", s) >= 1 for s in h.truths), 8)
        tg.cancel_scope.cancel()
    assert h.exchange.peak_in_flight == 1
    assert h.counters.total("verify_mismatches") == 0


async def test_bad_verification_snapshot_is_counted_and_retried_without_resync() -> None:
    h = Harness(n=1, verify_interval="1s")
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        crossed = BookSnapshot("binance", "spot", "S0USDT", 10**9, 0, 0, [("2", "1")], [("1", "1")])
        h.exchange.canned["S0USDT"] = [crossed]
        await h.wait(lambda: h.count("bad_snapshots", "S0USDT") == 1, 5)
        assert h.stream.book("S0USDT").live
        await h.wait(lambda: h.count("verifications", "S0USDT") >= 1, 5)
        tg.cancel_scope.cancel()
    assert h.count("resyncs", "S0USDT") == 0 and h.markers() == []


class RecordingCounters(Counters):
    """Counters that also count how often each name was incremented (calls, not amounts)."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def incr(self, name: str, symbol: str = "", stream: str = "", n: int = 1) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        super().incr(name, symbol, stream, n)


async def test_applied_updates_are_counted_off_the_per_update_path(monkeypatch) -> None:
    """No counter call per applied update; ``updates_applied`` is published from the
    books' tallies by the stream's own loop, and once more when it stops."""
    import sys

    monkeypatch.setattr(sys.modules[__name__], "Counters", RecordingCounters)
    h = Harness(n=2, interval="1s", levels=5)
    counters = h.counters
    assert isinstance(counters, RecordingCounters)
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        before = counters.calls.get("updates_applied", 0)
        h.step_all(200)  # no await inside: the publishing loop cannot run meanwhile
        assert counters.calls.get("updates_applied", 0) == before
        # Published while running, without waiting for the stream to stop.
        await h.wait(
            lambda: all(
                h.count("updates_applied", s) == h.stream.book(s).stats.applied >= 200
                for s in h.truths
            )
        )
        h.step_all(3)
        tg.cancel_scope.cancel()
    for symbol in h.truths:  # the last three were published when run() stopped
        applied = h.count("updates_applied", symbol)
        assert applied == h.stream.book(symbol).stats.applied
        assert applied + h.count("updates_dropped", symbol) == h.delivered[symbol]


async def test_deep_levels_are_compacted_in_the_background(monkeypatch) -> None:
    """Updated levels outside the sorted window are re-stored as compact strings by the
    stream's periodic loop (a slice of the books per tick), with the output unchanged."""
    monkeypatch.setattr(B, "_MIN_WINDOW", 1)  # levels=2: a window of 8-16 keys a side
    h = Harness(n=2, interval="update", levels=2)

    def deep_tuples(symbol: str) -> int:
        book = h.stream.book(symbol).book
        if book is None:
            return -1
        return sum(
            type(v) is tuple and k < side._floor
            for side in (book.bids, book.asks)
            for k, v in side._levels.items()
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(h.stream.run)
        await h.sync_all()
        h.step_all(300)
        assert any(deep_tuples(s) > 0 for s in h.truths)
        await h.wait(lambda: all(deep_tuples(s) == 0 for s in h.truths))
        h.step_all(20)
        tg.cancel_scope.cancel()
    h.check_books_equal_truth(2)
