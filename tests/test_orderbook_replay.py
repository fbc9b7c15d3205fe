"""Replay every recorded Binance capture through the book engine and check the golden counts.

Each symbol's depth diffs are replayed in receipt order on top of the first REST snapshot
recorded for it (fed when it was received), with the spot or futures rules. The expected
dropped/applied counts come from ``tests/data/README.md``. Every applied update
is checked for a crossed book, and the top-N levels are compared with an independent rebuild
(plain dicts ranked by Decimal value) at the same update ids: every update of the 30 s
captures, every 4th update of the 6-minute ones (their books hold ~3000 levels a side).
"""

from __future__ import annotations

import heapq
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from streamer.core.api import SequenceRule
from streamer.core.records import DepthUpdate
from streamer.plugins.exchanges.binance import decode
from streamer.plugins.streams import _book as B
from streamer.testing import captures

DATA = Path(__file__).resolve().parent / "data"

SPOT = SequenceRule("spot", 5000)
FUTURES = SequenceRule("futures", 1000, (5, 10, 20, 50, 100, 500, 1000))
TOP_N = 20

GOLDEN = {
    "BINANCE": {"BLZETH": (1, 9), "LRCBTC": (2, 13), "NKNUSDT": (1, 149), "RUNEEUR": (1, 1)},
    "BINANCE_US": {
        "COMPUSDT": (1, 106),
        "CRVUSDT": (1, 28),
        "OMGBUSD": (1, 158),
        "ZRXUSDT": (1, 40),
    },
    "BINANCE_FUTURES": {
        "AKROUSDT": (1, 188),
        "CTKUSDT": (5, 180),
        "KEEPUSDT": (3, 132),
        "SUSHIUSDT": (3, 252),
    },
    "BINANCE_DELIVERY": {
        "BCHUSD_PERP": (7, 208),
        "ETCUSD_PERP": (23, 215),
        "XRPUSD_PERP": (35, 176),
    },
    "spot_btcusdt_20240808.gz": {"BTCUSDT": (2, 3449)},
    "usdm_btcusdt_20240808.gz": {"BTCUSDT": (4, 6547)},
}
#: (market for the frame decoder, sequence rule); COIN-M delivery follows the futures rules.
KIND = {
    "BINANCE": ("spot", SPOT),
    "BINANCE_US": ("spot", SPOT),
    "BINANCE_FUTURES": ("usdm", FUTURES),
    "BINANCE_DELIVERY": ("usdm", FUTURES),
    "spot_btcusdt_20240808.gz": ("spot", SPOT),
    "usdm_btcusdt_20240808.gz": ("usdm", FUTURES),
}


class NaiveBook:
    """Independent reference: price -> qty dicts, ranked by Decimal value when asked."""

    def __init__(self, bids, asks) -> None:
        self.value: dict[str, Decimal] = {}
        self.bids = {p: q for p, q in bids if Decimal(q) != 0}
        self.asks = {p: q for p, q in asks if Decimal(q) != 0}

    def apply(self, update: DepthUpdate) -> None:
        for side, levels in ((self.bids, update.bids), (self.asks, update.asks)):
            for price, qty in levels:
                if Decimal(qty) == 0:
                    side.pop(price, None)
                else:
                    side[price] = qty

    def _key(self, item: tuple[str, str]) -> Decimal:
        price = item[0]
        value = self.value.get(price)
        if value is None:
            value = self.value[price] = Decimal(price)
        return value

    def top(self, n: int):
        bids = heapq.nlargest(n, self.bids.items(), key=self._key)
        asks = heapq.nsmallest(n, self.asks.items(), key=self._key)
        return bids, asks


class Replay:
    """Per-symbol engine plus reference book, fed from a capture."""

    def __init__(self, symbol: str, rule: SequenceRule, every: int = 1) -> None:
        self.every = every
        self.sync = B.BookSync(symbol, rule, buffer_limit=100_000)
        self.rule = rule
        self.naive: NaiveBook | None = None
        self.pending: list[DepthUpdate] = []
        self.codes: dict[int, int] = {}
        self.compared = 0
        self.live_applied = 0
        self.snapshot_code = -1

    def snapshot(self, snapshot) -> None:
        if not self.sync.needs_snapshot:
            return  # only the first snapshot is used, as for the golden numbers
        code = self.snapshot_code = self.sync.on_snapshot(snapshot)
        self.codes[code] = self.codes.get(code, 0) + 1
        self.naive = NaiveBook(snapshot.bids, snapshot.asks)
        last = snapshot.last_update_id
        futures = self.rule.style == "futures"
        for update in self.pending:
            if update.last_update_id < last or (update.last_update_id == last and not futures):
                continue
            self.naive.apply(update)
        self.pending = []
        self.check()

    def feed(self, update: DepthUpdate) -> None:
        code = self.sync.feed(update)
        self.codes[code] = self.codes.get(code, 0) + 1
        if self.naive is None:
            self.pending.append(update)
        elif code in (B.APPLIED, B.SYNCED):
            self.live_applied += 1
            assert not self.sync.book.crossed()
            self.naive.apply(update)
            if self.live_applied % self.every == 0:
                self.check()

    def check(self) -> None:
        if not self.sync.live:
            return
        assert not self.sync.book.crossed()
        assert self.sync.top(TOP_N) == self.naive.top(TOP_N), f"at u={self.sync.local_id}"
        self.compared += 1


def replay(name: str, events) -> dict[str, Replay]:
    """Replay ``events``; the long captures (deep books) are compared every 4th update."""
    market, rule = KIND[name]
    every = 4 if name.endswith(".gz") else 1
    decoder = decode.FrameDecoder(market)
    books: dict[str, Replay] = {}
    for ev in events:
        if ev.kind == "rest":
            if "depth" not in ev.url:
                continue
            symbol = parse_qs(urlparse(ev.url).query)["symbol"][0]
            snapshot = decode.decode_depth_snapshot(ev.payload, symbol, market, 0)
            books.setdefault(symbol, Replay(symbol, rule, every)).snapshot(snapshot)
            continue
        record = decoder.decode(ev.payload, ev.local_time_ns // 1_000_000)
        if type(record) is DepthUpdate:
            books.setdefault(record.symbol, Replay(record.symbol, rule, every)).feed(record)
    return books


def load(name: str):
    if name.endswith(".gz"):
        return captures.read_hftbacktest(name, DATA)
    return captures.read_cryptofeed(name, DATA)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_replay_matches_golden_counts_and_reference(name: str) -> None:
    books = replay(name, load(name))
    for symbol, (dropped, applied) in GOLDEN[name].items():
        stats = books[symbol].sync.stats
        assert (stats.covered, stats.applied) == (dropped, applied), symbol
    for symbol, book in books.items():
        stats = book.sync.stats
        assert book.sync.live, f"{symbol} never synced"
        assert (stats.stale, stats.refetches, stats.buffer_restarts) == (0, 0, 0), symbol
        assert not set(book.codes) & B.BREAKS, f"{symbol}: {book.codes}"
        # One comparison when the snapshot went live, then one per live update applied.
        assert book.compared == book.live_applied // book.every + (book.snapshot_code == B.SYNCED)
    if name == "BINANCE_DELIVERY":
        assert len(books) == 10


def test_spot_btcusdt_continues_across_midnight_without_gap() -> None:
    events = load("spot_btcusdt_20240808.gz") + [
        e for e in load("spot_btcusdt_20240809.gz") if e.kind == "ws"
    ]
    book = replay("spot_btcusdt_20240808.gz", events)["BTCUSDT"]
    assert book.sync.live
    assert book.sync.stats.applied > 3449 * 1.5
    assert not set(book.codes) & B.BREAKS
    assert book.sync.stats.stale == 0


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["BINANCE", "BINANCE_US", "BINANCE_FUTURES", "BINANCE_DELIVERY"])
async def test_replay_through_the_stream_type(name: str) -> None:
    """The same captures through ``OrderBookStream`` (snapshots served by a fake adapter)."""
    import logging

    import anyio
    from test_orderbook_fakes import FakeExchange

    from streamer.core.api import StreamContext
    from streamer.core.counters import Counters
    from streamer.core.records import BookSnapshot
    from streamer.plugins.streams.orderbook import STREAM, OrderBookOptions, OrderBookStream

    market, rule = KIND[name]
    decoder = decode.FrameDecoder(market)
    snapshots: dict[str, BookSnapshot] = {}
    updates: list[DepthUpdate] = []
    for ev in load(name):
        if ev.kind == "rest" and "depth" in ev.url:
            symbol = parse_qs(urlparse(ev.url).query)["symbol"][0]
            snapshots.setdefault(
                symbol, decode.decode_depth_snapshot(ev.payload, symbol, market, 0)
            )
        elif ev.kind == "ws":
            record = decoder.decode(ev.payload, ev.local_time_ns // 1_000_000)
            if type(record) is DepthUpdate:
                updates.append(record)
    exchange = FakeExchange({}, rule, market)
    exchange.canned = {symbol: [snap] for symbol, snap in snapshots.items()}
    out: list = []
    counters = Counters()
    stream = OrderBookStream(
        # Every update is fed before the snapshot worker runs, so keep them all queued.
        OrderBookOptions(interval="update", verify_interval="off", queued_buffer_limit=10**6),
        StreamContext(
            pipeline="replay",
            exchange=exchange,
            symbols=sorted(snapshots),
            emit=out.append,
            counters=counters,
            logger=logging.getLogger("test.replay"),
        ),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.run)
        for update in updates:  # all buffered before the worker runs: one drain per symbol
            stream.on_record(update)
        with anyio.fail_after(5):
            while not all(stream.book(s).live for s in snapshots):
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()
    for symbol, (dropped, applied) in GOLDEN[name].items():
        assert counters.get("updates_dropped", symbol, STREAM) == dropped, symbol
        assert counters.get("updates_applied", symbol, STREAM) == applied, symbol
    assert counters.total("resyncs") == 0 and counters.total("snapshots_fetched") == len(snapshots)
    futures = rule.style == "futures"
    for symbol, snap in snapshots.items():
        naive = NaiveBook(snap.bids, snap.asks)
        for update in updates:
            if update.symbol == symbol and (
                update.last_update_id > snap.last_update_id
                or (futures and update.last_update_id == snap.last_update_id)
            ):
                naive.apply(update)
        last = [r for r in out if type(r) is BookSnapshot and r.symbol == symbol][-1]
        assert (last.bids, last.asks) == naive.top(20), symbol
