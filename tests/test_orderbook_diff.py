"""Differential tests: the windowed book against the engine before issue 12.

``book_reference.py`` holds the old ``LocalBook``/``BookSide`` verbatim (a float-keyed dict
plus a sorted list of every key). Both engines get the same input, and after *every* event
the top levels (exact strings), ``crossed()``, the level count, the best key and any
``MalformedLevel`` must be identical; so must the sync state machine's codes and state when
``BookSync`` runs on either engine. Inputs: seeded random markets (deep 1000-level books,
68 levels per event, repeated prices within one event, removals of absent levels and of
levels outside the sorted window, sweeps that empty the window so it must refill, another
spelling of the same price, malformed levels, crossing levels, verification snapshots) and
every recorded capture under ``tests/data``.
"""

from __future__ import annotations

import random
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import book_reference as ref
import pytest
from test_orderbook_fakes import FUTURES_RULE, SPOT_RULE

from streamer.core.records import BookSnapshot, DepthUpdate, Level
from streamer.plugins.exchanges.binance import decode
from streamer.plugins.streams import _book as B
from streamer.testing import captures

DATA = Path(__file__).resolve().parent / "data"


class RefLocalBook(ref.LocalBook):
    """The old book behind the new ``from_snapshot`` signature (depth is irrelevant)."""

    __slots__ = ()

    @classmethod
    def from_snapshot(cls, snapshot: BookSnapshot, depth: int = 20) -> RefLocalBook:
        book = cls()
        book.bids.load(snapshot.bids)
        book.asks.load(snapshot.asks)
        return book

    def compact(self) -> None:
        """Nothing to do: the old book had no compact form."""


# -- a seeded random market -----------------------------------------------------------------


class Market:
    """A deep random market in integer ticks (price = ticks / 100) and its depth events."""

    def __init__(self, seed: int, depth: int = 1000, futures: bool = False) -> None:
        self.rng = random.Random(seed)
        self.futures = futures
        self.mid = 1_000_000
        self.bids: dict[int, str] = {self.mid - k: self._qty() for k in range(1, depth + 1)}
        self.asks: dict[int, str] = {self.mid + k: self._qty() for k in range(1, depth + 1)}
        self.spelling: dict[int, str] = {}
        self.last_id = 1000

    def _qty(self) -> str:
        return f"{self.rng.randint(1, 99999) / 1000:.3f}"

    def px(self, tick: int) -> str:
        if tick in self.spelling:
            return self.spelling[tick]
        return f"{tick // 100}.{tick % 100:02d}"

    def snapshot(self, limit: int = 1000) -> BookSnapshot:
        bids = sorted(self.bids, reverse=True)[:limit]
        asks = sorted(self.asks)[:limit]
        return BookSnapshot(
            "binance",
            "spot",
            "X",
            self.last_id,
            0,
            0,
            [(self.px(t), self.bids[t]) for t in bids],
            [(self.px(t), self.asks[t]) for t in asks],
        )

    def _set(self, side: dict[int, str], out: list[Level], tick: int, qty: str) -> None:
        out.append((self.px(tick), qty))
        if qty == "0.000" or qty == "0":
            side.pop(tick, None)
        else:
            side[tick] = qty

    def event(self, crossing: bool = False, malformed: bool = False) -> DepthUpdate:
        rng = self.rng
        bids: list[Level] = []
        asks: list[Level] = []
        kind = rng.random()
        best_bid = max(self.bids, default=self.mid - 1)
        best_ask = min(self.asks, default=self.mid + 1)
        split = (best_bid + best_ask) // 2  # new bids at or below it, new asks above it
        if kind < 0.08:
            # A sweep: the best levels of one side go, the mid moves through them.
            side, out = (self.bids, bids) if rng.random() < 0.5 else (self.asks, asks)
            ordered = sorted(side, reverse=side is self.bids)
            for tick in ordered[: rng.randint(5, 120)]:
                self._set(side, out, tick, "0.000")
        n = rng.choice((1, 3, 10, 20, 40, 68, 68))
        for _ in range(n):
            is_bid = rng.random() < 0.5
            side, out = (self.bids, bids) if is_bid else (self.asks, asks)
            dist = int(rng.expovariate(1 / (8 if rng.random() < 0.6 else 300))) + 1
            tick = split + 1 - dist if is_bid else split + dist
            r = rng.random()
            if r < 0.3:
                qty = "0.000"  # often a removal of an absent or deep level
            elif r < 0.33 and out:
                tick = int(float(out[-1][0]) * 100 + 0.5)  # the same price twice
                qty = "0.000" if rng.random() < 0.5 else self._qty()
            else:
                qty = self._qty()
            if rng.random() < 0.01:
                # Another spelling of the same price (the same float key).
                self.spelling[tick] = str(tick / 100)  # 10000.5 for 10000.50
            elif tick in self.spelling and rng.random() < 0.2:
                del self.spelling[tick]
            self._set(side, out, tick, qty)
        rng.shuffle(bids) if rng.random() < 0.1 else None
        if crossing:
            bids.append((self.px(best_ask + rng.randint(0, 3)), "1.000"))  # not in the truth
        if malformed:
            bad = rng.choice([("abc", "1"), ("1.00", "x"), ("-1", "1"), ("0", "1"),
                              ("1.00", "-2"), ("nan", "1"), ("1.00", "nan"), ("inf", "1"),
                              ("1.00", "inf")])  # fmt: skip
            target = bids if rng.random() < 0.5 else asks
            target.insert(rng.randint(0, len(target)), bad)
        prev = self.last_id
        first = prev + (rng.randint(1, 3) if self.futures else 1)
        last = first + rng.randint(0, 3)
        self.last_id = last
        return DepthUpdate(
            "binance",
            "spot",
            "X",
            last,
            None,
            first,
            last,
            prev if self.futures else None,
            bids,
            asks,
            last,
        )


# -- LocalBook against the reference after every event ---------------------------------------


def _same_side(new: B.BookSide, old: ref.BookSide, n: int) -> None:
    assert new.top(n) == old.top(n)
    assert len(new) == len(old)
    assert new.best_key() == old.best_key()


def _apply_both(new: B.LocalBook, old: ref.LocalBook, update: DepthUpdate) -> str:
    errors = []
    for book in (new, old):
        try:
            book.apply(update)
            errors.append("")
        except B.MalformedLevel as exc:
            errors.append(str(exc))
    assert errors[0] == errors[1]
    return errors[0]


@pytest.mark.parametrize(
    ("seed", "depth", "min_window"),
    [(1, 20, 64), (2, 5, 64), (3, 1, 64), (4, 50, 64), (5, 5, 1), (6, 2, 1)],
)
def test_random_deep_book_matches_the_old_engine_after_every_event(
    seed: int, depth: int, min_window: int, monkeypatch
) -> None:
    # min_window 1: a window of only 4 x depth keys, so it often runs short without emptying.
    monkeypatch.setattr(B, "_MIN_WINDOW", min_window)
    refills = 0
    refill = B.BookSide._refill

    def counting(side: B.BookSide) -> None:
        nonlocal refills
        refills += side._floor != -float("inf")  # the window ran short, not a reload
        refill(side)

    monkeypatch.setattr(B.BookSide, "_refill", counting)
    market = Market(seed)
    snapshot = market.snapshot(1000)
    new = B.LocalBook.from_snapshot(snapshot, depth)
    old = RefLocalBook.from_snapshot(snapshot)
    rng = random.Random(seed)
    malformed = 0
    for i in range(1500):
        update = market.event(crossing=rng.random() < 0.01, malformed=rng.random() < 0.01)
        malformed += bool(_apply_both(new, old, update))
        if i % 37 == 0:
            new.compact()  # deep levels re-stored as strings: same output
        assert new.crossed() == old.crossed()
        _same_side(new.bids, old.bids, depth)
        _same_side(new.asks, old.asks, depth)
        if i % 50 == 0:  # deeper than the window: exact too, by a full sort
            _same_side(new.bids, old.bids, 10 * depth + 100)
            _same_side(new.asks, old.asks, 10 * depth + 100)
            assert new.bids.from_key(old.bids.boundary) == old.bids.from_key(old.bids.boundary)
        if i % 300 == 299:
            # The verification refresh: a fresh snapshot replaces the range it covers.
            fresh = market.snapshot(rng.choice((50, 500, 1000)))
            new_fresh = B.LocalBook.from_snapshot(fresh, depth)
            old_fresh = RefLocalBook.from_snapshot(fresh)
            for mine, theirs, mine_old, theirs_old in (
                (new.bids, new_fresh.bids, old.bids, old_fresh.bids),
                (new.asks, new_fresh.asks, old.asks, old_fresh.asks),
            ):
                assert mine.boundary == mine_old.boundary
                assert theirs.boundary == theirs_old.boundary
                lowest = max(mine.boundary, theirs.boundary)
                assert mine.from_key(lowest) == mine_old.from_key(lowest)
                mine.replace_from(theirs.boundary, theirs)
                mine_old.replace_from(theirs_old.boundary, theirs_old)
                _same_side(mine, mine_old, depth)
    assert malformed > 3, malformed
    assert refills > 5, refills  # the sorted window ran short and was rebuilt from the dict


def test_window_trims_and_refills_stay_exact_on_a_small_book(monkeypatch) -> None:
    """A few levels walked up and down across the window's bounds, one level at a time."""
    monkeypatch.setattr(B, "_MIN_WINDOW", 1)  # window of 8 to 16 keys
    new = B.BookSide(descending=True, depth=2)
    old = ref.BookSide(descending=True)
    rng = random.Random(5)
    for _ in range(20_000):
        tick = rng.randint(1, 400)
        qty = "0" if rng.random() < 0.45 else str(rng.randint(1, 9))
        levels = [(f"{tick}.5", qty)] * rng.choice((1, 1, 2))
        new.apply(levels)
        old.apply(levels)
        assert new.top(2) == old.top(2)
        assert new.best_key() == old.best_key() and len(new) == len(old)
    assert new.top(1000) == old.top(1000)


def test_side_level_stored_as_a_list_comes_back_as_a_tuple() -> None:
    new = B.BookSide(descending=False, depth=1)
    new.load([["1.0", "2"], ["3.0", "4"]])
    new.apply([["0.5", "1"], ["9.5", "1"]])
    assert new.top(10) == [("0.5", "1"), ("1.0", "2"), ("3.0", "4"), ("9.5", "1")]
    assert all(type(level) is tuple for level in new.top(10))


# -- BookSync on both engines -----------------------------------------------------------------


def _observe(sync: B.BookSync, code: int, depth: int) -> tuple:
    seen: tuple = (code, sync.state, sync.local_id, sync.detail, sync.buffered, sync.verifying)
    if sync.live:
        assert sync.book is not None
        seen += (sync.book.crossed(), sync.top(depth))
    return seen


def _run_sync(script: list, rule, depth: int) -> list[tuple]:
    sync = B.BookSync("X", rule, buffer_limit=10_000, depth=depth)
    out = []
    for action, arg in script:
        if action == "feed":
            code = sync.feed(arg)
        elif action == "snap":
            code = sync.on_snapshot(arg)
        elif action == "compact":
            sync.compact()
            code = -1
        else:
            code = sync.begin_verify(arg)
        out.append(_observe(sync, code, depth))
    return out


@pytest.mark.parametrize("futures", [False, True])
def test_sync_state_machine_on_random_traffic_is_unchanged(futures: bool, monkeypatch) -> None:
    depth = 10
    market = Market(20 + futures, futures=futures)
    rng = random.Random(7)
    events: list[DepthUpdate] = []
    snaps: dict[int, BookSnapshot] = {}  # the true book after event i
    for i in range(1200):
        events.append(market.event(crossing=rng.random() < 0.004, malformed=rng.random() < 0.004))
        if i % 10 == 9:
            snaps[i] = market.snapshot(rng.choice((100, 1000)))
    script: list = []
    for i, update in enumerate(events):
        if i % 30 == 0 and i:
            script.append(("snap", snaps[i - 1]))  # IGNORED unless a break left no book
        if i % 90 == 50:
            script.append(("verify", snaps[i - 1]))  # at the book's id: compared now
        if i % 130 == 70 and i + 9 in snaps:
            script.append(("verify", snaps[i + 9]))  # ahead of the book: held (pending)
        if i % 170 == 110:
            script.append(("verify", snaps[i - 21]))  # older than the book: stale
        script.append(("feed", update))
        if i % 45 == 44:
            script.append(("compact", None))
        if i % 211 == 100:
            script.append(("feed", update))  # a duplicate: stale
    rule = FUTURES_RULE if futures else SPOT_RULE
    new = _run_sync(script, rule, depth)
    monkeypatch.setattr(B, "LocalBook", RefLocalBook)
    old = _run_sync(script, rule, depth)
    for i, (a, b) in enumerate(zip(new, old, strict=True)):
        assert a == b, f"step {i}: {script[i][0]}"
    codes = {seen[0] for seen in new}
    # The traffic went through every path worth comparing.
    assert {B.APPLIED, B.SYNCED, B.VERIFIED, B.VERIFY_PENDING, B.VERIFY_STALE} <= codes
    assert {B.CROSSED, B.MALFORMED, B.STALE} <= codes


# -- recorded traffic --------------------------------------------------------------------------

CAPTURES = {
    "BINANCE": ("spot", SPOT_RULE),
    "BINANCE_US": ("spot", SPOT_RULE),
    "BINANCE_FUTURES": ("usdm", FUTURES_RULE),
    "BINANCE_DELIVERY": ("usdm", FUTURES_RULE),
    "spot_btcusdt_20240808.gz": ("spot", SPOT_RULE),
    "usdm_btcusdt_20240808.gz": ("usdm", FUTURES_RULE),
}


def _load(name: str):
    if name.endswith(".gz"):
        return captures.read_hftbacktest(name, DATA)
    return captures.read_cryptofeed(name, DATA)


def _replay(name: str, events: list) -> list[tuple]:
    _, rule = CAPTURES[name]
    syncs: dict[str, B.BookSync] = {}
    out = []
    for kind, symbol, item in events:
        sync = syncs.setdefault(symbol, B.BookSync(symbol, rule, buffer_limit=100_000))
        if kind == "rest":
            if sync.needs_snapshot:
                out.append((symbol, *_observe(sync, sync.on_snapshot(item), 20)))
            elif sync.live:
                # The recorded snapshots double as verification snapshots once live.
                out.append((symbol, *_observe(sync, sync.begin_verify(item), 20)))
        else:
            out.append((symbol, *_observe(sync, sync.feed(item), 20)))
    assert all(sync.live for sync in syncs.values())
    return out


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_recorded_traffic_gives_the_same_books_after_every_event(name: str, monkeypatch) -> None:
    market, _ = CAPTURES[name]
    decoder = decode.FrameDecoder(market)
    events = []
    for ev in _load(name):
        if ev.kind == "rest":
            if "depth" in ev.url:
                symbol = parse_qs(urlparse(ev.url).query)["symbol"][0]
                snap = decode.decode_depth_snapshot(ev.payload, symbol, market, 0)
                events.append(("rest", symbol, snap))
            continue
        record = decoder.decode(ev.payload, ev.local_time_ns // 1_000_000)
        if type(record) is DepthUpdate:
            events.append(("ws", record.symbol, record))
    new = _replay(name, events)
    monkeypatch.setattr(B, "LocalBook", RefLocalBook)
    old = _replay(name, events)
    assert len(new) == len(old) > 100
    for i, (a, b) in enumerate(zip(new, old, strict=True)):
        assert a == b, f"event {i}"
