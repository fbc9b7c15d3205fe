"""Benchmark of the order-book engine: level updates per second and top-20 snapshot cost.

Workload: the recorded USD-M BTCUSDT depth stream (6 minutes, ~6500 events, deep book) from
``tests/data`` when present, otherwise a seeded synthetic stream of the same
shape. Updates are decoded once up front; only book work is timed.

Measured (median of ``--repeat`` runs, one core, same process and run for every subject):

* ``apply``: level updates applied per second
  - ``ours``: ``BookSync.feed`` (sequence checks + float-key dict + sorted key list)
  - ``ours via stream``: the same through ``OrderBookStream.on_record`` (counters included)
  - ``float dict``: a bare ``dict[price_str] = qty_str`` with float zero test, no ordering
    (the lower bound of any exact-string book)
  - ``Decimal sorted list``: naive ordered book, ``Decimal`` keys kept sorted with insort
* ``top-20``: cost of one top-20 snapshot of both sides of the deep book
  - ``ours``: ``BookSync.top(20)`` (a slice of the sorted keys)
  - ``sort floats``: sort every price by float at snapshot time
  - ``sort Decimal``: sort every price by ``Decimal`` at snapshot time

Usage: ``python bench/bench_book.py [--repeat 7] [--synthetic]``. Prints a table; exits 0.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from bisect import bisect_left, insort
from decimal import Decimal
from pathlib import Path

from streamer.core.api import ExchangeAdapter, SequenceRule, StreamContext
from streamer.core.counters import Counters
from streamer.core.records import BookSnapshot, DepthUpdate
from streamer.plugins.streams import _book as B
from streamer.plugins.streams.orderbook import OrderBookOptions, OrderBookStream

FUTURES = SequenceRule("futures", 1000, (5, 10, 20, 50, 100, 500, 1000))
SPOT = SequenceRule("spot", 5000)


Workload = tuple[BookSnapshot, list[DepthUpdate], SequenceRule, int]


def _recorded() -> Workload | None:
    """The recorded stream; the last element is how many updates came before the snapshot."""
    try:
        from streamer.plugins.exchanges.binance.decode import FrameDecoder, decode_depth_snapshot
        from streamer.testing.captures import read_hftbacktest
    except ImportError:
        return None
    data = Path(__file__).resolve().parents[1] / "tests/data"
    if not data.is_dir():
        return None
    decoder = FrameDecoder("usdm")
    snapshot = None
    split = 0
    updates: list[DepthUpdate] = []
    for ev in read_hftbacktest("usdm_btcusdt_20240808.gz", data):
        if ev.kind == "rest":
            if snapshot is None:
                snapshot = decode_depth_snapshot(ev.payload, "BTCUSDT", "usdm", 0)
            continue
        record = decoder.decode(ev.payload, ev.local_time_ns // 1_000_000)
        if type(record) is DepthUpdate:
            updates.append(record)
            if snapshot is None:
                split = len(updates)
    if snapshot is None:
        return None
    return snapshot, updates, FUTURES, split


def _synthetic(
    n_events: int = 6000, seed: int = 1
) -> tuple[BookSnapshot, list[DepthUpdate], SequenceRule]:
    rng = random.Random(seed)
    mid = 6_000_000  # ticks of 0.01

    def px(t: int) -> str:
        return f"{t // 100}.{t % 100:02d}"

    bids = [(px(mid - k), f"{rng.randint(1, 9999) / 1000:.3f}") for k in range(1, 1001)]
    asks = [(px(mid + k), f"{rng.randint(1, 9999) / 1000:.3f}") for k in range(1, 1001)]
    snapshot = BookSnapshot("binance", "spot", "X", 100, 0, 0, bids, asks)
    updates = []
    last = 100
    for _ in range(n_events):
        levels_b: list[tuple[str, str]] = []
        levels_a: list[tuple[str, str]] = []
        for _ in range(rng.randint(5, 40)):
            k = int(rng.expovariate(1 / 40)) + 1  # most changes near the top
            qty = "0.000" if rng.random() < 0.3 else f"{rng.randint(1, 9999) / 1000:.3f}"
            if rng.random() < 0.5:
                levels_b.append((px(mid - k), qty))
            else:
                levels_a.append((px(mid + k), qty))
        updates.append(
            DepthUpdate(
                "binance", "spot", "X", 0, None, last + 1, last + 3, None, levels_b, levels_a, 0
            )
        )
        last += 3
    return snapshot, updates, SPOT, 0


def _levels(updates: list[DepthUpdate]) -> int:
    return sum(len(u.bids) + len(u.asks) for u in updates)


def _time(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _replay(snapshot, updates, rule, split) -> B.BookSync:
    sync = B.BookSync("X", rule, buffer_limit=len(updates) + 10)
    feed = sync.feed
    for u in updates[:split]:
        feed(u)
    sync.on_snapshot(snapshot)
    for u in updates[split:]:
        feed(u)
    assert sync.live and sync.stats.applied > len(updates) - 10
    return sync


def bench_apply_ours(snapshot, updates, rule, split) -> None:
    _replay(snapshot, updates, rule, split)


class _Exchange(ExchangeAdapter):
    exchange = "binance"
    market = "usdm"

    def __init__(self, rule: SequenceRule) -> None:
        self._rule = rule

    @property
    def sequence_rule(self) -> SequenceRule:
        return self._rule

    async def list_symbols(self):  # pragma: no cover - not used
        return []

    async def stream(self, subscriptions, inbox) -> None:  # pragma: no cover - not used
        return None


def bench_apply_stream(snapshot, updates, rule, split) -> None:
    """The whole hot path: ``OrderBookStream.on_record`` with counters, 1 s output."""
    context = StreamContext(
        pipeline="bench",
        exchange=_Exchange(rule),
        symbols=[updates[0].symbol],
        emit=lambda record: None,
        counters=Counters(),
        logger=logging.getLogger("bench"),
    )
    limit = len(updates) + 10
    options = OrderBookOptions(buffer_limit=limit, queued_buffer_limit=limit)
    stream = OrderBookStream(options, context)
    on_record = stream.on_record
    for u in updates[:split]:
        on_record(u)
    book = stream.book(updates[0].symbol)
    book.on_snapshot(snapshot)  # the snapshot worker's job, done inline here
    for u in updates[split:]:
        on_record(u)
    assert book.live


def bench_apply_float_dict(snapshot, updates, rule, split) -> None:
    bids = dict(snapshot.bids)
    asks = dict(snapshot.asks)
    for u in updates:
        for side, levels in ((bids, u.bids), (asks, u.asks)):
            for p, q in levels:
                if float(q) == 0.0:
                    side.pop(p, None)
                else:
                    side[p] = q


def bench_apply_decimal_sorted(snapshot, updates, rule, split) -> None:
    sides = []
    for levels in (snapshot.bids, snapshot.asks):
        book = {Decimal(p): (p, q) for p, q in levels}
        sides.append((book, sorted(book)))
    (bids, bkeys), (asks, akeys) = sides
    for u in updates:
        for book, keys, levels in ((bids, bkeys, u.bids), (asks, akeys, u.asks)):
            for p, q in levels:
                k = Decimal(p)
                if Decimal(q) == 0:
                    if book.pop(k, None) is not None:
                        del keys[bisect_left(keys, k)]
                else:
                    if k not in book:
                        insort(keys, k)
                    book[k] = (p, q)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--synthetic", action="store_true", help="ignore the recorded data")
    args = parser.parse_args()
    loaded = None if args.synthetic else _recorded()
    source = "recorded usdm BTCUSDT (hftbacktest 2024-08-08)"
    if loaded is None:
        loaded = _synthetic()
        source = "synthetic" if args.synthetic else "synthetic (recorded captures not found)"
    snapshot, updates, rule, split = loaded
    n_levels = _levels(updates)
    print(f"workload: {source}: {len(updates)} events, {n_levels} level updates, "
          f"snapshot {len(snapshot.bids)}+{len(snapshot.asks)} levels")  # fmt: skip
    print(f"python {sys.version.split()[0]}, median of {args.repeat} runs\n")

    rows = []
    for name, fn in (
        ("ours (BookSync.feed)", bench_apply_ours),
        ("ours via stream.on_record", bench_apply_stream),
        ("float dict, unordered", bench_apply_float_dict),
        ("Decimal sorted list", bench_apply_decimal_sorted),
    ):
        med = statistics.median(
            _time(lambda fn=fn: fn(snapshot, updates, rule, split), args.repeat)
        )
        rows.append((name, n_levels / med))
    base = rows[-1][1]
    print(f"{'apply':32} {'level updates/s':>16} {'vs Decimal':>11}")
    for name, rate in rows:
        print(f"{name:32} {rate:16,.0f} {rate / base:10.1f}x")

    # Deep book for the top-20 comparison: the engine's state after the whole replay.
    sync = _replay(snapshot, updates, rule, split)
    assert sync.book is not None
    bid_levels = dict(sync.book.bids.top(10**9))
    ask_levels = dict(sync.book.asks.top(10**9))
    calls = 2000

    def ours() -> None:
        for _ in range(calls):
            sync.top(20)

    def sort_floats() -> None:
        for _ in range(calls // 20):
            sorted(bid_levels.items(), key=lambda kv: float(kv[0]), reverse=True)[:20]
            sorted(ask_levels.items(), key=lambda kv: float(kv[0]))[:20]

    def sort_decimal() -> None:
        for _ in range(calls // 20):
            sorted(bid_levels.items(), key=lambda kv: Decimal(kv[0]), reverse=True)[:20]
            sorted(ask_levels.items(), key=lambda kv: Decimal(kv[0]))[:20]

    top = [
        ("ours (slice of sorted keys)", statistics.median(_time(ours, args.repeat)) / calls),
        (
            "sort floats at snapshot",
            statistics.median(_time(sort_floats, args.repeat)) / (calls // 20),
        ),
        (
            "sort Decimal at snapshot",
            statistics.median(_time(sort_decimal, args.repeat)) / (calls // 20),
        ),
    ]
    print(f"\n{'top-20 snapshot':32} {'µs/call':>16} {'vs ours':>11}   "
          f"(book: {len(bid_levels)} bids, {len(ask_levels)} asks)")  # fmt: skip
    for name, sec in top:
        print(f"{name:32} {sec * 1e6:16.2f} {sec / top[0][1]:10.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
