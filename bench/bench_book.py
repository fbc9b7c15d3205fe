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

Old engine vs new (``--compare``, needs the repository's ``tests/book_reference.py``, a
copy of the engine before issue 12): book work per depth event (``LocalBook.apply`` +
``crossed()``) for both, interleaved in one process, on the recorded stream, a synthetic
near-top stream and a synthetic deep book (1000 levels, 68 levels per event spread over the
whole depth, like USD-M BTCUSDT), as µs per event and the old/new ratio.

Memory (``--memory``): tracemalloc bytes per level and per 1000+1000-level book for both
engines, with levels decoded from JSON like a REST snapshot: right after the snapshot, and
after updates rewrote every level (the new engine stores updates as decoded until its
periodic ``compact()``), and after that ``compact()``; and what 2000 such books would need.

Usage: ``python bench/bench_book.py [--repeat 7] [--synthetic] [--compare] [--memory]``.
Prints tables; exits 0.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import random
import statistics
import sys
import time
import tracemalloc
from bisect import bisect_left, insort
from decimal import Decimal
from pathlib import Path

import msgspec

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


def _deep(n_events: int = 6000, seed: int = 7) -> tuple[BookSnapshot, list[DepthUpdate]]:
    """1000 levels a side, 68 changed levels per event spread over the whole depth (and a
    little past it), 30% of them removals: the shape of USD-M BTCUSDT ``depth@0ms``."""
    rng = random.Random(seed)
    mid = 6_000_000

    def px(t: int) -> str:
        return f"{t // 100}.{t % 100:02d}"

    def qty() -> str:
        return "0.000" if rng.random() < 0.3 else f"{rng.randint(1, 999) / 1000:.3f}"

    bids = [(px(mid - k), f"{rng.randint(1, 999) / 1000:.3f}") for k in range(1, 1001)]
    asks = [(px(mid + k), f"{rng.randint(1, 999) / 1000:.3f}") for k in range(1, 1001)]
    snapshot = BookSnapshot("binance", "usdm", "X", 100, 0, 0, bids, asks)
    updates = []
    last = 100
    for _ in range(n_events):
        b = [(px(mid - min(int(rng.expovariate(1 / 60)) + 1, 1100)), qty()) for _ in range(34)]
        a = [(px(mid + min(int(rng.expovariate(1 / 60)) + 1, 1100)), qty()) for _ in range(34)]
        updates.append(DepthUpdate("binance", "usdm", "X", 0, 0, last + 1, last + 5, last, b, a, 0))
        last += 5
    return snapshot, updates


def _reference():
    """The engine before issue 12 (tests/book_reference.py), or None outside the repo."""
    path = Path(__file__).resolve().parents[1] / "tests/book_reference.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("book_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _book_work(book_cls, snapshot: BookSnapshot, updates: list[DepthUpdate]) -> float:
    """Seconds of ``apply`` + ``crossed`` over ``updates`` (the snapshot load untimed)."""
    book = book_cls.from_snapshot(snapshot)
    apply = book.apply
    crossed = book.crossed
    t0 = time.perf_counter()
    for u in updates:
        apply(u)
        crossed()
    return time.perf_counter() - t0


def compare(workloads, repeat: int) -> None:
    ref = _reference()
    if ref is None:
        print("--compare: tests/book_reference.py not found; skipped")
        return
    print(f"\n{'book work per depth event':44} {'old µs':>9} {'new µs':>9} {'old/new':>8}")
    for name, snapshot, updates in workloads:
        old, new = [], []
        for _ in range(repeat):  # interleaved, so load changes hit both alike
            old.append(_book_work(ref.LocalBook, snapshot, updates))
            new.append(_book_work(B.LocalBook, snapshot, updates))
        o = statistics.median(old) / len(updates) * 1e6
        n = statistics.median(new) / len(updates) * 1e6
        print(f"{name:44} {o:9.2f} {n:9.2f} {o / n:7.2f}x")


def _json_snapshot(levels: int, spot: bool, seed: int) -> bytes:
    rng = random.Random(seed)
    mid = 6_000_000
    if spot:
        px = lambda t: f"{t / 100:.8f}"  # noqa: E731
        qty = lambda: f"{rng.randint(1, 99999) / 1e5:.8f}"  # noqa: E731
    else:
        px = lambda t: f"{t // 100}.{t % 100:02d}"  # noqa: E731
        qty = lambda: f"{rng.randint(1, 9999) / 1000:.3f}"  # noqa: E731
    body = {
        "lastUpdateId": 1,
        "bids": [[px(mid - k), qty()] for k in range(1, levels + 1)],
        "asks": [[px(mid + k), qty()] for k in range(1, levels + 1)],
    }
    return msgspec.json.encode(body)


def _rewrite(snapshot: BookSnapshot) -> DepthUpdate:
    """An update that sets every level again (fresh strings, new quantities)."""
    raw = msgspec.json.encode([[p, q[::-1].lstrip("0.") or "1"] for p, q in snapshot.bids])
    bids = msgspec.json.decode(raw, type=list[tuple[str, str]])
    raw = msgspec.json.encode([[p, q[::-1].lstrip("0.") or "1"] for p, q in snapshot.asks])
    asks = msgspec.json.decode(raw, type=list[tuple[str, str]])
    return DepthUpdate("binance", "usdm", "X", 0, 0, 2, 2, 1, bids, asks, 0)


def _measure(book_cls, body: bytes, books: int, rewrite: bool, compact: bool = False) -> float:
    """tracemalloc bytes held per book (levels decoded from ``body`` for each book)."""
    from streamer.plugins.exchanges.binance.decode import decode_depth_snapshot

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    held = []
    for _ in range(books):
        snapshot = decode_depth_snapshot(body, "X", "usdm", 0)
        book = book_cls.from_snapshot(snapshot)
        if rewrite:
            book.apply(_rewrite(snapshot))
        if compact:
            book.compact()
        held.append(book)
        del snapshot
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del held
    return used / books


def memory(books: int = 40) -> None:
    ref = _reference()
    engines = [("new", B.LocalBook)]
    if ref is not None:
        engines.insert(0, ("old", ref.LocalBook))
    print(f"\nmemory (tracemalloc, mean of {books} books of 1000 bids + 1000 asks)")
    print(f"{'':36} {'B/level':>8} {'KB/book':>8} {'2000 books':>11}")
    for strings in ("usdm", "spot"):
        body = _json_snapshot(1000, strings == "spot", 3)
        for label, rewrite, compact in (
            ("after the snapshot", False, False),
            ("every level rewritten", True, False),
            ("rewritten, then compact()", True, True),
        ):
            for name, cls in engines:
                if compact and not hasattr(cls, "compact"):
                    continue
                per_book = _measure(cls, body, books, rewrite, compact)
                row = f"{name} {strings} strings, {label}"
                print(f"{row:36} {per_book / 2000:8.0f} {per_book / 1024:8.0f} "
                      f"{per_book * 2000 / 2**20:8.0f} MB")  # fmt: skip


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
    parser.add_argument("--compare", action="store_true", help="old engine vs new, per event")
    parser.add_argument("--memory", action="store_true", help="bytes per level, old vs new")
    parser.add_argument("--only", action="store_true", help="only --compare/--memory tables")
    args = parser.parse_args()
    if args.only:
        _extras(args)
        return 0
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
    _extras(args)
    return 0


def _extras(args) -> None:
    if args.compare:
        workloads = []
        rec = None if args.synthetic else _recorded()
        if rec is not None:
            snapshot, updates, _, split = rec
            workloads.append(("recorded usdm BTCUSDT (68 levels/event)", snapshot, updates[split:]))
        snapshot, updates, _, _ = _synthetic()
        workloads.append(("synthetic near-top (5-40 levels/event)", snapshot, updates))
        snapshot, updates = _deep()
        workloads.append(("synthetic deep (1000 levels, 68/event)", snapshot, updates))
        compare(workloads, args.repeat)
    if args.memory:
        memory()


if __name__ == "__main__":
    raise SystemExit(main())
