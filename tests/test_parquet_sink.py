"""Parquet sink: real captures round-trip exactly, rotation and compaction, disk full and
permission errors, values the decimal type cannot hold, verify, resume."""

from __future__ import annotations

import asyncio
import errno
import gzip
import json
import logging
import os
from decimal import Decimal
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from test_csv_realdata import load

from streamer.core.api import SinkContext, StreamKey
from streamer.core.counters import Counters
from streamer.core.records import BookSnapshot, DepthUpdate, Kline, Marker, Trade
from streamer.plugins.sinks._parquet_files import FileIO
from streamer.plugins.sinks.parquet_sink import Options, ParquetSink

DATA = Path(__file__).resolve().parent / "data"
T0 = 1_795_392_000_000  # 2026-11-23 00:00:00 UTC
HOUR = 3_600_000
KEY = StreamKey("binance", "usdm", "BTCUSDT", "aggtrade")


class FaultyIO(FileIO):
    """Writes (segments and Parquet files alike) fail with ``fail`` while it is set;
    ``deny_paths`` only to paths holding that text."""

    def __init__(self) -> None:
        self.fail: int | None = None
        self.only: str = ""

    def _check(self, where: str) -> None:
        if self.fail is not None and self.only in where:
            raise OSError(self.fail, os.strerror(self.fail), where)

    def open(self, path: str) -> int:
        self._check(path)
        return super().open(path)

    def write(self, fd: int, data: bytes) -> None:
        self._check(os.readlink(f"/proc/self/fd/{fd}"))
        super().write(fd, data)


def make_sink(root: Path, io: FileIO | None = None, **opts) -> tuple[ParquetSink, Counters]:
    counters = Counters()
    ctx = SinkContext(name="pq", counters=counters, logger=logging.getLogger("test.parquet"))
    return ParquetSink(Options(path=str(root), **opts), ctx, io=io), counters


def trades(first: int, n: int, t0: int = T0, step: int = 1000, symbol: str = "BTCUSDT"):
    return [
        Trade(
            "binance",
            "usdm",
            symbol,
            i,
            f"{100 + i}.5",
            "0.001",
            i,
            i,
            t0 + (i - first) * step,
            i % 2 == 0,
            None,
            t0 + (i - first) * step + 1,
            t0 + (i - first) * step + 2,
        )
        for i in range(first, first + n)
    ]


def stream_dir(root: Path, stream: str = "aggtrade", market: str = "usdm", symbol: str = "BTCUSDT"):
    return root / f"exchange=binance/market={market}/stream={stream}/symbol={symbol}"


def ids(root: Path, stream: str = "aggtrade", column: str = "agg_trade_id") -> list[int]:
    table = ds.dataset(stream_dir(root, stream), partitioning="hive").to_table()
    return sorted(table[column].to_pylist())  # duplicates stay: compared with a range


def files(root: Path, pattern: str = "*.parquet", stream: str = "aggtrade") -> list[Path]:
    return sorted(stream_dir(root, stream).glob(f"date=*/{pattern}"))


# --- real captures ---------------------------------------------------------------------------


def hft_records(name: str, market: str) -> list:
    """Every price and quantity of an hftbacktest capture as records: depth updates, trades,
    book tickers (one-level books, symbol ``<SYM>-BT``) and the REST snapshot (``-SNAP``)."""
    out: list = []
    with gzip.open(DATA / "hftbacktest_examples" / name, "rt") as f:
        for line in f:
            ns, _, text = line.partition(" ")
            doc = msgspec.json.decode(text)
            rt = int(ns) // 1_000_000
            data = doc.get("data", doc)
            e = data.get("e")
            if e == "depthUpdate":
                out.append(
                    DepthUpdate(
                        "binance",
                        market,
                        "BTCUSDT",
                        data["E"],
                        data.get("T"),
                        data["U"],
                        data["u"],
                        data.get("pu"),
                        [tuple(x) for x in data["b"]],
                        [tuple(x) for x in data["a"]],
                        rt,
                    )
                )
            elif e == "trade":
                out.append(
                    Trade(
                        "binance",
                        market,
                        "BTCUSDT",
                        data["t"],
                        data["p"],
                        data["q"],
                        data["t"],
                        data["t"],
                        data["T"],
                        data["m"],
                        data.get("M") if market == "spot" else None,
                        data["E"],
                        rt,
                    )
                )
            elif "u" in data and "b" in data and "B" in data:  # bookTicker
                out.append(
                    BookSnapshot(
                        "binance",
                        market,
                        "BTCUSDT-BT",
                        data["u"],
                        data.get("E", 0),
                        rt,
                        [(data["b"], data["B"])],
                        [(data["a"], data["A"])],
                    )
                )
            elif "lastUpdateId" in data:
                out.append(
                    BookSnapshot(
                        "binance",
                        market,
                        "BTCUSDT-SNAP",
                        data["lastUpdateId"],
                        0,
                        rt,
                        [tuple(x) for x in data["bids"]],
                        [tuple(x) for x in data["asks"]],
                    )
                )
    return out


def _exact(value: str) -> str:
    """``value`` as decimal128(38, 8) prints it: 8 decimals (Arrow prints zero as 0E-8)."""
    whole, _, frac = value.partition(".")
    text = f"{whole}.{frac.ljust(8, '0')}"
    return "0E-8" if Decimal(text) == 0 else text


def values_in(records: list) -> dict[tuple[str, str, str], list[str]]:
    """Every price and quantity string of the records, per (market, symbol, stream), in
    row order (book sides bids then asks, prices and quantities level by level)."""
    out: dict[tuple[str, str, str], list[str]] = {}
    for r in records:
        if isinstance(r, Trade):
            vals = [r.price, r.quantity]
        elif isinstance(r, Kline):
            if not r.closed:
                continue
            vals = [getattr(r, f) for f in KLINE_NUMBERS]
        elif isinstance(r, DepthUpdate):
            vals = [x for lvl in (*r.bids, *r.asks) for x in lvl]
        elif isinstance(r, BookSnapshot):
            vals = [p for p, _ in r.bids] + [q for _, q in r.bids]
            vals += [p for p, _ in r.asks] + [q for _, q in r.asks]
        else:
            continue
        stream = "kline" if isinstance(r, Kline) else type(r).__name__
        out.setdefault((r.market, r.symbol, stream), []).extend(vals)
    return out


KLINE_NUMBERS = (
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "taker_buy_volume",
    "taker_buy_quote_volume",
)
_NAMES = {"aggtrade": "Trade", "depth": "DepthUpdate", "orderbook": "BookSnapshot"}


def values_out(root: Path) -> dict[tuple[str, str, str], list]:
    """What the files hold, in the order of :func:`values_in` (as Arrow prints decimals, or
    floats)."""
    out: dict[tuple[str, str, str], list] = {}
    for path in sorted((root / "exchange=binance").glob("market=*/stream=*/symbol=*")):
        market = path.parent.parent.name.split("=")[1]
        stream = path.parent.name.split("=")[1]
        symbol = path.name.split("=")[1]
        if stream == "markers":
            continue
        table = ds.dataset(path, partitioning="hive").to_table()

        def py(col):
            if pa.types.is_decimal(col.type):
                return col.cast(pa.string()).to_pylist()
            return col.to_pylist()

        if stream.startswith("kline_"):
            stream = "kline"
            cols = [py(table[n]) for n in KLINE_NUMBERS]
        elif stream == "orderbook":
            lists = [table[c].to_pylist() for c in ("bid_price", "bid_qty", "ask_price", "ask_qty")]
            vals = []
            for bp, bq, ap, aq in zip(*lists, strict=True):
                vals += [*bp, *bq, *ap, *aq]
            if vals and isinstance(vals[0], Decimal):
                vals = ["0E-8" if v == 0 else f"{v:f}" for v in vals]
            out[(market, symbol, "BookSnapshot")] = vals
            continue
        else:
            cols = [py(table["price"]), py(table["quantity"])]
        vals = [v for row in zip(*cols, strict=True) for v in row if v is not None]
        out[(market, symbol, _NAMES.get(stream, stream))] = vals
    return out


@pytest.fixture(scope="module")
def captured() -> list:
    """Every record of the recorded captures (cryptofeed spot and USD-M, hftbacktest)."""
    records = []
    for capture, market in (("BINANCE", "spot"), ("BINANCE_FUTURES", "usdm")):
        records += load(capture, market)[0]
    records += hft_records("spot_btcusdt_20240808.gz", "spot")
    records += hft_records("usdm_btcusdt_20240808.gz", "usdm")
    return records


@pytest.mark.parametrize("price_type", ["decimal", "float"])
def test_every_price_and_quantity_of_the_recorded_captures_round_trips(
    tmp_path: Path, price_type: str, captured: list
) -> None:
    records = captured
    sink, counters = make_sink(tmp_path, price_type=price_type)

    async def scenario():
        for i in range(0, len(records), 500):
            await sink.write(records[i : i + 500])
        await sink.close()

    asyncio.run(scenario())
    assert counters.total("rows_duplicate") == 0 and sink.pending_rows == 0
    assert counters.total("values_unrepresentable") == 0
    assert not list(tmp_path.rglob("_*")), "segments or temporary files left after close"
    want = values_in(records)
    got = values_out(tmp_path)
    assert sum(map(len, want.values())) > 1_000_000
    assert set(want) == set(got)
    convert = float if price_type == "float" else _exact
    for key, strings in want.items():
        assert [convert(s) for s in strings] == got[key], key


# --- rotation and compaction -----------------------------------------------------------------


def test_hourly_rotation_compacts_each_past_hour_into_one_file(tmp_path: Path) -> None:
    sink, counters = make_sink(tmp_path, rotate="hour", row_group_rows=1000)

    async def scenario():
        # Three hours of trades, one per 1.8 s, written in many small flushes.
        batch = 100
        n = 3 * 2000
        for first in range(1, n + 1, batch):
            await sink.write(trades(first, batch, t0=T0 + (first - 1) * 1800, step=1800))
            await sink.flush()
            if first == 4001:  # in the third hour: two finished files, one open segment
                parts = files(tmp_path)
                segs = files(tmp_path, "_open-*.arrows")
                assert [p.name[:18] for p in parts] == ["part-2026-11-23-00", "part-2026-11-23-01"]
                assert len(segs) == 1
                # A running collector's open segment reads as an Arrow IPC stream.
                with pa.OSFile(str(segs[0])) as f:
                    table = pa.ipc.open_stream(f).read_all()
                assert table["agg_trade_id"].to_pylist() == list(range(4001, 4101))
                # ...and the finished files are complete Parquet (zstd, big row groups).
                meta = pq.ParquetFile(parts[0]).metadata
                assert meta.num_rows == 2000 and meta.num_row_groups == 2
                assert meta.row_group(0).column(0).compression == "ZSTD"
        await sink.close()

    asyncio.run(scenario())
    parts = files(tmp_path)
    assert len(parts) == 3 and not files(tmp_path, "_*")
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [2000, 2000, 2000]
    assert ids(tmp_path) == list(range(1, 6001))
    assert counters.get("files_compacted") == 3
    sink, _ = make_sink(tmp_path, rotate="hour")
    assert asyncio.run(sink.holdings()) == {KEY: 6000}


def test_daily_rotation_and_a_straggler_for_a_past_day(tmp_path: Path) -> None:
    day = 86_400_000
    sink, _ = make_sink(tmp_path)

    async def scenario():
        await sink.write(trades(1, 10, t0=T0 + day - 20_000, step=5000))  # crosses midnight
        await sink.flush()
        late = Kline(
            "binance",
            "usdm",
            "BTCUSDT",
            "1m",
            T0 + day - 60_000,
            T0 + day - 1,
            "1",
            "2",
            "0.5",
            "1.5",
            "10",
            "15",
            3,
            "4",
            "6",
            True,
            T0 + day,
            T0 + day + 5,
        )
        await sink.write([late])
        await sink.close()

    asyncio.run(scenario())
    assert [p.parent.name for p in files(tmp_path)] == ["date=2026-11-23", "date=2026-11-24"]
    assert ids(tmp_path) == list(range(1, 11))
    (kline,) = files(tmp_path, stream="kline_1m")
    assert kline.parent.name == "date=2026-11-23"


# --- crash leftovers at start-up -------------------------------------------------------------


def test_leftover_segment_and_temporary_file_are_finished_at_start(tmp_path: Path) -> None:
    sink, _ = make_sink(tmp_path)

    async def crash_after_flushes():
        for first in (1, 101, 201):
            await sink.write(trades(first, 100))
            await sink.flush()
        # No close: the process dies here, leaving the open segment.

    asyncio.run(crash_after_flushes())
    (seg,) = files(tmp_path, "_open-*.arrows")
    with seg.open("ab") as f:
        f.write(b"\xff\xff\xff\xff\x10\x00")  # the start of a batch cut by the crash
    (seg.parent / "_tmp-2026-11-23-1.parquet.tmp").write_bytes(b"PAR1 half a file")
    assert not files(tmp_path)  # nothing a reader of *.parquet would see yet

    sink, counters = make_sink(tmp_path)

    async def restart():
        held = await sink.holdings()
        await sink.write(trades(held[KEY] - 20, 60))  # resumes with an overlap
        await sink.close()
        return held

    held = asyncio.run(restart())
    assert held == {KEY: 300}
    assert counters.get("segments_recovered") == 1 and counters.get("torn_repairs") == 1
    assert counters.get("rows_duplicate", "BTCUSDT", "aggtrade") == 21
    assert not files(tmp_path, "_*")
    assert len(files(tmp_path)) == 2  # one file per run
    assert ids(tmp_path) == list(range(1, 340))


def test_crash_between_rename_and_unlink_keeps_one_copy(tmp_path: Path) -> None:
    sink, _ = make_sink(tmp_path)

    async def first_run():
        await sink.write(trades(1, 50))
        await sink.flush()

    asyncio.run(first_run())
    (seg,) = files(tmp_path, "_open-*.arrows")
    copy = seg.read_bytes()
    sink._close_sync()
    (part,) = files(tmp_path)
    seg.write_bytes(copy)  # as if the crash came after the rename, before the unlink
    sink, _ = make_sink(tmp_path)
    assert asyncio.run(sink.holdings()) == {KEY: 50}
    assert files(tmp_path) == [part] and not files(tmp_path, "_*")
    assert ids(tmp_path) == list(range(1, 51))


# --- disk full, permission denied ------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES], ids=["disk-full", "denied"])
def test_write_errors_keep_rows_and_retry(tmp_path: Path, code: int) -> None:
    fio = FaultyIO()
    sink, counters = make_sink(tmp_path, fio)

    async def scenario():
        await sink.write(trades(1, 5))
        await sink.flush()
        fio.fail = code
        for first in (6, 11, 16):
            await sink.write(trades(first, 5))
            await sink.flush()
        assert sink.pending_rows == 15 and counters.get("rows_buffered") == 15
        (seg,) = files(tmp_path, "_open-*.arrows")
        with pa.OSFile(str(seg)) as f:  # what is on disk stays whole and readable
            assert pa.ipc.open_stream(f).read_all().num_rows == 5
        fio.fail = None
        await sink.flush()
        assert sink.pending_rows == 0
        await sink.close()

    asyncio.run(scenario())
    assert ids(tmp_path) == list(range(1, 21))
    assert counters.get("write_errors", "BTCUSDT", "aggtrade") == 3
    assert counters.total("rows_dropped") == 0 and counters.get("rows_buffered") == 0


def test_disk_full_during_compaction_keeps_the_segment_until_it_works(tmp_path: Path) -> None:
    fio = FaultyIO()
    sink, counters = make_sink(tmp_path, fio, rotate="hour")
    fio.only = "_tmp-"  # only the Parquet files fail

    async def scenario():
        await sink.write(trades(1, 10))
        await sink.flush()
        fio.fail = errno.ENOSPC
        await sink.write(trades(11, 10, t0=T0 + HOUR))  # the first hour is finished: fails
        await sink.flush()
        assert counters.get("compaction_errors") >= 1
        assert len(files(tmp_path, "_open-*.arrows")) == 2 and not files(tmp_path)
        assert not files(tmp_path, "_tmp-*")  # the partial Parquet file is removed
        fio.fail = None
        await sink.flush()
        assert len(files(tmp_path)) == 1  # retried on the next flush
        await sink.close()

    asyncio.run(scenario())
    assert ids(tmp_path) == list(range(1, 21)) and len(files(tmp_path)) == 2


def test_overflow_is_dropped_counted_and_explained_by_a_gap_marker(tmp_path: Path) -> None:
    fio = FaultyIO()
    sink, counters = make_sink(tmp_path, fio, max_buffered_rows=10, flush_rows=5)

    async def scenario():
        fio.fail = errno.ENOSPC
        for first in range(1, 26, 5):
            await sink.write(trades(first, 5))
            await sink.flush()
        fio.fail = None
        await sink.flush()
        await sink.write(trades(26, 2))
        await sink.close()

    asyncio.run(scenario())
    assert ids(tmp_path) == [*range(1, 11), 26, 27]
    assert counters.get("rows_dropped", "BTCUSDT", "aggtrade") == 15
    assert counters.get("gap_markers") == 1
    markers = ds.dataset(stream_dir(tmp_path, "markers"), partitioning="hive").to_table()
    assert markers.select(["stream", "kind", "first_key", "last_key", "reason"]).to_pylist() == [
        {
            "stream": "aggtrade",
            "kind": "gap",
            "first_key": 11,
            "last_key": 25,
            "reason": "disk full",
        }
    ]
    text, code = ParquetSink.verify(tmp_path)
    assert code == 0, text
    assert "explained by gap 11-25 (disk full)" in text


def test_rows_lost_at_close_are_counted_and_marked(tmp_path: Path) -> None:
    fio = FaultyIO()
    fio.only = "aggtrade"
    sink, counters = make_sink(tmp_path, fio)

    async def scenario():
        await sink.write(trades(1, 5))
        await sink.flush()
        fio.fail = errno.EACCES
        await sink.write(trades(6, 5))
        await sink.close()

    asyncio.run(scenario())
    assert sink.pending_rows == 5
    assert counters.get("rows_dropped", "BTCUSDT", "aggtrade") == 5
    markers = ds.dataset(stream_dir(tmp_path, "markers"), partitioning="hive").to_table()
    assert markers["first_key"].to_pylist() == [6] and markers["last_key"].to_pylist() == [10]


def test_a_deleted_tree_is_created_again(tmp_path: Path) -> None:
    import shutil

    sink, counters = make_sink(tmp_path)

    async def scenario():
        await sink.write(trades(1, 5))
        await sink.flush()
        shutil.rmtree(tmp_path / "exchange=binance")
        await sink.write(trades(6, 5))
        await sink.close()

    asyncio.run(scenario())
    assert ids(tmp_path) == list(range(6, 11))  # 1-5 went with the tree
    assert counters.get("dirs_recreated") == 1 and counters.get("files_reopened") == 1


# --- values, verify --------------------------------------------------------------------------


def _depth_event(u: int, bids: list, asks: list, futures: bool) -> DepthUpdate:
    return DepthUpdate("binance", "usdm" if futures else "spot", "BTCUSDT", T0 + u,
                       T0 + u - 1 if futures else None, u, u, u - 1 if futures else None,
                       bids, asks, T0 + u + 5)  # fmt: skip


@pytest.mark.parametrize("price_type", ["decimal", "float"])
def test_depth_and_book_rows_of_every_shape_match_the_records(price_type: str) -> None:
    """The vectorised builders: events without levels (first, middle, last), bids or asks
    only, spot and futures ids, one-record batches; books with uneven sides and a cap."""
    from streamer.plugins.sinks._parquet_schema import Types

    types = Types(price_type, 8)
    num = Decimal if price_type == "decimal" else float
    lv = [(f"{100 + i}.5", f"0.00{i}") for i in range(6)]
    shapes = [([], []), (lv[:2], lv[2:5]), (lv[:3], []), ([], []), ([], lv[1:2]), (lv, lv),
              ([], [])]  # fmt: skip
    for futures in (False, True):
        events = [_depth_event(10 + u, b, a, futures) for u, (b, a) in enumerate(shapes)]
        for batch in (events, events[1:3], events[3:4], events[4:5]):
            want = []
            for e in batch:
                head = [e.event_time, e.transact_time, e.first_update_id, e.last_update_id,
                        e.prev_update_id]  # fmt: skip
                levels = [("b", p, q) for p, q in e.bids] + [("a", p, q) for p, q in e.asks]
                for side, p, q in levels or [(None, None, None)]:
                    want.append((*head, side, p and num(p), q and num(q), e.receive_time))
            got = types.batch("depth", "spot", batch, None).to_pylist()
            assert [tuple(row.values())[:-1] for row in got] == want
    books = [
        BookSnapshot("binance", "spot", "BTCUSDT", 7, T0, T0 + 1, lv[:3], lv[:1]),
        BookSnapshot("binance", "spot", "BTCUSDT", 8, 0, T0 + 2, [], lv[2:6]),
        BookSnapshot("binance", "spot", "BTCUSDT", 9, T0 + 3, T0 + 4, lv, []),
    ]
    for levels in (None, 2):
        got = types.batch("orderbook", "spot", books, levels).to_pylist()
        for row, b in zip(got, books, strict=True):
            bids, asks = b.bids[:levels], b.asks[:levels]
            assert (row["last_update_id"], row["event_time"]) == (b.last_update_id, b.event_time)
            assert row["bid_price"] == [num(p) for p, _ in bids]
            assert row["bid_qty"] == [num(q) for _, q in bids]
            assert row["ask_price"] == [num(p) for p, _ in asks]
            assert row["ask_qty"] == [num(q) for _, q in asks]


def test_a_value_the_decimal_cannot_hold_is_never_rounded(tmp_path: Path) -> None:
    sink, counters = make_sink(tmp_path)
    batch = trades(1, 4)
    batch[2] = Trade(
        *[getattr(batch[2], f) for f in Trade.__struct_fields__[:4]],
        "0.123456789",
        *[getattr(batch[2], f) for f in Trade.__struct_fields__[5:]],
    )

    async def scenario():
        await sink.write(batch)
        await sink.close()

    asyncio.run(scenario())
    assert ids(tmp_path) == [1, 2, 4]
    assert counters.get("values_unrepresentable", "BTCUSDT", "aggtrade") == 1
    text, code = ParquetSink.verify(tmp_path)
    assert code == 0 and "explained by gap 3-3 (value not representable" in text
    sink, counters = make_sink(tmp_path / "scale9", decimal_scale=9)
    asyncio.run(scenario())
    assert (
        Decimal("0.123456789")
        in ds.dataset(stream_dir(tmp_path / "scale9"), partitioning="hive")
        .to_table()["price"]
        .to_pylist()
    )


def test_verify_reports_gaps_duplicates_breaks_and_torn_segments(tmp_path: Path) -> None:
    sink, _ = make_sink(tmp_path)
    depth = [
        DepthUpdate(
            "binance",
            "usdm",
            "BTCUSDT",
            T0 + i,
            T0 + i,
            first,
            last,
            prev,
            [("1", "2")],
            [],
            T0 + i,
        )
        for i, (first, last, prev) in enumerate([(1, 5, 0), (6, 9, 5), (12, 15, 11)])
    ]
    book = [BookSnapshot("binance", "usdm", "BTCUSDT", 7, T0, T0, [("10", "1")], [("9", "1")])]

    async def scenario():
        await sink.write([*trades(1, 5), *trades(8, 3), *depth, *book])
        await sink.close()
        again, _ = make_sink(tmp_path)
        await again.write(trades(20, 3))
        await again.flush()  # left open: a segment of a running collector

    asyncio.run(scenario())
    (seg,) = files(tmp_path, "_open-*.arrows")
    with seg.open("ab") as f:
        f.write(b"\xff\xff\xff\xff\x10")
    text, code = ParquetSink.verify(tmp_path)
    assert code == 1
    assert "ERROR: binance/usdm/BTCUSDT/aggtrade: gap 6-7 (2 ids missing)" in text
    assert "ERROR: binance/usdm/BTCUSDT/aggtrade: gap 11-19" in text
    assert "torn" in text and "_open-" in text
    assert "ERROR: binance/usdm/BTCUSDT/depth: break 10-11" in text
    assert "ERROR: binance/usdm/BTCUSDT/orderbook: crossed 7" in text
    doc = json.loads(ParquetSink.verify(tmp_path, as_json=True)[0])
    assert doc["exit_code"] == 1 and doc["files"] == 4
    with pytest.raises(ValueError, match="no files of the parquet sink"):
        ParquetSink.verify(tmp_path / "exchange=binance" / "market=usdm")


def test_markers_are_written_with_their_stream(tmp_path: Path) -> None:
    sink, _ = make_sink(tmp_path)
    m = Marker("binance", "usdm", "BTCUSDT", "aggtrade", "filled", 3, 9, T0 + 5, "reconnect")

    async def scenario():
        await sink.write([*trades(1, 2), m, *trades(10, 2)])
        await sink.close()

    asyncio.run(scenario())
    table = ds.dataset(stream_dir(tmp_path, "markers"), partitioning="hive").to_table()
    row = table.to_pylist()[0]
    assert (row["stream"], row["kind"], row["first_key"], row["last_key"]) == (
        "aggtrade",
        "filled",
        3,
        9,
    )
    assert row["timestamp"].timestamp() * 1000 == T0 + 5
    text, code = ParquetSink.verify(tmp_path)
    assert code == 0 and "explained by filled 3-9" in text
