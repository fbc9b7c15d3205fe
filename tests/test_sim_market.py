"""The synthetic market model on its own: determinism, books, klines, bounded history."""

from __future__ import annotations

import pytest

from streamer.testing.market import (
    INTERVAL_MS,
    SymbolMarket,
    bar_close,
    bar_open,
    make_spec,
)

T0 = 1_764_000_000_000  # 2025-11-24 16:00 UTC, a Monday


def _run(market: str, symbol: str, seed: int, ticks: int, **kw) -> SymbolMarket:
    mk = SymbolMarket(make_spec(market, symbol, seed), seed, **kw)
    for i in range(ticks):
        mk.tick(T0 + i * 100)
    return mk


def test_bar_boundaries():
    assert bar_open("1m", T0 + 61_234) == T0 + 60_000
    assert bar_close("1m", T0) == T0 + 59_999
    week = bar_open("1w", T0 + 3 * 86_400_000)
    assert week == 1_763_942_400_000  # Monday 2025-11-24 00:00 UTC
    assert bar_close("1w", week) == week + INTERVAL_MS["1w"] - 1
    month = bar_open("1M", T0)
    assert month == 1_761_955_200_000  # 2025-11-01
    assert bar_close("1M", month) == 1_764_547_200_000 - 1  # 2025-12-01 minus 1 ms
    dec = bar_open("1M", 1_764_547_200_000 + 30 * 86_400_000)
    assert bar_close("1M", dec) == 1_767_225_600_000 - 1  # year rollover


def test_specs_format_exact_strings():
    spot = make_spec("spot", "BTCUSDT", 1)
    assert spot.fmt_price(spot.base_price).endswith(".00000000")
    assert spot.fmt_qty(0) == "0.00000000"
    fut = make_spec("usdm", "BTCUSDT", 1)
    assert fut.fmt_qty(0) == "0"
    assert fut.fmt_qty(1234) == "1.234"


@pytest.mark.parametrize("market", ["spot", "usdm"])
def test_deterministic_and_consistent(market):
    a = _run(market, "ETHUSDT", 5, 3000)
    b = _run(market, "ETHUSDT", 5, 3000)
    c = _run(market, "ETHUSDT", 6, 3000)
    assert a.trades == b.trades and a.snapshot(50) == b.snapshot(50)
    assert a.trades != c.trades
    ids = [t.trade_id for t in a.trades]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert all(
        t.first_trade_id == p.last_trade_id + 1
        for p, t in zip(a.trades, a.trades[1:], strict=False)
    )
    assert max(a.bids) < min(a.asks)  # never crossed
    # The book rebuilt from history equals the live book.
    assert a.book_at(a.last_update_id) == a._format_book(a.bids, a.asks, None)


def test_klines_cover_every_trade_once():
    mk = _run("spot", "BTCUSDT", 2, 6000)  # 10 minutes
    closed = mk.closed_klines("1m")
    assert [k.open_time for k in closed] == [T0 + i * 60_000 for i in range(9)]
    assert sum(k.count for k in closed) == sum(
        t.last_trade_id - t.first_trade_id + 1 for t in mk.trades if t.transact_time < T0 + 540_000
    )
    assert all(k.closed and k.event_time == k.close_time for k in closed)


def test_book_history_is_bounded():
    mk = SymbolMarket(make_spec("usdm", "BTCUSDT", 3), 3, history_ticks=600)
    early = [mk.tick(T0 + i * 100).last_update_id for i in range(10)]
    assert mk.book_at(early[5])  # still kept
    for i in range(10, 3000):
        mk.tick(T0 + i * 100)
    assert len(mk._history) <= 600
    assert mk.book_at(mk.last_update_id) == mk._format_book(mk.bids, mk.asks, None)
    with pytest.raises(ValueError, match="older than"):
        mk.book_at(early[5])
