"""CSV sink: records in, files out, parsed back equal (every stream, both markets)."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import logging
import random
from pathlib import Path

import msgspec
import pytest

from streamer.core.api import SinkContext, StreamKey
from streamer.core.counters import Counters
from streamer.core.plugins import Registry, make_plugin_manager
from streamer.core.records import BookSnapshot, DepthUpdate, Kline, Marker, Trade
from streamer.plugins.sinks.csv_batch import CsvSink, Options

DAY = 86_400_000
T0 = 1_795_392_000_000  # 2026-11-23 00:00:00 UTC


KLINE_HEADER = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,"
    "taker_buy_quote_volume,event_time,receive_time\n"
)


def make_sink(path: Path, **opts) -> tuple[CsvSink, Counters]:
    counters = Counters()
    ctx = SinkContext(name="csv", counters=counters, logger=logging.getLogger("test.csv"))
    return CsvSink(Options(path=str(path), **opts), ctx), counters


def run(coro):
    return asyncio.run(coro)


async def write_all(sink: CsvSink, *batches, close: bool = True) -> None:
    await sink.open()
    for batch in batches:
        await sink.write(batch)
    await sink.flush()
    if close:
        await sink.close()


def read_csv(path: Path) -> list[list[str]]:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return list(csv.reader(io.StringIO(raw.decode())))


def price(rng: random.Random) -> str:
    return f"{rng.randint(0, 99999)}.{rng.randint(0, 10**8 - 1):08d}"


def trades(market: str, symbol: str, n: int, start_id: int, t0: int, seed: int) -> list[Trade]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = t0 + i * 1000
        out.append(
            Trade(
                "binance",
                market,
                symbol,
                start_id + i,
                "0.00100000" if i == 0 else price(rng),
                price(rng),
                10 * (start_id + i),
                10 * (start_id + i) + rng.randint(0, 3),
                t,
                rng.random() < 0.5,
                (rng.random() < 0.9) if market == "spot" else None,
                t + 1,
                t + 5,
            )
        )
    return out


def parse_trade(row: list[str], market: str, symbol: str) -> Trade:
    best = None
    if market == "spot":
        a, p, q, f, last, tt, m, bm, e, r = row
        best = {"true": True, "false": False, "": None}[bm]
    else:
        a, p, q, f, last, tt, m, e, r = row
    return Trade(
        "binance", market, symbol, int(a), p, q, int(f), int(last), int(tt), m == "true",
        best, int(e), int(r),
    )  # fmt: skip


def klines(market: str, symbol: str, interval_ms: int, n: int, t0: int, seed: int) -> list[Kline]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ot = t0 + i * interval_ms
        out.append(
            Kline(
                "binance", market, symbol, "1m", ot, ot + interval_ms - 1, price(rng),
                price(rng), price(rng), price(rng), price(rng), price(rng), rng.randint(0, 9999),
                price(rng), price(rng), True, ot + interval_ms, ot + interval_ms + 3,
            )
        )  # fmt: skip
    return out


def parse_kline(row: list[str], market: str, symbol: str) -> Kline:
    ot, o, h, lo, c, v, ct, qv, n, tbv, tbq, e, r = row
    return Kline(
        "binance", market, symbol, "1m", int(ot), int(ct), o, h, lo, c, v, qv, int(n), tbv, tbq,
        True, int(e), int(r),
    )  # fmt: skip


def depth(market: str, symbol: str, n: int, t0: int, seed: int) -> list[DepthUpdate]:
    rng = random.Random(seed)
    out, uid = [], 1000
    for i in range(n):
        first, uid = uid + 1, uid + rng.randint(1, 5)
        levels = [(price(rng), rng.choice(["0", "0.00000000", price(rng)])) for _ in range(4)]
        bids = levels[: rng.randint(0, 4)]
        asks = [(price(rng), "1.5") for _ in range(rng.randint(0, 3))]
        futures = market != "spot"
        out.append(
            DepthUpdate(
                "binance", market, symbol, t0 + i * 100, t0 + i * 100 - 2 if futures else None,
                first, uid, first - 1 if futures else None, bids, asks, t0 + i * 100 + 7,
            )
        )  # fmt: skip
    return out


def parse_depth(rows: list[list[str]], market: str, symbol: str) -> list[DepthUpdate]:
    """Group level rows back into events (consecutive rows with the same last_update_id)."""
    out: list[DepthUpdate] = []
    for e, tt, first, last, pu, side, p, q, r in rows:
        if not out or out[-1].last_update_id != int(last):
            out.append(
                DepthUpdate(
                    "binance", market, symbol, int(e), int(tt) if tt else None, int(first),
                    int(last), int(pu) if pu else None, [], [], int(r),
                )
            )  # fmt: skip
        if side == "b":
            out[-1].bids.append((p, q))
        elif side == "a":
            out[-1].asks.append((p, q))
        else:
            assert (side, p, q) == ("", "", "")
    return out


def books(market: str, symbol: str, n: int, levels: int, t0: int, seed: int):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        nb = levels if i == 0 else rng.randint(0, levels)
        na = levels if i == 0 else rng.randint(0, levels)
        out.append(
            BookSnapshot(
                "binance", market, symbol, 5000 + i * 7, t0 + i * 1000, t0 + i * 1000 + 4,
                [(price(rng), price(rng)) for _ in range(nb)],
                [(price(rng), price(rng)) for _ in range(na)],
            )
        )  # fmt: skip
    return out


def parse_book(row: list[str], market: str, symbol: str) -> BookSnapshot:
    u, e, r, *cells = row
    bids, asks = [], []
    for i in range(0, len(cells), 4):
        bp, bq, ap, aq = cells[i : i + 4]
        if bp:
            bids.append((bp, bq))
        if ap:
            asks.append((ap, aq))
    return BookSnapshot("binance", market, symbol, int(u), int(e), int(r), bids, asks)


@pytest.mark.parametrize("market", ["spot", "usdm"])
@pytest.mark.parametrize("gz", [False, True])
def test_roundtrip_every_stream(tmp_path: Path, market: str, gz: bool) -> None:
    tr = trades(market, "BTCUSDT", 50, 7_000_000_000, T0 + 1000, seed=1)
    kl = klines(market, "BTCUSDT", 60_000, 30, T0, seed=2)
    dp = depth(market, "ETHUSDT", 60, T0 + 5, seed=3)
    bk = books(market, "BTCUSDT", 20, 5, T0 + 10, seed=4)
    mk = [
        Marker("binance", market, "BTCUSDT", "aggtrade", "gap", 5, 9, T0 + 50, "reconnect"),
        Marker("binance", market, "BTCUSDT", "orderbook", "resync", 0, 0, T0 + 60, 'a, "b"'),
    ]
    sink, counters = make_sink(tmp_path, gzip=gz)
    # Mixed records in two batches, as a writer would receive them.
    run(write_all(sink, tr[:20] + kl[:10] + dp[:30] + bk[:8] + mk, tr[20:] + kl[10:] + dp[30:]
                  + bk[8:]))  # fmt: skip

    ext = ".csv.gz" if gz else ".csv"
    root = tmp_path / "binance" / market
    label = "2026-11-23"
    rows = read_csv(root / "aggTrades/BTCUSDT" / f"BTCUSDT-aggTrades-{label}{ext}")
    assert rows[0][:7] == [
        "agg_trade_id", "price", "quantity", "first_trade_id", "last_trade_id",
        "transact_time", "is_buyer_maker",
    ]  # fmt: skip
    assert rows[0][7:] == (
        ["is_best_match", "event_time", "receive_time"]
        if market == "spot"
        else ["event_time", "receive_time"]
    )
    assert [parse_trade(r, market, "BTCUSDT") for r in rows[1:]] == tr
    assert rows[1][1] == "0.00100000"  # exact string, never a float

    rows = read_csv(root / "klines/BTCUSDT/1m" / f"BTCUSDT-1m-{label}{ext}")
    assert rows[0] == [
        "open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume",
        "count", "taker_buy_volume", "taker_buy_quote_volume", "event_time", "receive_time",
    ]  # fmt: skip
    assert [parse_kline(r, market, "BTCUSDT") for r in rows[1:]] == kl

    rows = read_csv(root / "depth/ETHUSDT" / f"ETHUSDT-depth-{label}{ext}")
    assert rows[0] == [
        "event_time", "transact_time", "first_update_id", "last_update_id", "prev_update_id",
        "side", "price", "quantity", "receive_time",
    ]  # fmt: skip
    assert parse_depth(rows[1:], market, "ETHUSDT") == dp
    assert len(rows) - 1 == sum(max(1, len(d.bids) + len(d.asks)) for d in dp)

    rows = read_csv(root / "orderbook/BTCUSDT" / f"BTCUSDT-orderbook-{label}{ext}")
    assert rows[0][:7] == ["last_update_id", "event_time", "receive_time", "bid_price_0",
                           "bid_qty_0", "ask_price_0", "ask_qty_0"]  # fmt: skip
    assert len(rows[0]) == 3 + 4 * 5  # N from the first snapshot
    assert all(len(r) == len(rows[0]) for r in rows)
    assert [parse_book(r, market, "BTCUSDT") for r in rows[1:]] == bk

    rows = read_csv(root / "markers/BTCUSDT" / f"BTCUSDT-markers-{label}{ext}")
    assert rows[0] == ["time", "stream", "kind", "first_key", "last_key", "reason"]
    assert rows[1:] == [
        [str(T0 + 50), "aggtrade", "gap", "5", "9", "reconnect"],
        [str(T0 + 60), "orderbook", "resync", "0", "0", 'a, "b"'],
    ]
    n_depth = sum(max(1, len(d.bids) + len(d.asks)) for d in dp)
    assert counters.total("rows_written") == 50 + 30 + n_depth + 20 + 2
    assert counters.get("rows_written", "BTCUSDT", "aggtrade") == 50
    assert counters.get("bytes_written") == sum(
        p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()
    )


def test_files_load_in_pandas_with_exact_strings(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    tr = trades("spot", "BTCUSDT", 10, 1, T0, seed=9)
    sink, _ = make_sink(tmp_path)
    run(write_all(sink, tr))
    path = tmp_path / "binance/spot/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-11-23.csv"
    frame = pd.read_csv(path, dtype={"price": str, "quantity": str})
    assert list(frame["price"]) == [t.price for t in tr]
    assert frame["is_buyer_maker"].dtype == bool
    assert list(frame["agg_trade_id"]) == list(range(1, 11))


def test_header_once_per_file_across_flushes_and_reopen(tmp_path: Path) -> None:
    tr = trades("spot", "BTCUSDT", 30, 1, T0, seed=5)
    for chunk in (tr[:10], tr[10:20], tr[20:]):
        sink, _ = make_sink(tmp_path)
        run(write_all(sink, chunk[:5], chunk[5:]))
    path = tmp_path / "binance/spot/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-11-23.csv"
    lines = path.read_text().splitlines()
    assert sum(1 for line in lines if line.startswith("agg_trade_id")) == 1
    assert len(lines) == 31


@pytest.mark.parametrize("gz", [False, True])
def test_rotation_at_utc_midnight(tmp_path: Path, gz: bool) -> None:
    # 5 trades before midnight, 5 after, in one batch.
    tr = trades("usdm", "BTCUSDT", 10, 100, T0 + DAY - 5000, seed=6)
    sink, _ = make_sink(tmp_path, gzip=gz)
    run(write_all(sink, tr))
    ext = ".csv.gz" if gz else ".csv"
    folder = tmp_path / "binance/usdm/aggTrades/BTCUSDT"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"BTCUSDT-aggTrades-2026-11-23{ext}",
        f"BTCUSDT-aggTrades-2026-11-24{ext}",
    ]
    first = read_csv(folder / f"BTCUSDT-aggTrades-2026-11-23{ext}")
    second = read_csv(folder / f"BTCUSDT-aggTrades-2026-11-24{ext}")
    assert [int(r[0]) for r in first[1:]] == [100, 101, 102, 103, 104]
    assert [int(r[0]) for r in second[1:]] == [105, 106, 107, 108, 109]
    assert first[0] == second[0]  # a header in every file
    assert int(first[-1][5]) < T0 + DAY <= int(second[1][5])


def test_hourly_rotation_and_microsecond_times(tmp_path: Path) -> None:
    hour = 3_600_000
    tr = trades("spot", "BTCUSDT", 3, 1, T0 + 2 * hour - 1000, seed=7)
    micro = [
        msgspec.structs.replace(t, trade_id=10 + i, transact_time=(T0 + 5 * hour) * 1000 + i)
        for i, t in enumerate(tr)
    ]
    sink, _ = make_sink(tmp_path, rotation="hourly")
    run(write_all(sink, tr + micro))
    folder = tmp_path / "binance/spot/aggTrades/BTCUSDT"
    assert sorted(p.name for p in folder.iterdir()) == [
        "BTCUSDT-aggTrades-2026-11-23-01.csv",
        "BTCUSDT-aggTrades-2026-11-23-02.csv",
        "BTCUSDT-aggTrades-2026-11-23-05.csv",
    ]
    rows = read_csv(folder / "BTCUSDT-aggTrades-2026-11-23-05.csv")
    assert [r[5] for r in rows[1:]] == [str(t.transact_time) for t in micro]


def test_holdings_resume_and_no_duplicates(tmp_path: Path) -> None:
    tr = trades("spot", "BTCUSDT", 40, 500, T0 + DAY - 20_000, seed=8)  # spans two days
    kl = klines("usdm", "ETHUSDT", 60_000, 5, T0, seed=8)
    bk = books("spot", "BTCUSDT", 3, 2, T0, seed=8)
    dp = depth("usdm", "ETHUSDT", 4, T0, seed=8)
    sink, _ = make_sink(tmp_path)
    run(write_all(sink, tr[:30] + kl[:3] + bk[:2] + dp[:2]))

    sink, counters = make_sink(tmp_path)

    async def resume():
        await sink.open()
        held = await sink.holdings()
        # The writer may resend what is held: the sink itself must not write it twice.
        await sink.write(tr + kl + bk + dp)
        await sink.close()
        return held

    held = run(resume())
    assert held == {
        StreamKey("binance", "spot", "BTCUSDT", "aggtrade"): tr[29].trade_id,
        StreamKey("binance", "usdm", "ETHUSDT", "kline_1m"): kl[2].open_time,
        StreamKey("binance", "spot", "BTCUSDT", "orderbook"): bk[1].last_update_id,
        StreamKey("binance", "usdm", "ETHUSDT", "depth"): dp[1].last_update_id,
    }
    assert counters.total("rows_duplicate") == 30 + 3 + 2 + 2
    folder = tmp_path / "binance/spot/aggTrades/BTCUSDT"
    ids = []
    for path in sorted(folder.iterdir()):
        ids += [int(r[0]) for r in read_csv(path)[1:]]
    assert ids == [t.trade_id for t in tr]
    assert len(list(folder.iterdir())) == 2
    kl_rows = read_csv(tmp_path / "binance/usdm/klines/ETHUSDT/1m/ETHUSDT-1m-2026-11-23.csv")
    assert [int(r[0]) for r in kl_rows[1:]] == [k.open_time for k in kl]


def test_holdings_read_newest_day_and_skip_header_only_file(tmp_path: Path) -> None:
    folder = tmp_path / "binance/spot/aggTrades/BTCUSDT"
    folder.mkdir(parents=True)
    header = "agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,"
    header += "is_buyer_maker,is_best_match,event_time,receive_time\n"
    row = "{},1.0,2.0,1,1,1,true,true,1,1\n"
    (folder / "BTCUSDT-aggTrades-2026-11-21.csv").write_text(header + row.format(900))
    (folder / "BTCUSDT-aggTrades-2026-11-22.csv").write_text(
        header + row.format(1000) + row.format(1001)
    )
    (folder / "BTCUSDT-aggTrades-2026-11-23.csv").write_text(header)  # rotated, no rows yet
    (folder / "notes.txt").write_text("not ours")
    kfolder = tmp_path / "binance/usdm/klines/BTCUSDT/1h"
    kfolder.mkdir(parents=True)
    (kfolder / "BTCUSDT-1h-2026-11-22.csv.gz").write_bytes(
        gzip.compress(KLINE_HEADER.encode()) + gzip.compress(b"1795305600000,y\n")
    )
    sink, _ = make_sink(tmp_path)
    held = run(sink.holdings())
    assert held == {
        StreamKey("binance", "spot", "BTCUSDT", "aggtrade"): 1001,
        StreamKey("binance", "usdm", "BTCUSDT", "kline_1h"): 1795305600000,
    }


def test_unclosed_klines_are_not_written(tmp_path: Path) -> None:
    kl = klines("spot", "BTCUSDT", 60_000, 2, T0, seed=10)
    open_bar = msgspec.structs.replace(kl[1], closed=False, close="1.23")
    sink, counters = make_sink(tmp_path)
    run(write_all(sink, [kl[0], open_bar, kl[1]]))
    rows = read_csv(tmp_path / "binance/spot/klines/BTCUSDT/1m/BTCUSDT-1m-2026-11-23.csv")
    assert [parse_kline(r, "spot", "BTCUSDT") for r in rows[1:]] == kl
    assert counters.get("klines_unclosed") == 1


def test_exchange_strings_with_separators_are_quoted(tmp_path: Path) -> None:
    tr = trades("usdm", "BTCUSDT", 3, 1, T0, seed=11)
    odd = [msgspec.structs.replace(tr[1], price="1,5", quantity='2"\n')]
    sink, counters = make_sink(tmp_path)
    run(write_all(sink, [tr[0]], odd, [tr[2]]))
    rows = read_csv(tmp_path / "binance/usdm/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-11-23.csv")
    assert [parse_trade(r, "usdm", "BTCUSDT") for r in rows[1:]] == [tr[0], odd[0], tr[2]]
    assert counters.get("rows_quoted") == 1


@pytest.mark.parametrize(
    "field,value",
    [
        ("symbol", "../etc"),
        ("symbol", "BTC/USDT"),
        ("symbol", ""),
        ("symbol", ".."),
        ("symbol", "BTC\\USDT"),
        ("market", "spot/../../x"),
        ("exchange", "/abs"),
    ],
)
def test_path_traversal_is_rejected_and_counted(
    tmp_path: Path, field: str, value: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = trades("spot", "BTCUSDT", 2, 1, T0, seed=12)
    bad = msgspec.structs.replace(good[0], **{field: value})
    sink, counters = make_sink(tmp_path / "out")
    with caplog.at_level(logging.ERROR):
        run(write_all(sink, [bad, *good]))
    assert counters.get("records_invalid") == 1
    assert f"invalid {field}" in caplog.text
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [p.name for p in written] == ["BTCUSDT-aggTrades-2026-11-23.csv"]
    assert all((tmp_path / "out") in p.parents for p in written)


def test_invalid_kline_interval_is_rejected(tmp_path: Path) -> None:
    kl = msgspec.structs.replace(klines("spot", "BTCUSDT", 60_000, 1, T0, seed=13)[0],
                                 interval="../1m")  # fmt: skip
    sink, counters = make_sink(tmp_path)
    run(write_all(sink, [kl]))
    assert counters.get("records_invalid") == 1
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_orderbook_levels_option_and_truncation(tmp_path: Path) -> None:
    bk = books("spot", "BTCUSDT", 3, 4, T0, seed=14)
    sink, counters = make_sink(tmp_path, book_levels=2)
    run(write_all(sink, bk))
    path = tmp_path / "binance/spot/orderbook/BTCUSDT/BTCUSDT-orderbook-2026-11-23.csv"
    rows = read_csv(path)
    assert len(rows[0]) == 3 + 4 * 2
    assert [parse_book(r, "spot", "BTCUSDT") for r in rows[1:]] == [
        msgspec.structs.replace(b, bids=b.bids[:2], asks=b.asks[:2]) for b in bk
    ]
    cut = sum(max(0, len(b.bids) - 2) + max(0, len(b.asks) - 2) for b in bk)
    assert counters.get("book_levels_truncated") == cut > 0
    # A later run keeps the file's N even with another option value.
    more = books("spot", "BTCUSDT", 2, 6, T0 + 10_000, seed=15)
    more = [msgspec.structs.replace(b, last_update_id=90_000 + i) for i, b in enumerate(more)]
    sink, _ = make_sink(tmp_path)
    run(write_all(sink, more))
    rows = read_csv(path)
    assert all(len(r) == 11 for r in rows) and len(rows) == 6


def test_options_are_validated() -> None:
    ok = msgspec.convert({"path": "x", "flush_interval": "250ms"}, Options)
    assert ok.rotation == "daily" and ok.fsync == "rotation"
    for bad, message in [
        ({"path": "x", "rotation": "weekly"}, "rotation"),
        ({"path": "x", "flush_interval": "soon"}, "invalid duration"),
        ({"path": "x", "flush_rows": 0}, "flush_rows"),
        ({"path": "x", "fsync": "always"}, "fsync"),
        ({"path": "x", "unknown": 1}, "unknown"),
        ({}, "path"),
        ({"path": "x", "flush_rows": 10, "max_buffered_rows": 5}, "max_buffered_rows"),
    ]:
        with pytest.raises(msgspec.ValidationError, match=message):
            msgspec.convert(bad, Options)


def test_registered_as_csv_entry_point() -> None:
    pm, _ = make_plugin_manager(["csv"])
    assert Registry.from_manager(pm).sink("csv") is CsvSink


def test_odd_strings_in_depth_and_books_are_quoted(tmp_path: Path) -> None:
    dp = depth("usdm", "ETHUSDT", 2, T0, seed=16)
    dp[1] = msgspec.structs.replace(dp[1], bids=[("1,5", "2")], asks=[("3", 'x"y')])
    bk = books("spot", "BTCUSDT", 2, 2, T0, seed=17)
    bk[1] = msgspec.structs.replace(bk[1], bids=[("9,9", "1")], asks=[])
    sink, counters = make_sink(tmp_path)
    run(write_all(sink, dp + bk))
    rows = read_csv(tmp_path / "binance/usdm/depth/ETHUSDT/ETHUSDT-depth-2026-11-23.csv")
    assert parse_depth(rows[1:], "usdm", "ETHUSDT") == dp
    rows = read_csv(tmp_path / "binance/spot/orderbook/BTCUSDT/BTCUSDT-orderbook-2026-11-23.csv")
    assert [parse_book(r, "spot", "BTCUSDT") for r in rows[1:]] == bk
    assert counters.get("rows_quoted") > 0


def test_gzip_toggled_within_a_day_holdings_take_the_newest_key(tmp_path: Path) -> None:
    tr = trades("spot", "BTCUSDT", 20, 1, T0, seed=18)
    sink, _ = make_sink(tmp_path)
    run(write_all(sink, tr[:10]))
    sink, counters = make_sink(tmp_path, gzip=True)
    run(write_all(sink, tr[5:]))  # overlaps what the plain file holds
    assert counters.total("rows_duplicate") == 5
    sink, _ = make_sink(tmp_path)
    held = run(sink.holdings())
    assert held[StreamKey("binance", "spot", "BTCUSDT", "aggtrade")] == 20
    folder = tmp_path / "binance/spot/aggTrades/BTCUSDT"
    gz_rows = read_csv(folder / "BTCUSDT-aggTrades-2026-11-23.csv.gz")
    assert [int(r[0]) for r in gz_rows[1:]] == list(range(11, 21))


def test_marker_without_time_goes_to_todays_file(tmp_path: Path) -> None:
    import time

    marker = Marker("binance", "usdm", "BTCUSDT", "depth", "resync", 0, 0, 0, "startup")
    sink, _ = make_sink(tmp_path)
    before = time.strftime("%Y-%m-%d", time.gmtime())
    run(write_all(sink, [marker]))
    after = time.strftime("%Y-%m-%d", time.gmtime())
    (path,) = (tmp_path / "binance/usdm/markers/BTCUSDT").iterdir()
    assert path.name in {f"BTCUSDT-markers-{day}.csv" for day in (before, after)}
    assert read_csv(path)[1] == ["0", "depth", "resync", "0", "0", "startup"]
