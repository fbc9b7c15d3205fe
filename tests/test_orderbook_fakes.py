"""Seeded fake exchange for the order-book tests (and tests of the fake itself).

``TruthBook`` is a tiny deterministic market: it generates depth updates (spot-style
contiguous ids or futures-style ids with holes and ``pu``) and remembers the true book at
every update id. ``FakeExchange`` serves REST snapshots of it through
``fetch_book_snapshot`` and records how many requests were in flight at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import anyio

from streamer.core.api import (
    ExchangeAdapter,
    ExchangeContext,
    Inbox,
    NoOptions,
    SequenceRule,
    Subscription,
    SymbolInfo,
)
from streamer.core.counters import Counters
from streamer.core.records import BookSnapshot, DepthUpdate, Level

SPOT_RULE = SequenceRule("spot", 5000)
FUTURES_RULE = SequenceRule("futures", 1000, (5, 10, 20, 50, 100, 500, 1000))


def up(
    first: int,
    last: int,
    bids: Sequence[Level] = (),
    asks: Sequence[Level] = (),
    prev: int | None = None,
    symbol: str = "BTCUSDT",
    market: str = "spot",
) -> DepthUpdate:
    """A hand-made depth update."""
    return DepthUpdate(
        "binance",
        market,
        symbol,
        1000 + last,
        None,
        first,
        last,
        prev,
        list(bids),
        list(asks),
        2000 + last,
    )


def snap(
    last: int, bids: Sequence[Level], asks: Sequence[Level], symbol: str = "BTCUSDT"
) -> BookSnapshot:
    """A hand-made REST snapshot."""
    return BookSnapshot("binance", "spot", symbol, last, 0, 0, list(bids), list(asks))


def naive_top(levels: dict[str, str], n: int, bids: bool) -> list[Level]:
    """Independent reference: sort a price->qty dict by Decimal value."""
    from decimal import Decimal

    items = sorted(levels.items(), key=lambda kv: Decimal(kv[0]), reverse=bids)
    return items[:n]


class TruthBook:
    """A seeded fake market for one symbol: true book and its depth updates."""

    def __init__(self, symbol: str, seed: int, futures: bool = False, market: str = "spot") -> None:
        self.symbol = symbol
        self.futures = futures
        self.market = market
        self.rng = random.Random(seed)
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        # Integer ticks around a mid of 10000 (price = ticks / 100), deep enough that a
        # limit-1000 snapshot covers the whole book.
        for t in range(1, 60):
            self.bids[self._px(10000 - t)] = self._qty()
            self.asks[self._px(10000 + t)] = self._qty()
        self.last_id = 1000
        self.history: dict[int, tuple[dict[str, str], dict[str, str]]] = {}
        self._remember()

    @staticmethod
    def _px(ticks: int) -> str:
        return f"{ticks // 100}.{ticks % 100:02d}"

    def _qty(self) -> str:
        return f"{self.rng.randint(1, 5000) / 1000:.3f}"

    def _remember(self) -> None:
        self.history[self.last_id] = (dict(self.bids), dict(self.asks))

    def step(self, now_ms: int = 0) -> DepthUpdate:
        """Advance the market by one event and return its depth update."""
        rng = self.rng
        bids: list[Level] = []
        asks: list[Level] = []
        for _ in range(rng.randint(1, 6)):
            side_bid = rng.random() < 0.5
            ticks = rng.randint(1, 70)
            price = self._px(10000 - ticks if side_bid else 10000 + ticks)
            book = self.bids if side_bid else self.asks
            qty = "0.000" if rng.random() < 0.3 else self._qty()
            if qty == "0.000":
                book.pop(price, None)
            else:
                book[price] = qty
            (bids if side_bid else asks).append((price, qty))
        prev = self.last_id
        if self.futures:
            first = prev + rng.randint(1, 5)  # futures ids have holes; pu carries continuity
            last = first + rng.randint(0, 4)
        else:
            first = prev + 1
            last = first + rng.randint(0, 4)
        self.last_id = last
        self._remember()
        return DepthUpdate(
            "binance",
            self.market,
            self.symbol,
            now_ms or last,
            last if self.futures else None,
            first,
            last,
            prev if self.futures else None,
            bids,
            asks,
            now_ms or last + 7,
        )

    def snapshot(self, limit: int, at: int | None = None) -> BookSnapshot:
        """The true book (top ``limit`` per side) at update id ``at`` (default: now)."""
        at = self.last_id if at is None else at
        bids, asks = self.history[at]
        return BookSnapshot(
            "binance",
            self.market,
            self.symbol,
            at,
            0,
            0,
            naive_top(bids, limit, True),
            naive_top(asks, limit, False),
        )

    def top(self, at: int, n: int) -> tuple[list[Level], list[Level]]:
        """The true top ``n`` levels per side at update id ``at``."""
        bids, asks = self.history[at]
        return naive_top(bids, n, True), naive_top(asks, n, False)


class FakeExchange(ExchangeAdapter):
    """Serves snapshots of ``TruthBook`` objects; counts requests and peak concurrency."""

    exchange = "binance"

    def __init__(
        self,
        truths: dict[str, TruthBook],
        rule: SequenceRule = SPOT_RULE,
        market: str = "spot",
        delay: float = 0.0,
    ) -> None:
        super().__init__(
            NoOptions(),
            ExchangeContext(pipeline="t", counters=Counters(), logger=logging.getLogger("t")),
        )
        self.truths = truths
        self.rule = rule
        self.market = market
        self.delay = delay
        self.requests: list[tuple[str, int]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        #: symbol -> number of upcoming requests that fail with an error.
        self.fail: dict[str, int] = {}
        #: symbol -> snapshots to serve instead of the truth (consumed first).
        self.canned: dict[str, list[BookSnapshot]] = {}

    @property
    def sequence_rule(self) -> SequenceRule:
        return self.rule

    async def list_symbols(self) -> list[SymbolInfo]:
        return [SymbolInfo(s, "TRADING", "X", "Y") for s in self.truths]

    async def stream(self, subscriptions: Sequence[Subscription], inbox: Inbox) -> None:
        await anyio.sleep_forever()

    async def fetch_book_snapshot(self, symbol: str, limit: int) -> BookSnapshot:
        self.requests.append((symbol, limit))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await anyio.sleep(self.delay)
            if self.fail.get(symbol, 0) > 0:
                self.fail[symbol] -= 1
                raise RuntimeError(f"HTTP 503 for {symbol}")
            if self.canned.get(symbol):
                return self.canned[symbol].pop(0)
            return self.truths[symbol].snapshot(limit)
        finally:
            self.in_flight -= 1


def test_truth_book_is_deterministic_and_never_crossed() -> None:
    a = TruthBook("X", seed=7)
    b = TruthBook("X", seed=7)
    for _ in range(300):
        ua, ub = a.step(), b.step()
        assert ua == ub
        bids, asks = a.top(a.last_id, 1)
        if bids and asks:
            assert float(bids[0][0]) < float(asks[0][0])


def test_truth_book_futures_ids_chain_by_pu() -> None:
    t = TruthBook("X", seed=3, futures=True, market="usdm")
    prev = t.last_id
    for _ in range(50):
        u = t.step()
        assert u.prev_update_id == prev
        assert u.first_update_id > prev
        prev = u.last_update_id
