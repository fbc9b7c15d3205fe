"""Unit tests of the local book and the per-symbol sync state machine (hand-made updates)."""

from __future__ import annotations

import pytest
from test_orderbook_fakes import FUTURES_RULE, SPOT_RULE, TruthBook, snap, up

from streamer.plugins.streams import _book as B

BIDS = [("100.00", "1.0"), ("99.50", "2.0"), ("99.00", "3.0")]
ASKS = [("100.50", "1.5"), ("101.00", "2.5"), ("102.00", "3.5")]


def live_spot(last: int = 100) -> B.BookSync:
    """A spot book synced at ``last`` (one bridging update applied)."""
    sync = B.BookSync("BTCUSDT", SPOT_RULE)
    assert sync.feed(up(last + 1, last + 1)) == B.BUFFERED
    assert sync.on_snapshot(snap(last, BIDS, ASKS)) == B.SYNCED
    return sync


# -- BookSide -----------------------------------------------------------------------------


def test_side_orders_by_numeric_value_and_keeps_exact_strings() -> None:
    side = B.BookSide(descending=True)
    side.apply([("9.5", "1"), ("10.00000000", "2.50000000"), ("100", "3"), ("10.25", "0.1")])
    assert side.top(3) == [("100", "3"), ("10.25", "0.1"), ("10.00000000", "2.50000000")]
    asks = B.BookSide(descending=False)
    asks.apply([("9.5", "1"), ("10.00000000", "2"), ("100", "3")])
    assert asks.top(10) == [("9.5", "1"), ("10.00000000", "2"), ("100", "3")]


def test_side_zero_quantity_removes_and_absent_zero_is_ignored() -> None:
    side = B.BookSide(descending=True)
    side.apply([("1.0", "5"), ("2.0", "6")])
    side.apply([("1.0", "0.00000000"), ("3.0", "0"), ("4.0", "0.000")])  # 3.0, 4.0 absent
    assert side.top(5) == [("2.0", "6")]
    assert len(side) == 1


@pytest.mark.parametrize(
    ("price", "qty"),
    [
        ("abc", "1"),
        ("1.0", "x"),
        ("-1", "1"),
        ("0", "1"),
        ("1.0", "-2"),
        ("nan", "1"),
        ("1", "nan"),
        ("inf", "1"),
    ],
)
def test_side_rejects_malformed_levels(price: str, qty: str) -> None:
    side = B.BookSide(descending=False)
    with pytest.raises(B.MalformedLevel):
        side.apply([(price, qty)])


def test_side_replace_from_refreshes_a_range() -> None:
    mine = B.BookSide(descending=True)
    mine.load([("10", "1"), ("9", "1"), ("8", "1")])
    fresh = B.BookSide(descending=True)
    fresh.load([("10", "1"), ("9", "1"), ("7.5", "4"), ("7", "2")])
    mine.replace_from(fresh.boundary, fresh)
    assert mine.top(10) == [("10", "1"), ("9", "1"), ("7.5", "4"), ("7", "2")]
    assert mine.boundary == fresh.boundary


# -- spot rules ---------------------------------------------------------------------------


def test_spot_sync_drops_covered_and_bridges_with_u_equal_l_plus_one_inside() -> None:
    sync = B.BookSync("BTCUSDT", SPOT_RULE)
    assert sync.feed(up(95, 99)) == B.BUFFERED
    assert sync.feed(up(100, 100)) == B.BUFFERED  # u == L: covered (spot drops u <= L)
    assert sync.feed(up(101, 103, bids=[("100.00", "7.0")])) == B.BUFFERED  # bridges L+1
    assert sync.feed(up(104, 104, asks=[("100.50", "0")])) == B.BUFFERED
    assert sync.needs_snapshot and sync.buffered == 4
    assert sync.on_snapshot(snap(100, BIDS, ASKS)) == B.SYNCED
    assert (sync.stats.covered, sync.stats.applied) == (2, 2)
    assert sync.local_id == 104
    bids, asks = sync.top(2)
    assert bids == [("100.00", "7.0"), ("99.50", "2.0")]
    assert asks == [("101.00", "2.5"), ("102.00", "3.5")]


def test_spot_snapshot_older_than_first_buffered_update_is_refetched() -> None:
    sync = B.BookSync("BTCUSDT", SPOT_RULE)
    sync.feed(up(105, 107))
    sync.feed(up(108, 110))
    assert sync.on_snapshot(snap(103, BIDS, ASKS)) == B.REFETCH  # 103 + 1 < 105
    assert sync.needs_snapshot and sync.buffered == 2  # buffer kept
    assert sync.on_snapshot(snap(104, BIDS, ASKS)) == B.SYNCED  # U == L + 1 bridges
    assert sync.stats.applied == 2 and sync.stats.refetches == 1


def test_spot_snapshot_before_any_later_update_waits_for_the_bridge() -> None:
    sync = B.BookSync("BTCUSDT", SPOT_RULE)
    sync.feed(up(90, 95))
    assert sync.on_snapshot(snap(100, BIDS, ASKS)) == B.BRIDGING_WAIT
    assert not sync.live and not sync.needs_snapshot
    assert sync.feed(up(96, 100)) == B.COVERED
    assert sync.feed(up(101, 102)) == B.SYNCED
    assert sync.live and sync.local_id == 102


def test_spot_first_update_past_a_held_snapshot_that_skips_ahead_forces_refetch() -> None:
    sync = B.BookSync("BTCUSDT", SPOT_RULE)
    sync.feed(up(90, 95))
    assert sync.on_snapshot(snap(100, BIDS, ASKS)) == B.BRIDGING_WAIT
    assert sync.feed(up(103, 105)) == B.REFETCH
    assert sync.needs_snapshot and sync.buffered == 1 and sync.book is None


def test_spot_live_ignores_stale_and_duplicate_updates() -> None:
    sync = live_spot(100)
    assert sync.feed(up(102, 105, bids=[("100.00", "9")])) == B.APPLIED
    assert sync.feed(up(102, 105, bids=[("100.00", "1")])) == B.STALE  # duplicate
    assert sync.feed(up(90, 99)) == B.STALE
    assert sync.feed(up(104, 106)) == B.APPLIED  # overlapping but reaching past local
    assert sync.top(1)[0] == [("100.00", "9")]
    assert sync.stats.stale == 2


def test_spot_gap_discards_book_and_resync_keeps_no_pre_gap_level() -> None:
    sync = live_spot(100)
    sync.feed(up(102, 102, bids=[("98.00", "4.0")]))
    assert sync.feed(up(104, 105, asks=[("103.00", "1")])) == B.GAP  # U > local + 1
    assert sync.book is None and sync.needs_snapshot
    assert sync.buffered == 1  # the breaking update starts the new chain
    sync.feed(up(106, 106))
    fresh_bids = [("97.00", "1.0")]
    fresh_asks = [("104.00", "1.0")]
    assert sync.on_snapshot(snap(105, fresh_bids, fresh_asks)) == B.SYNCED
    bids, asks = sync.top(10)
    assert bids == fresh_bids and asks == fresh_asks  # nothing from before the gap survives


def test_crossed_update_discards_the_book() -> None:
    sync = live_spot(100)
    assert sync.feed(up(102, 102, bids=[("100.60", "1")])) == B.CROSSED
    assert sync.book is None and sync.needs_snapshot and sync.buffered == 0


def test_crossed_or_malformed_snapshot_is_rejected() -> None:
    sync = B.BookSync("BTCUSDT", SPOT_RULE)
    sync.feed(up(101, 101))
    assert sync.on_snapshot(snap(100, [("101", "1")], [("100", "1")])) == B.BAD_SNAPSHOT
    assert sync.on_snapshot(snap(100, [("x", "1")], ASKS)) == B.BAD_SNAPSHOT
    assert sync.needs_snapshot
    assert sync.on_snapshot(snap(100, BIDS, ASKS)) == B.SYNCED


def test_malformed_live_update_discards_the_book() -> None:
    sync = live_spot(100)
    assert sync.feed(up(102, 102, bids=[("oops", "1")])) == B.MALFORMED
    assert sync.needs_snapshot and "oops" in sync.detail


def test_buffer_overflow_drops_oldest_half_and_still_syncs() -> None:
    sync = B.BookSync("BTCUSDT", SPOT_RULE, buffer_limit=4)
    sync.fetching = True  # a snapshot request is in flight
    codes = [sync.feed(up(i, i)) for i in range(101, 106)]
    assert codes == [B.BUFFERED] * 4 + [B.OVERFLOW]
    assert sync.buffered == 3 and sync.stats.overflows == 1
    assert sync.on_snapshot(snap(100, BIDS, ASKS)) == B.REFETCH  # oldest kept is 103
    assert sync.on_snapshot(snap(103, BIDS, ASKS)) == B.SYNCED
    assert sync.local_id == 105


def test_buffer_keeps_only_recent_updates_until_the_request_is_in_flight() -> None:
    sync = B.BookSync("BTCUSDT", SPOT_RULE, buffer_limit=100, recent_limit=10)
    codes = [sync.feed(up(i, i)) for i in range(101, 112)]
    assert codes == [B.BUFFERED] * 10 + [B.TRIMMED]
    assert sync.buffered == 5 and sync.stats.trimmed == 6 and sync.stats.overflows == 0
    sync.fetching = True
    assert [sync.feed(up(i, i)) for i in range(112, 150)] == [B.BUFFERED] * 38
    assert sync.buffered == 43
    sync.fetching = False
    assert sync.on_snapshot(snap(106, BIDS, ASKS)) == B.SYNCED  # first kept is U=107
    assert sync.local_id == 149


def test_broken_chain_while_buffering_restarts_the_buffer() -> None:
    sync = B.BookSync("BTCUSDT", SPOT_RULE)
    sync.feed(up(101, 102))
    assert sync.feed(up(110, 111)) == B.BUFFER_RESTART
    assert sync.buffered == 1 and sync.stats.buffer_restarts == 1
    assert sync.feed(up(111, 111)) == B.STALE
    assert sync.on_snapshot(snap(109, BIDS, ASKS)) == B.SYNCED


def test_buffer_limits_must_hold_at_least_two() -> None:
    with pytest.raises(ValueError, match="buffer_limit"):
        B.BookSync("X", SPOT_RULE, buffer_limit=1)
    with pytest.raises(ValueError, match="recent_limit"):
        B.BookSync("X", SPOT_RULE, recent_limit=1)


# -- futures rules ------------------------------------------------------------------------


def fut(first: int, last: int, prev: int, **kw) -> object:
    return up(first, last, prev=prev, market="usdm", **kw)


def test_futures_drops_u_below_l_applies_u_equal_l_and_chains_by_pu() -> None:
    sync = B.BookSync("BTCUSDT", FUTURES_RULE)
    sync.feed(fut(90, 95, 80))
    sync.feed(fut(97, 100, 95, bids=[("99.50", "8.0")]))  # u == L: applied on futures
    sync.feed(fut(104, 110, 100))  # U != prev u + 1 is normal on futures
    assert sync.on_snapshot(snap(100, BIDS, ASKS)) == B.SYNCED
    assert (sync.stats.covered, sync.stats.applied) == (1, 2)
    assert sync.feed(fut(120, 121, 110)) == B.APPLIED
    assert sync.top(2)[0] == [("100.00", "1.0"), ("99.50", "8.0")]


def test_futures_first_update_must_contain_l() -> None:
    sync = B.BookSync("BTCUSDT", FUTURES_RULE)
    sync.feed(fut(101, 105, 99))
    assert sync.on_snapshot(snap(100, BIDS, ASKS)) == B.REFETCH  # U=101 > L=100
    assert sync.on_snapshot(snap(101, BIDS, ASKS)) == B.SYNCED


def test_futures_pu_mismatch_is_a_gap_even_when_ids_look_contiguous() -> None:
    sync = B.BookSync("BTCUSDT", FUTURES_RULE)
    sync.feed(fut(99, 101, 95))
    assert sync.on_snapshot(snap(100, BIDS, ASKS)) == B.SYNCED
    assert sync.feed(fut(102, 103, 99)) == B.GAP  # U == u + 1 but pu != 101
    assert sync.needs_snapshot and "pu=99" in sync.detail


def test_futures_update_without_pu_is_malformed() -> None:
    sync = B.BookSync("BTCUSDT", FUTURES_RULE)
    sync.feed(fut(99, 101, 95))
    sync.on_snapshot(snap(100, BIDS, ASKS))
    assert sync.feed(up(102, 103, prev=None, market="usdm")) == B.MALFORMED


# -- verification -------------------------------------------------------------------------


def test_verify_at_same_id_matches() -> None:
    sync = live_spot(100)
    sync.feed(up(102, 103, bids=[("99.50", "0")]))
    expected = [("100.00", "1.0"), ("99.00", "3.0")]
    assert sync.begin_verify(snap(103, expected, ASKS)) == B.VERIFIED
    assert sync.live


def test_verify_snapshot_ahead_is_held_until_the_live_book_reaches_it() -> None:
    sync = live_spot(100)
    sync.feed(up(102, 102))
    fresh_bids = [("100.00", "5.0"), ("99.50", "2.0"), ("99.00", "3.0")]
    assert sync.begin_verify(snap(104, fresh_bids, ASKS)) == B.VERIFY_PENDING
    assert sync.verifying
    # The update reaching the snapshot straddles it (103..105): applied to both books.
    result = sync.feed(up(103, 105, bids=[("100.00", "5.0")], asks=[("101.00", "0")]))
    assert result == B.VERIFIED and not sync.verifying


def test_verify_mismatch_discards_the_book() -> None:
    sync = live_spot(100)
    wrong = [("100.00", "1.0"), ("99.50", "2.5"), ("99.00", "3.0")]
    assert sync.begin_verify(snap(101, wrong, ASKS)) == B.MISMATCH
    assert sync.needs_snapshot and "99.50" in sync.detail


def test_verify_compares_only_what_both_snapshots_cover_and_refreshes_deep_levels() -> None:
    sync = live_spot(100)  # knows bids down to 99.00
    fresh = [("100.00", "1.0"), ("99.50", "2.0")]  # shallower: 99.00 not compared
    assert sync.begin_verify(snap(101, fresh, [*ASKS, ("103.00", "1")])) == B.VERIFIED
    deeper = [("100.00", "1.0"), ("99.50", "2.0"), ("99.00", "3.0"), ("98.00", "6.0")]
    assert sync.begin_verify(snap(101, deeper, ASKS)) == B.VERIFIED
    assert sync.top(10)[0] == deeper  # the deeper level now known from the fresh snapshot


def test_bad_verification_snapshot_keeps_the_book() -> None:
    sync = live_spot(100)
    assert sync.begin_verify(snap(101, [("101", "1")], [("100.5", "1")])) == B.BAD_SNAPSHOT
    assert sync.begin_verify(snap(101, [("?", "1")], ASKS)) == B.BAD_SNAPSHOT
    assert sync.live and not sync.verifying


def test_malformed_buffered_update_breaks_the_sync_not_the_snapshot() -> None:
    sync = B.BookSync("BTCUSDT", SPOT_RULE)
    sync.feed(up(101, 101))
    sync.feed(up(102, 102, asks=[("1.0", "-5")]))
    assert sync.on_snapshot(snap(100, BIDS, ASKS)) == B.MALFORMED
    assert sync.needs_snapshot and sync.buffered == 0


def test_verify_snapshot_older_than_the_book_is_retried() -> None:
    sync = live_spot(100)
    sync.feed(up(102, 110))
    assert sync.begin_verify(snap(105, BIDS, ASKS)) == B.VERIFY_STALE
    assert sync.live and not sync.verifying


def test_gap_during_pending_verification_drops_it() -> None:
    sync = live_spot(100)
    assert sync.begin_verify(snap(110, BIDS, ASKS)) == B.VERIFY_PENDING
    assert sync.feed(up(105, 106)) == B.GAP
    assert not sync.verifying


# -- against a generated market ------------------------------------------------------------


@pytest.mark.parametrize("futures", [False, True])
def test_generated_market_matches_truth_at_every_update(futures: bool) -> None:
    truth = TruthBook("X", seed=11, futures=futures)
    sync = B.BookSync("X", FUTURES_RULE if futures else SPOT_RULE)
    for _ in range(5):
        sync.feed(truth.step())
    snapshot_at = truth.last_id
    early = truth.snapshot(1000)
    for _ in range(3):
        sync.feed(truth.step())
    assert sync.on_snapshot(early) == B.SYNCED
    assert snapshot_at < sync.local_id
    for _ in range(2000):
        update = truth.step()
        assert sync.feed(update) == B.APPLIED
        assert sync.top(20) == truth.top(update.last_update_id, 20)


# -- memory -----------------------------------------------------------------------------------


def test_a_loaded_deep_book_is_stored_compactly() -> None:
    """A 1000+1000-level snapshot (strings decoded from JSON, as from REST) costs well under
    the ~240 bytes per level of a tuple of two strings per level plus a sorted key list."""
    import gc
    import tracemalloc

    import msgspec

    from streamer.core.records import BookSnapshot

    body = msgspec.json.encode(
        {
            "bids": [
                [f"{60000 - k / 10:.2f}", f"{k % 997 / 1000 + 0.001:.3f}"] for k in range(1000)
            ],
            "asks": [
                [f"{60001 + k / 10:.2f}", f"{k % 991 / 1000 + 0.001:.3f}"] for k in range(1000)
            ],
        }
    )
    decoder = msgspec.json.Decoder(dict[str, list[tuple[str, str]]])
    books = []
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(10):
            levels = decoder.decode(body)
            snapshot = BookSnapshot("binance", "usdm", "X", 1, 0, 0, levels["bids"], levels["asks"])
            books.append(B.LocalBook.from_snapshot(snapshot))
            del levels, snapshot
        gc.collect()
        per_level = (tracemalloc.get_traced_memory()[0] - base) / (10 * 2000)
    finally:
        tracemalloc.stop()
    assert books[0].bids.top(1) == [("60000.00", "0.001")]
    assert per_level < 160, per_level
